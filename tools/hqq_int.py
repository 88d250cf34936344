"""Issue 30's peer "HQQ with integer zero points", measured on a model's own weights before building it.

    python tools/hqq_int.py                       # SmolLM2; 4-bit block 128, 3-bit block 128, 2-bit block 32 asym
    python tools/hqq_int.py --model minilm --settings 4-32

HQQ (Badri & Shaji, 2023) keeps each group's scale from its range and moves its *zero point* to minimise the group's
``l_p`` error (p = 0.7), by half-quadratic splitting: ``q = Q(W / s + z)``, ``W_e = shrink_p(W - (q - z) s, beta)``,
``z = mean(q - (W - W_e) / s)``, ``beta *= kappa`` (the reference's defaults: beta 10, kappa 1.01, 20 iterations;
here each group stops at its first step that does not lower its ``l_p`` error and keeps its best iterate). Its
zero point is a float: ONNX Runtime's HQQ writes float zero points, which MatMulNBits runs about 4x slower at a
token step than ``uint8`` ones. Rounding the zero point to an integer code is the fast form. This tool prints, per
setting, over every linear weight of the model (embeddings and the head left out), the squared and ``l_0.7``
errors against plain RTN's (on ``grid.py``'s grid) of:

- ``hqq (float z)``: HQQ's zero points as they come (ORT's form);
- ``hqq (integer z)``: the same, rounded to the nearest code;
- ``best integer z``: each group's integer zero point within one code of RTN's with the least squared error
  (what any integer-zero-point search around HQQ's could reach with the range's scale);

and the share of zero points the integer forms change.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qcompiler.algorithms.grid import F32, dequantize, fit_grid, quantize_codes  # noqa: E402

P, BETA, KAPPA, ITERS = 0.7, 10.0, 1.01, 20


def _shrink(x: np.ndarray, beta: float) -> np.ndarray:
    """HQQ's ``shrink_lp_op``: the proximal step of ``|x|^p / beta``."""
    ax = np.abs(x)
    with np.errstate(divide="ignore"):
        thr = np.where(ax > 0, ax ** (P - 1), np.inf) / beta
    return np.sign(x) * np.maximum(ax - thr, 0.0)


def hqq_zero(w: np.ndarray, bits: int, block: int, iters: int = ITERS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(scales, rtn zero points, HQQ's float zero points)`` of ``w`` ``[K, N]`` (K a multiple of ``block``)."""
    k, n = w.shape
    qmax = float((1 << bits) - 1)
    scales, z0 = fit_grid(w, bits, block, False)
    wb = w.astype(np.float64).reshape(k // block, block, n)
    s = scales.astype(np.float64)[:, None, :]
    safe = np.where(s != 0, s, 1.0)

    def lp(z: np.ndarray) -> np.ndarray:
        q = np.clip(np.round(wb / safe + z), 0, qmax)
        return (np.abs(wb - (q - z) * s) ** P).sum(axis=1)

    z = z0.astype(np.float64)[:, None, :]
    best_z, best = z.copy(), lp(z)
    running, beta = np.ones(best.shape, dtype=bool), BETA
    for _ in range(iters):
        q = np.clip(np.round(wb / safe + z), 0, qmax)
        w_e = _shrink(wb - (q - z) * s, beta)
        z = np.where(running[:, None] & (s != 0), (q - (wb - w_e) / safe).mean(axis=1, keepdims=True), z)
        beta *= KAPPA
        err = lp(z)
        better = running & (err < best)
        best, best_z = np.where(better, err, best), np.where(better[:, None], z, best_z)
        running &= better
        if not running.any():
            break
    return scales, z0, best_z[:, 0]


def _errors(w: np.ndarray, w_hat: np.ndarray) -> tuple[float, float]:
    d = np.abs(w_hat.astype(np.float64) - w)
    return float((d ** 2).sum()), float((d ** P).sum())


def forms(w: np.ndarray, bits: int, block: int) -> dict[str, tuple[float, float, int]]:
    """Per form: (squared error, l_p error, zero points changed from RTN's)."""
    qmax = (1 << bits) - 1
    scales, z0, zf = hqq_zero(w, bits, block)
    rows = np.arange(w.shape[0]) // block
    out = {"rtn": (*_errors(w, dequantize(quantize_codes(w, scales, z0, bits, block), scales, z0, block)), 0)}
    q = np.clip(np.round(w / np.where(scales != 0, scales, 1)[rows] + zf[rows]), 0, qmax)
    out["hqq (float z)"] = (*_errors(w, (q - zf[rows]) * scales[rows]), int(np.sum(zf != z0)))
    zi = np.clip(np.round(zf), 0, qmax).astype(np.uint8)
    out["hqq (integer z)"] = (*_errors(w, dequantize(quantize_codes(w, scales, zi, bits, block), scales, zi, block)),
                              int(np.sum(zi != z0)))
    best, best_err = z0.copy(), None
    for dz in (0, -1, 1):
        z = np.clip(z0.astype(int) + dz, 0, qmax).astype(np.uint8)
        e = ((dequantize(quantize_codes(w, scales, z, bits, block), scales, z, block) - w) ** 2)
        g = e.reshape(-1, block, w.shape[1]).sum(axis=1)
        if best_err is None:
            best_err = g
        else:
            take = g < best_err
            best_err, best = np.where(take, g, best_err), np.where(take, z, best)
    out["best integer z"] = (*_errors(w, dequantize(quantize_codes(w, scales, best, bits, block), scales, best, block)),
                             int(np.sum(best != z0)))
    return out


def linear_weights(folder: Path):
    """``(name, [K, N] float32)`` of every 2-D weight of the checkpoint but embeddings and the head."""
    from safetensors.numpy import load_file

    for f in sorted(folder.glob("*.safetensors")):
        for name, t in load_file(str(f)).items():
            if t.ndim == 2 and name.endswith(".weight") and not any(x in name for x in ("embed", "lm_head")):
                yield name, np.ascontiguousarray(t.T.astype(F32))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="a Hugging Face folder or a bundled name")
    ap.add_argument("--settings", default="4-128,3-128,2-32", help="BITS-BLOCK,... (asymmetric grids)")
    args = ap.parse_args(argv)
    from qcompiler.frontends.bundled import bundled_path

    folder = Path(args.model) if Path(args.model).is_dir() else Path(bundled_path(args.model))
    weights = list(linear_weights(folder))
    print(f"{len(weights)} weights of {folder.name}; errors relative to RTN's\n")
    print("| setting | form | squared error | l_0.7 error | zero points changed |\n|---|---|---|---|---|")
    for setting in args.settings.split(","):
        bits, block = (int(x) for x in setting.split("-"))
        tot: dict[str, list[float]] = {}
        groups = 0
        for _, w in weights:
            if w.shape[0] % block:
                continue
            groups += w.shape[0] // block * w.shape[1]
            for form, vals in forms(w, bits, block).items():
                acc = tot.setdefault(form, [0.0, 0.0, 0.0])
                for i, v in enumerate(vals):
                    acc[i] += v
        rtn = tot["rtn"]
        for form, (sq, lp, changed) in tot.items():
            if form != "rtn":
                print(f"| {bits}-bit block {block} asym | {form} | {sq / rtn[0]:.4f} | {lp / rtn[1]:.4f} | "
                      f"{changed / groups:.2%} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
