"""tools/residual_rotation.py: the residual-stream rotation is exact with float weights (its measurements rely on
it), on a tiny Llama, for each kind of orthogonal matrix; rounding after it changes the logits."""

from __future__ import annotations

import pytest
import torch

from tools import residual_rotation as rr


@pytest.mark.parametrize("kind", ["random", "bhad16", "brand16", "fold"])
def test_rotation_leaves_a_tiny_llama_unchanged(tiny_checkpoints, kind):
    from transformers import AutoModelForCausalLM

    folder = tiny_checkpoints["llama"]
    ids = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4]])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        for p in ref.parameters():  # norm gains away from 1, so that folding them is tested
            if p.ndim == 1:
                p.uniform_(0.2, 2.0)
        want = ref(ids).logits
        q = rr.orthogonal(kind, ref.config.hidden_size, seed=3)
        assert torch.allclose(q @ q.T, torch.eye(len(q), dtype=q.dtype), atol=1e-12)
        rr.rotate_residual(ref, q)
        got = ref(ids).logits
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
        if kind != "fold":
            assert not torch.allclose(ref.model.embed_tokens.weight, ref.lm_head.weight)  # untied, rotated
        rr.fake_quantize(ref, 4, 16, True)
        assert not torch.allclose(ref(ids).logits, want, atol=1e-4)


def test_unknown_kinds_and_sizes_are_refused():
    with pytest.raises(ValueError, match="unknown kind"):
        rr.orthogonal("nope", 64)
    with pytest.raises(ValueError, match="does not divide"):
        rr.orthogonal("bhad64", 96)
