"""Shared fixtures: tiny random HF checkpoints of every family, a hermetic export cache, MiniLM."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from qcompiler.frontends.tiny import make_tiny_checkpoint  # noqa: E402

FAMILIES = ("gpt2", "llama", "qwen2", "gemma2", "gemma3", "bert")
# the pair matcher is also checked on fused QKV + fused gate_up weights
PAIR_FAMILIES = FAMILIES + ("phi3",)


def legacy_export(folder: Path, out: Path) -> Path:
    """The deprecated TorchScript exporter's ONNX of a checkpoint: a stand-in for files we did not export."""
    import warnings

    import torch
    import transformers as tf

    family = tf.AutoConfig.from_pretrained(folder).model_type
    cls = tf.AutoModel if family == "bert" else tf.AutoModelForCausalLM
    model = cls.from_pretrained(folder, attn_implementation="eager").eval()
    extra = {} if family == "bert" else {"use_cache": False}

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, input_ids, attention_mask):
            o = self.m(input_ids=input_ids, attention_mask=attention_mask, **extra)
            return o.last_hidden_state if family == "bert" else o.logits

    ids = torch.randint(5, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 16, dtype=torch.int64)
    dyn = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapper(), (ids, mask), str(out), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["out"], dynamic_axes=dyn)
    return out


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qcache")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny_checkpoint(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="session")
def pair_checkpoints(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_pairs")
    return {**tiny_checkpoints, "phi3": make_tiny_checkpoint("phi3", root / "phi3")}


@pytest.fixture(scope="session")
def legacy_models(pair_checkpoints, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("legacy")
    return {f: legacy_export(d, root / f"{f}.onnx") for f, d in pair_checkpoints.items()}


@pytest.fixture(scope="session")
def smollm2(cache_dir):
    """The real SmolLM2-135M (GGUF -> fp32 HF folder -> dynamo export without a KV cache, the graph the pair
    tests read; about two minutes, once)."""
    from qcompiler.frontends import load_model

    return load_model("smollm2", cache_dir=cache_dir, kv_cache=False)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from qcompiler.frontends.bundled import bundled_path

    return bundled_path("minilm")


@pytest.fixture(scope="session")
def minilm(cache_dir):
    from qcompiler.frontends import load_model

    return load_model("minilm", cache_dir=cache_dir)


def run_plain_onnxruntime(path: Path, feeds_npz: Path) -> subprocess.CompletedProcess:
    """Load and run a model in a separate, isolated interpreter that imports only onnxruntime."""
    code = (
        "import sys, numpy as np, onnxruntime as ort\n"
        "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
        "f = dict(np.load(sys.argv[2]))\n"
        "out = s.run(None, f)\n"
        "assert all(np.isfinite(o).all() for o in out)\n"
        "assert 'qcompiler' not in sys.modules\n"
        "print('ok', out[0].shape)\n"
    )
    return subprocess.run([sys.executable, "-I", "-c", code, str(path), str(feeds_npz)],
                          capture_output=True, text=True, cwd=path.parent, timeout=300)


@pytest.fixture(scope="session")
def ray_instance():
    """One local Ray instance with 2 CPUs for every test of the Ray executor: starting one, and its workers'
    imports, take about 20 s; a ``RayPool`` finds it running and leaves it running."""
    import ray

    from qcompiler.workers import start_ray

    start_ray(2)
    yield
    ray.shutdown()
