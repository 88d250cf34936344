"""Candidates that look like pairs but are not safe to transform are rejected with a reason."""

import torch

from qcompiler.analyze import analyze
from qcompiler.frontends.module import load_module


class Attention(torch.nn.Module):
    """Single-layer MHA; ``leak`` also adds V's values to the output (a second use of V)."""

    def __init__(self, leak: bool = False, hidden: int = 32, heads: int = 4):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(hidden, hidden) for _ in range(4))
        self.heads, self.leak = heads, leak
        self.norm = torch.nn.LayerNorm(hidden)  # so that O is not the output head

    def forward(self, x):
        b, s, h = x.shape

        def split(t):
            return t.view(b, s, self.heads, h // self.heads).transpose(1, 2)

        v = self.v(x)
        probs = torch.softmax(split(self.q(x)) @ split(self.k(x)).transpose(-1, -2), dim=-1)
        out = self.o((probs @ split(v)).transpose(1, 2).reshape(b, s, h))
        return self.norm(out + v if self.leak else out)


class Mlp(torch.nn.Module):
    """``fc2(act(fc1 x))``; ``channel_scale`` multiplies by a per-channel constant inside the activation;
    ``relu`` picks ReLU instead of GELU; ``leak`` also adds some activations to the output."""

    def __init__(self, channel_scale: bool = False, relu: bool = False, leak: bool = False, hidden: int = 16,
                 inner: int = 32):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(hidden, inner), torch.nn.Linear(inner, hidden)
        self.register_buffer("w", torch.linspace(0.5, 2.0, inner))
        self.channel_scale, self.relu, self.leak = channel_scale, relu, leak
        self.norm = torch.nn.LayerNorm(hidden)

    def forward(self, x):
        h = self.fc1(x)
        h = torch.relu(h) if self.relu else torch.nn.functional.gelu(h)
        if self.channel_scale:
            h = h * self.w
        out = self.fc2(h)
        return self.norm(out + h[..., : out.shape[-1]] if self.leak else out)


def _analyze(module, hidden):
    torch.manual_seed(0)
    x = torch.randn(2, 5, hidden)
    return analyze(load_module(module.eval(), {"x": x}).model)


def test_attention_pair_found_and_leaky_v_rejected():
    torch.manual_seed(0)
    good = _analyze(Attention(), 32)
    assert [p.kind for p in good.pairs] == ["attn_vo"]
    assert good.pairs[0].kv_map == (0, 1, 2, 3) and good.pairs[0].head_dim == 8
    torch.manual_seed(0)
    bad = _analyze(Attention(leak=True), 32)
    assert not bad.pairs
    (r,) = bad.pair_rejections
    assert r.kind == "attn_vo" and r.producer == "v" and r.consumer == "o"
    assert "also flow into Add" in r.reason


def test_mlp_exact_transforms_follow_the_activation():
    relu = _analyze(Mlp(relu=True), 16)
    (p,) = relu.pairs
    assert p.kind == "mlp_up_down" and p.exact == ("positive_diagonal", "permutation") and p.activation == "Relu"
    gelu = _analyze(Mlp(), 16)
    assert gelu.pairs[0].exact == ("permutation",)


def test_per_channel_constant_in_the_chain_is_rejected():
    a = _analyze(Mlp(channel_scale=True), 16)
    assert not a.pairs
    (r,) = a.pair_rejections
    assert r.producer == "fc1" and r.consumer == "fc2" and "per-channel constant" in r.reason


def test_activations_used_elsewhere_are_rejected():
    a = _analyze(Mlp(leak=True), 16)
    assert not a.pairs
    (r,) = a.pair_rejections
    assert "also flows into Slice" in r.reason


def test_output_projection_that_is_the_head_is_named():
    class Bare(Attention):
        def forward(self, x):  # no norm: O feeds the graph output and is the (unquantized) head
            b, s, h = x.shape

            def split(t):
                return t.view(b, s, self.heads, h // self.heads).transpose(1, 2)

            probs = torch.softmax(split(self.q(x)) @ split(self.k(x)).transpose(-1, -2), dim=-1)
            return self.o((probs @ split(self.v(x))).transpose(1, 2).reshape(b, s, h))

    a = _analyze(Bare(), 32)
    (r,) = a.pair_rejections
    assert r.producer == "v" and "is not a site: output head" in r.reason
