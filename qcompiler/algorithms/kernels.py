"""CPU kernels (numba) for the loops that torch or numpy run as many small calls: where a learner or a solver
spends its time on a CPU. Each has a torch (or numpy) reference that the GPU runs and the tests compare with.

**The fake quantizer** (``forward``, ``backward``): ``fakequant``'s torch code makes about twenty passes over a
learner's weight per step (each elementwise op, its temporary and its reduction a pass of its own), and on a CPU
those passes cost more than the block products they sit between. These kernels compute the same formulas in two
passes each, per group of rows, with the columns innermost (contiguous, so the loops vectorise): the forward's
codes are bit-identical to torch's (the same IEEE operations in the array's own precision); the backward's
per-group sums are accumulated in another order, so its gradient agrees to rounding. The arrays are
``[groups, group, X]`` (``fakequant.blocked``'s layout); every scalar is passed in the arrays' dtype so that no
operation is promoted to float64 on a float32 weight.

**Small inverses** (``inverse``): the learners invert their ``b x b`` blocks (64 wide) at every step, and
LAPACK's batched path costs about 100 us a block there in float32, most of it per-call work; Gauss-Jordan
elimination with partial pivoting in one loop costs about 0.4x that, as accurate.

``available()`` is false when numba cannot be imported; the callers then keep their torch code (on a GPU they
always do). The loops run from index 0 wherever they can: numba does not vectorise a loop whose start could be
negative. ``error_model="numpy"``: a division is IEEE's, with no zero check in the loop."""

from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; the torch code is the fallback
    numba = None


def available() -> bool:
    return numba is not None


def _jit(f):
    return numba.njit(cache=True, nogil=True, error_model="numpy")(f) if numba is not None else f


@_jit
def _grid_row(mx, mn, scale, zero, qmax, mid, sym, c0, c1):
    """One group's (scale, zero) per column from its max and min, as ``fakequant._grid``."""
    for x in range(mx.shape[0]):
        if sym:
            s = (mx[x] if abs(mx[x]) > abs(mn[x]) else mn[x]) / -mid
            scale[x] = s
            zero[x] = mid
        else:
            hi = mx[x] if mx[x] > c0 else c0
            lo = mn[x] if mn[x] < c0 else c0
            s = (hi - lo) / qmax
            safe = s if s != c0 else c1
            z = np.rint(-lo / safe)
            scale[x] = s
            zero[x] = min(max(z, c0), qmax)


@_jit
def forward(wb, qmax, mid, sym, hat, mx, mn, scale, zero):
    """``hat = (clamp(round(w / s + z), 0, qmax) - z) * s`` per group; fills ``mx, mn, scale, zero``
    (``[groups, X]``) for the backward."""
    c0 = qmax - qmax
    c1 = c0 + qmax / qmax
    groups, rows, width = wb.shape
    for a in range(groups):
        hi, lo = mx[a], mn[a]
        hi[:] = wb[a, 0]
        lo[:] = wb[a, 0]
        for r in range(1, rows):
            w_row = wb[a, r]
            for x in range(width):
                v = w_row[x]
                hi[x] = v if v > hi[x] else hi[x]
                lo[x] = v if v < lo[x] else lo[x]
        _grid_row(hi, lo, scale[a], zero[a], qmax, mid, sym, c0, c1)
        s_row, z_row = scale[a], zero[a]
        for r in range(rows):
            w_row, h_row = wb[a, r], hat[a, r]
            for x in range(width):
                s = s_row[x]
                safe = s if s != c0 else c1
                u = np.rint(w_row[x] / safe + z_row[x])
                u = u if u > c0 else c0
                d = u if u < qmax else qmax
                h_row[x] = (d - z_row[x]) * s


@_jit
def backward(g, wb, mx, mn, scale, zero, qmax, mid, sym, out):
    """``out = d(sum(g * hat))/d(wb)``: ``fakequant._ste_backward``'s gradient (round passed straight
    through, clamp's where it passes, the scale's and zero point's through the group's max and min, shared
    among tied extremes)."""
    c0 = qmax - qmax
    c1 = c0 + qmax / qmax
    groups, rows, width = wb.shape
    s_gd = np.empty(width, wb.dtype)   # sum(g * (q - z))
    s_ow = np.empty(width, wb.dtype)   # sum(out * w)
    s_o = np.empty(width, wb.dtype)    # sum(out)
    s_g = np.empty(width, wb.dtype)    # sum(g)
    n_hi = np.empty(width, wb.dtype)   # elements equal to the max
    n_lo = np.empty(width, wb.dtype)
    g_hi = np.empty(width, wb.dtype)   # the max's gradient, per tied element
    g_lo = np.empty(width, wb.dtype)
    for a in range(groups):
        hi, lo, s_row, z_row = mx[a], mn[a], scale[a], zero[a]
        for x in range(width):
            s_gd[x] = c0
            s_ow[x] = c0
            s_o[x] = c0
            s_g[x] = c0
            n_hi[x] = c0
            n_lo[x] = c0
        for r in range(rows):
            w_row, g_row, o_row = wb[a, r], g[a, r], out[a, r]
            for x in range(width):
                s = s_row[x]
                safe = s if s != c0 else c1
                w = w_row[x]
                gv = g_row[x]
                u = np.rint(w / safe + z_row[x])
                d = u if u > c0 else c0
                d = d if d < qmax else qmax
                o = gv if (d == u and s != c0) else c0
                o_row[x] = o
                s_gd[x] += gv * (d - z_row[x])
                s_ow[x] += o * w
                s_o[x] += o
                s_g[x] += gv
                n_hi[x] += c1 if w == hi[x] else c0
                n_lo[x] += c1 if w == lo[x] else c0
        for x in range(width):
            s = s_row[x]
            safe = s if s != c0 else c1
            g_scale = s_gd[x] - s_ow[x] / safe
            if sym:
                g_ext = g_scale / -mid
                if abs(hi[x]) > abs(lo[x]):
                    g_hi[x] = g_ext
                    g_lo[x] = c0
                else:
                    g_hi[x] = c0
                    g_lo[x] = g_ext
            else:
                lo0 = lo[x] if lo[x] < c0 else c0
                g_zero = (s_o[x] - s_g[x]) * s
                z_raw = np.rint(-lo0 / safe)
                if not (z_raw >= c0 and z_raw <= qmax):
                    g_zero = c0
                if s != c0:
                    g_scale = g_scale + g_zero * lo0 / (safe * safe)
                g_hi[x] = g_scale / qmax if hi[x] >= c0 else c0
                g_lo[x] = -g_scale / qmax - g_zero / safe if lo[x] <= c0 else c0
            g_hi[x] = g_hi[x] / n_hi[x]
            g_lo[x] = g_lo[x] / n_lo[x]
        for r in range(rows):
            w_row, o_row = wb[a, r], out[a, r]
            for x in range(width):
                w = w_row[x]
                o = o_row[x]
                o = o + g_hi[x] if w == hi[x] else o
                o = o + g_lo[x] if w == lo[x] else o
                o_row[x] = o


@_jit
def inverse(m, out):
    """``out[i] = m[i]^-1`` for a batch ``[B, n, n]`` (Gauss-Jordan on ``[M | I]``, partial pivoting; a singular
    block gives non-finite values, which the learners treat as a stop)."""
    batch, n, _ = m.shape
    aug = np.empty((n, 2 * n), m.dtype)
    piv_row = np.empty(2 * n, m.dtype)
    for t in range(batch):
        aug[:, :n] = m[t]
        aug[:, n:] = 0
        for i in range(n):
            aug[i, n + i] = 1
        for k in range(n):
            p = k
            best = abs(aug[k, k])
            for i in range(k + 1, n):
                v = abs(aug[i, k])
                if v > best:
                    best = v
                    p = i
            # loops from column 0, where the pivot row holds zeros already: a loop from a variable start is
            # not vectorised (numba cannot rule out a negative index), and this one is
            inv = 1 / aug[p, k]
            for j in range(2 * n):  # the pivot row, scaled, kept apart (no aliasing in the loop below)
                piv_row[j] = aug[p, j] * inv
            if p != k:
                for j in range(2 * n):
                    aug[p, j] = aug[k, j]
            for j in range(2 * n):
                aug[k, j] = piv_row[j]
            for i in range(n):
                if i != k:
                    f = aug[i, k]
                    row = aug[i]
                    for j in range(2 * n):
                        row[j] -= f * piv_row[j]
        out[t] = aug[:, n:]


@_jit
def refine_pass(codes, step, h_cols, grad_t, live, qmax):
    """One pass of ``gptq.refine``'s coordinate descent over the rows ``r`` of ``codes`` (``[K, N]``, uint8):
    each code moves by one step where that lowers the objective, and the moved column's gradient (``grad_t``,
    ``[N, K]``) takes ``delta * H[:, r]`` (``h_cols[r]``). The same operations as the numpy loop, in its order.
    Returns the moves made."""
    k, n = codes.shape
    moved = 0
    for r in range(k):
        if not live[r]:
            continue
        hr = h_cols[r, r]
        hc = h_cols[r]
        for c in range(n):
            st = step[r, c]
            g = grad_t[c, r]
            gain_up = st * st * hr + 2 * st * g
            gain_dn = st * st * hr - 2 * st * g
            cr = codes[r, c]
            if gain_up < 0 and cr < qmax and gain_up <= gain_dn:
                codes[r, c] = cr + 1
                delta = st
            elif gain_dn < 0 and cr > 0:
                codes[r, c] = cr - 1
                delta = -st
            else:
                continue
            moved += 1
            gc = grad_t[c]
            for j in range(k):
                gc[j] += delta * hc[j]
    return moved


# ---- the rows of one lazy block of the GPTQ loop, with their rounder: gptq._numpy_rows and the round_row closures
# of gptq.solve_rows / solve_columns, in float32 on the grid of grid.py (ONNX Runtime's), bit for bit

STATIC, FIT_ROWS, COLUMNS = 0, 1, 2  # rows with groups fitted up front (act-order); rows fitted at a group's
# first row; columns (a pair's first factor: each sequential row a column of A, fitted along its own groups)


@_jit
def _round_away(x):
    t = np.trunc(x)
    frac = x - t
    if abs(frac) >= 0.5:
        return t + np.sign(x)
    return t


@_jit
def _fit(x, bits, sym):
    """grid.fit_grid of one group's float32 values: (scale, zero point)."""
    mx = x[0]
    mn = x[0]
    for v in x[1:]:
        mx = max(mx, v)
        mn = min(mn, v)
    if sym:
        mid = np.float32(1 << (bits - 1))
        extreme = mx if abs(mx) > abs(mn) else mn
        return np.float32(extreme / -mid), np.float32(mid)
    qmax = np.float32((1 << bits) - 1)
    mn = min(mn, np.float32(0))
    mx = max(mx, np.float32(0))
    s = np.float32((mx - mn) / qmax)
    zp = np.float32(np.float32(0) - mn / s) if s != 0 else mn
    return s, np.float32(min(max(_round_away(zp), np.float32(0)), qmax))


@_jit
def _code(v, recip, zero, qmax):
    """grid.row_codes of one value: clamp(roundf(v * recip + zero), 0, qmax), as float32."""
    y = v * recip + zero
    if y < 0:
        return np.float32(0)
    t = np.floor(y)
    c = t + np.float32(1) if y - t >= np.float32(0.5) else t
    return min(c, qmax)


@_jit
def _recip(s):
    return np.float32(1) / s if s != 0 else np.float32(0)


@_jit
def _fit_search(x, bits, sym, ratios, scaled):
    """grid.fit_grid_search of one group (``ratios`` float32, 1.0 first; empty: fit_grid): the ratio whose
    grid gives the smallest float32 sum of squared rounding errors, the earliest on a tie."""
    if ratios.shape[0] == 0:
        return _fit(x, bits, sym)
    qmax = np.float32((1 << bits) - 1)
    best_s, best_z, best_e = np.float32(0), np.float32(0), np.float32(np.inf)
    for r in ratios:
        for j in range(x.shape[0]):
            scaled[j] = x[j] * r
        s, z = _fit(scaled[:x.shape[0]], bits, sym)
        rc = _recip(s)
        e = np.float32(0)
        for v in x:
            d = (_code(v, rc, z, qmax) - z) * s - v
            e += d * d
        if e < best_e:
            best_s, best_z, best_e = s, z, e
    return best_s, best_z


@_jit
def sequential_block(w1, err, u1, p1, has_p, i1, mode, order, g, bits, sym, ratios, scales, zps, codes):
    """``gptq._numpy_rows`` with its rounder: one lazy block's rows ``i1 .. i1 + B`` (sequential order; ``w1``
    ``[B, N]`` float64, modified; ``err`` takes the scaled errors), each rounded in place on the grid. ``mode``
    STATIC / FIT_ROWS (``scales``, ``zps`` ``[groups, N]``, ``codes`` ``[K, N]``, row ``order[i]``) or COLUMNS
    (``[groups, C]``, ``[K, C]``: row ``i`` is column ``order[i]`` of the grid)."""
    b, n = w1.shape
    qmax = np.float32((1 << bits) - 1)
    row = np.empty(n, np.float64)
    q = np.empty(n, np.float64)
    vec = np.empty(n, np.float32)
    scaled = np.empty(max(g, n), np.float32)
    col = np.empty(g, np.float32)
    for i in range(b):
        at = i
        orig = order[i1 + i]
        for c in range(n):
            row[c] = w1[i, c]
        if mode == COLUMNS:
            for c in range(n):
                vec[c] = np.float32(w1[i, c])
            for a in range(0, n, g):
                e = min(a + g, n)
                s, z = _fit_search(vec[a:e], bits, sym, ratios, scaled)
                scales[a // g, orig] = s
                zps[a // g, orig] = np.uint8(z)
                rc = _recip(s)
                for c in range(a, e):
                    code = _code(vec[c], rc, z, qmax)
                    codes[c, orig] = np.uint8(code)
                    q[c] = np.float64((code - z) * s)
        else:
            grp = orig // g
            if mode == FIT_ROWS and orig % g == 0:
                rows = min(g, b - at)
                for c in range(n):
                    for j in range(rows):
                        col[j] = np.float32(w1[at + j, c])
                    s, z = _fit_search(col[:rows], bits, sym, ratios, scaled)
                    scales[grp, c] = s
                    zps[grp, c] = np.uint8(z)
            for c in range(n):
                s = scales[grp, c]
                z = np.float32(zps[grp, c])
                code = _code(np.float32(w1[at, c]), _recip(s), z, qmax)
                codes[orig, c] = np.uint8(code)
                q[c] = np.float64((code - z) * s)
        d = u1[i, i]
        for c in range(n):
            err[i, c] = (row[c] - q[c]) / d
        for j in range(i, b):
            uij = u1[i, j]
            for c in range(n):
                w1[j, c] -= uij * err[i, c]
        if has_p:
            for j in range(i, b):
                pij = p1[i, j]
                for c in range(n):
                    w1[j, c] += pij * row[c]
        for c in range(n):
            w1[i, c] = q[c]
