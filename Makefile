# Two commands on a fresh machine:  make run  (compile + evaluate the bundled model)  |  make test
PY ?= python3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
JARGON := /usr/share/doc/jargon-text/jargon.txt.gz

.PHONY: setup run test lint bench-readme

setup:
	# torch first: 2.13.0 is a CPU wheel on these machines; any other request pulls CUDA builds
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	@[ -f $(JARGON) ] || $(SUDO) apt-get install -y -q jargon-text >/dev/null 2>&1 || \
	  ($(SUDO) apt-get update -q >/dev/null 2>&1 && $(SUDO) apt-get install -y -q jargon-text >/dev/null) || \
	  echo "warning: could not install jargon-text (evaluation text); tests that need it will fail"

run: setup
	$(PY) -m qcompiler compile -o minilm.rtn-w4.onnx --report minilm.rtn-w4.json
	$(PY) -m qcompiler eval minilm.rtn-w4.onnx --reference minilm

lint:
	$(PY) -m ruff check .

test: setup lint
	$(PY) -m pytest -q
