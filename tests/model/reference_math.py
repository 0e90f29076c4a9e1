"""A test-only statement of the v1.1 / v2 reference math, written from tessera-v2.md alone.

Independent of :mod:`tessera_model` on purpose: one pixel at a time, float64, explicit
attention (no ``nn.TransformerEncoderLayer``), selection written with the NumPy routines the
reference document names (``linspace``, ``array_split``, ``rint``), statistics copied from the
document. It is slow and only meant for a few dozen pixels.
"""

from __future__ import annotations

import math

import numpy as np

# tessera-v2.md section 2 (v2) and section 6 (v1.1 MPC), band order B04 B02 B03 B08 B8A B05 B06
# B07 B11 B12; S1 [VV, VH].
STATS = {
    "v2": (
        [1633.0042, 1341.1090, 1539.5536, 3054.8269, 3117.4658, 2004.1648, 2694.7275,
         2945.1504, 2266.6079, 1657.3094],
        [1999.4603, 2014.7549, 1929.2201, 1754.2493, 1649.9807, 1936.8988, 1748.6041,
         1708.6991, 1207.5250, 1108.6046],
        [5909.3921, 3405.0322], [1507.1750, 1531.2615],
        [5816.1382, 3277.7576], [1554.6475, 1546.4733],
    ),
    "v1.1": (
        [2683.4553, 2223.3630, 2432.0950, 3633.1970, 3602.1755, 3006.4324, 3400.2710,
         3515.6392, 2456.9163, 1983.8783],
        [2739.5217, 2846.2993, 2690.8250, 2290.0439, 2088.8970, 2673.1106, 2381.4521,
         2229.5225, 1601.0942, 1495.3545],
        [5588.3291, 3025.6270], [1713.4646, 1693.0471],
        [5552.9683, 2955.0520], [1685.5857, 1677.6414],
    ),
}  # fmt: skip


def bin_of(n: int, family: str) -> int:
    if n == 0:
        return 0 if family == "v2" else 8
    for b in range(8, 257, 8):
        if n <= b:
            return b
    return 256


def select(n: int, b: int, family: str) -> np.ndarray:
    """Positions into the list of n valid steps (tessera-v2.md sections 3 and 6)."""
    if n == b:
        return np.arange(n)
    if family == "v2":
        if n > b:
            return np.linspace(0, n - 1, b, dtype=np.int64)
        r = b - n
        if r <= n:
            fill = [c[len(c) // 2] for c in np.array_split(np.arange(n), r)]
        else:
            fill = [i % n for i in range(r)]
        return np.concatenate([np.arange(n), np.array(fill, dtype=np.int64)])
    if n > b:
        return np.array([c[len(c) // 2] for c in np.array_split(np.arange(n), b)])
    e = b - n
    anchors = np.linspace(0, n - 1, num=e + 2, dtype=np.float64)[1:-1]
    extras = np.clip(np.rint(anchors).astype(np.int64), 0, n - 1)
    return np.concatenate([np.arange(n), extras])


def _ln(x: np.ndarray, w: np.ndarray | None, b: np.ndarray | None) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + 1e-5)
    return y if w is None else y * w + b


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def backbone(sd: dict[str, np.ndarray], pre: str, x: np.ndarray, heads: int, family: str):
    """(T, C+1) -> (d,) for one pixel."""
    c = x.shape[1] - 1
    lin = lambda v, k: v @ sd[k + ".weight"].T + sd[k + ".bias"]  # noqa: E731
    h = lin(np.maximum(lin(x[:, :c], pre + "embedding.0"), 0), pre + "embedding.2")
    d = h.shape[1]
    # DOY encoding in float32, as the reference computes it (tessera-v2.md section 1): the
    # frequencies correctly rounded to float32 (a raw DOY up to 366 multiplies any rounding
    # difference of f, so NumPy's own float32 exp, often 1 ulp off, would not do).
    a = np.arange(0, d, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / d)
    f = np.exp(a.astype(np.float64)).astype(np.float32)
    pe = np.zeros(h.shape, np.float32)
    pe[:, 0::2] = np.sin(x[:, c:].astype(np.float32) * f)
    pe[:, 1::2] = np.cos(x[:, c:].astype(np.float32) * f)
    h = h + pe
    n_layers = len({k.split(".")[3] for k in sd if k.startswith(pre + "transformer_encoder")})
    hd = d // heads
    for i in range(n_layers):
        p = f"{pre}transformer_encoder.layers.{i}."
        qkv = h @ sd[p + "self_attn.in_proj_weight"].T + sd[p + "self_attn.in_proj_bias"]
        q, k, v = qkv[:, :d], qkv[:, d : 2 * d], qkv[:, 2 * d :]
        att = []
        for j in range(heads):
            s = slice(j * hd, (j + 1) * hd)
            a = _softmax(q[:, s] @ k[:, s].T / math.sqrt(hd), axis=1)
            att.append(a @ v[:, s])
        o = lin(np.concatenate(att, axis=1), p + "self_attn.out_proj")
        h = _ln(h + o, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        ff = lin(np.maximum(lin(h, p + "linear1"), 0), p + "linear2")
        h = _ln(h + ff, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
    ap = pre + "attn_pool."
    if family == "v2":
        w = _softmax(lin(h, ap + "query"), axis=0)
        return (w * h).sum(0)
    if h.shape[0] == 1:
        return h[0]
    g = ap + "temporal_context.gru_cell."
    W = lambda k: sd[g + k + ".weight"]  # noqa: E731, N806
    hs, states = np.zeros(d), []
    for t in range(h.shape[0]):
        xt = h[t]
        r = _sigmoid(W("W_ir") @ xt + W("W_hr") @ hs + sd[g + "b_r"])
        z = _sigmoid(W("W_iz") @ xt + W("W_hz") @ hs + sd[g + "b_z"])
        ht = np.tanh(W("W_ih") @ xt + W("W_hh") @ (r * hs) + sd[g + "b_h"])
        hs = (1 - z) * hs + z * ht
        states.append(hs)
    ctx = _ln(np.stack(states), sd[ap + "layer_norm.weight"], sd[ap + "layer_norm.bias"])
    w = _softmax(lin(ctx, ap + "query"), axis=0)
    return (w * h).sum(0)


def head(sd: dict[str, np.ndarray], z: np.ndarray, family: str) -> np.ndarray:
    lin = lambda v, k: v @ sd[k + ".weight"].T + sd[k + ".bias"]  # noqa: E731
    y = lin(z, "dim_reducer.0")
    y = np.maximum(_ln(y, sd["dim_reducer.1.weight"], sd["dim_reducer.1.bias"]), 0)
    y = lin(y, "dim_reducer.4")
    return _ln(y, None, None) if family == "v2" else y[:128]


def reference_embed(
    state: dict, family: str, heads: int, s2, s2_valid, s2_doy, s1_asc, s1_asc_doy, s1_desc,
    s1_desc_doy,
) -> np.ndarray:
    """(N, 128) float64, NaN for pixels with no valid step at all. Raw inputs per pixel."""
    sd = {k: v.detach().double().numpy() for k, v in state.items()}
    # Standardisation in float32, as the reference does (tessera-v2.md section 2); the model
    # math after it in float64.
    m2, s2d, ma, sa, md, sdd = (np.asarray(v, np.float32) for v in STATS[family])

    def zscore(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
        return ((x.astype(np.float32) - mean) / std).astype(np.float64)

    out = np.full((s2.shape[0], 128), np.nan)
    for p in range(s2.shape[0]):
        v2 = np.nonzero(s2_valid[p])[0]
        x2_all = np.concatenate([zscore(s2[p, v2], m2, s2d), s2_doy[v2, None].astype(np.float64)], 1)
        va = np.nonzero((s1_asc[p] != 0).any(-1))[0]
        vd = np.nonzero((s1_desc[p] != 0).any(-1))[0]
        x1_all = np.concatenate([
            np.concatenate([zscore(s1_asc[p, va], ma, sa), s1_asc_doy[va, None]], 1),
            np.concatenate([zscore(s1_desc[p, vd], md, sdd), s1_desc_doy[vd, None]], 1),
        ]).astype(np.float64)
        if len(x2_all) == 0 and len(x1_all) == 0:
            continue
        toks = []
        for x_all, nc in ((x2_all, 11), (x1_all, 3)):
            n = len(x_all)
            if n == 0:
                toks.append(np.zeros((max(bin_of(0, family), 1), nc)))
            else:
                toks.append(x_all[select(n, bin_of(n, family), family)])
        z = np.concatenate([
            backbone(sd, "s2_backbone.", toks[0], heads, family),
            backbone(sd, "s1_backbone.", toks[1], heads, family),
        ])
        out[p] = head(sd, z, family)
    return out
