#!/usr/bin/env bash
# onnxruntime-genai (the LLM deployment peer: its model builder and its generator) in a venv of its own.
# It depends on plain `onnxruntime`, which cannot share an environment with the project's onnxruntime-gpu
# (both own the `onnxruntime` package). The venv sees the project's packages (torch, transformers, onnx,
# qcompiler) through --system-site-packages and shadows only onnxruntime with its own CPU build.
# Usage: tools/genai_env.sh [VENV]   (default .venv-genai); prints the venv's python.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-genai}
py=${PY:-$(command -v python3)}
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv --system-site-packages "$venv"
fi
if ! "$venv/bin/python" -c "import onnxruntime_genai" >/dev/null 2>&1; then
  "$venv/bin/python" -m pip install -q --no-deps "onnxruntime==1.32.0" "onnxruntime-genai==0.18.0" >/dev/null
fi
echo "$venv/bin/python"
