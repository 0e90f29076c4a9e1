"""Temporal-aware attention pooling of TESSERA v1.0 (a hand-written GRU + softmax over time).

The GRU here is **not** :class:`torch.nn.GRU`. Per step, with separate bias-free linear maps
and bias vectors (h0 = 0)::

    r  = sigmoid(W_ir x + W_hr h + b_r)
    z  = sigmoid(W_iz x + W_hz h + b_z)
    h~ = tanh(W_ih x + W_hh (r * h) + b_h)
    h' = (1 - z) * h + z * h~

The pooling weights are ``softmax_T(query(LayerNorm(gru_outputs)))`` and are applied to the
transformer outputs ``x`` (not to the GRU outputs). Reference: Feng et al., "TESSERA"
(arXiv 2506.20380) and its v1.0 code.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tessera_model import cpu_kernels
from tessera_model.int8 import (
    PackedWeight,
    Quantised,
    QuantisedWeight,
    int8_linear,
    linear,
    quantise_rows,
)

Recurrent = tuple[PackedWeight | None, PackedWeight | None]


class GRUCell(nn.Module):
    """One GRU step with the TESSERA parameterisation (see the module docstring).

    State-dict keys: ``b_r, b_z, b_h`` (H,), ``W_ir, W_iz, W_ih`` (H, D) and
    ``W_hr, W_hz, W_hh`` (H, H) ``.weight``.
    """

    def __init__(self, input_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.b_r = nn.Parameter(torch.zeros(hidden_dim))
        self.b_z = nn.Parameter(torch.zeros(hidden_dim))
        self.b_h = nn.Parameter(torch.zeros(hidden_dim))
        self.W_ir = nn.Linear(input_dim, hidden_dim, bias=False)
        self.W_iz = nn.Linear(input_dim, hidden_dim, bias=False)
        self.W_ih = nn.Linear(input_dim, hidden_dim, bias=False)
        self.W_hr = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.W_hz = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.W_hh = nn.Linear(hidden_dim, hidden_dim, bias=False)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        """One step: x (B, D), h (B, H) -> h' (B, H). Reference form, used by tests."""
        r = torch.sigmoid(self.W_ir(x) + self.W_hr(h) + self.b_r)
        z = torch.sigmoid(self.W_iz(x) + self.W_hz(h) + self.b_z)
        h_tilde = torch.tanh(self.W_ih(x) + self.W_hh(r * h) + self.b_h)
        return (1 - z) * h + z * h_tilde

    def scan(
        self, x: Tensor, workspace: dict | None = None,
        q_in: QuantisedWeight | PackedWeight | None = None, rec: Recurrent | None = None,
    ) -> Tensor:  # fmt: skip
        """Run the cell over a sequence from h0 = 0.

        The input projections of all T steps are one matmul; the Python loop runs over T
        only (two small matmuls per step, batched over all pixels). Without autograd every
        step writes into buffers allocated once (no allocation per step): the same ops in the
        same order, so the same values.

        Args:
            x: (B, T, D).
            workspace: buffers by name and shape reused between inference calls (CPU
                inference only; ``None``: allocate).
            q_in: int8 or oneDNN-packed form of the stacked input maps (CPU inference,
                :func:`tessera_model.int8.cpu_weights` key ``gru_in``).
            rec: oneDNN-packed recurrent maps ``(gru_rz, gru_hh2)`` (CPU inference; ``None``
                or ``(None, None)``: ``addmm``).

        Returns:
            (B, T, H) hidden states after each step.
        """
        hd = self.hidden_dim
        w_in = torch.cat([self.W_ir.weight, self.W_iz.weight, self.W_ih.weight], dim=0)
        b_in = torch.cat([self.b_r, self.b_z, self.b_h])
        if not torch.is_grad_enabled() and x.device.type == "cpu":  # no fresh (B, T, 3H)
            ws = {} if workspace is None else workspace
            key = ("gru_in", (x.shape[0], x.shape[1], 3 * hd))
            if key not in ws or ws[key].dtype != x.dtype:
                ws[key] = torch.empty(key[1], dtype=x.dtype, device=x.device)
            gi = linear(x.reshape(-1, x.shape[-1]), w_in, b_in, q_in, ws[key].view(-1, 3 * hd), ws)
            gi = gi.view(key[1])
        else:
            gi = nn.functional.linear(x, w_in, b_in)  # (B, T, 3H): [r | z | h~] input parts
        w_rz_t = torch.cat([self.W_hr.weight, self.W_hz.weight], dim=0).t()
        w_hh_t = self.W_hh.weight.t()
        if not torch.is_grad_enabled() and x.device.type == "cpu":
            if rec is not None and rec[0] is not None and rec[1] is not None:
                return _scan_onednn(gi, rec[0], rec[1], hd, ws)
            return _scan_into_buffers(gi, w_rz_t, w_hh_t, hd, ws)
        # Step 0: h = 0, so every hidden-state matmul vanishes.
        z = torch.sigmoid(gi[:, 0, hd : 2 * hd])
        h = z * torch.tanh(gi[:, 0, 2 * hd :])
        outs = [h]
        # Six fused ops per step (few kernel launches / thread barriers per step).
        for t in range(1, x.shape[1]):
            rz = torch.sigmoid(torch.addmm(gi[:, t, : 2 * hd], h, w_rz_t))
            h_tilde = torch.tanh(torch.addmm(gi[:, t, 2 * hd :], rz[:, :hd] * h, w_hh_t))
            h = torch.lerp(h, h_tilde, rz[:, hd:])  # (1 - z) * h + z * h~
            outs.append(h)
        return torch.stack(outs, dim=1)


def _scan_into_buffers(gi: Tensor, w_rz_t: Tensor, w_hh_t: Tensor, hd: int, ws: dict) -> Tensor:
    """The scan of :meth:`GRUCell.scan` writing each step into preallocated buffers.

    The ops of the autograd form, each written with ``out=`` into buffers allocated once
    (the hidden state of step t is read in place from the output (B, T, H)), except that
    ``tanh(a)`` is computed as ``2 sigmoid(2a) - 1`` (torch's CPU tanh costs about 8x its
    sigmoid; the doubling is folded into the ``addmm`` and is exact): the same values to
    about 1e-7 (``tests/model/test_pooling.py`` holds it to 1e-6).
    """
    b, steps = gi.shape[0], gi.shape[1]

    def buf(name: str, *shape: int) -> Tensor:
        key = (name, shape)
        if key not in ws or ws[key].dtype != gi.dtype:
            ws[key] = torch.empty(shape, dtype=gi.dtype, device=gi.device)
        return ws[key]

    out, rz = buf("gru_out", b, steps, hd), buf("gru_rz", b, 2 * hd)
    rh, h_tilde = buf("gru_rh", b, hd), buf("gru_ht", b, hd)
    torch.sigmoid(gi[:, 0, hd : 2 * hd], out=rh)  # z of step 0 (h0 = 0)
    torch.tanh(gi[:, 0, 2 * hd :], out=h_tilde)
    torch.mul(rh, h_tilde, out=out[:, 0])
    for t in range(1, steps):
        h = out[:, t - 1]
        torch.addmm(gi[:, t, : 2 * hd], h, w_rz_t, out=rz)
        rz.sigmoid_()
        torch.mul(rz[:, :hd], h, out=rh)
        torch.addmm(gi[:, t, 2 * hd :], rh, w_hh_t, beta=2.0, alpha=2.0, out=h_tilde)
        h_tilde.sigmoid_().mul_(2.0).sub_(1.0)  # tanh(a) = 2 sigmoid(2a) - 1
        torch.lerp(h, h_tilde, rz[:, hd:], out=out[:, t])
    return out


def _scan_onednn(gi: Tensor, w_rz: PackedWeight, w_hh2: PackedWeight, hd: int, ws: dict) -> Tensor:
    """:func:`_scan_into_buffers` with each step's two products through oneDNN.

    ``w_rz``: the stacked ``[W_hr; W_hz]``, ``w_hh2``: ``2 W_hh`` (both packed,
    :func:`tessera_model.int8.cpu_weights`); the step input is added in the GEMM's epilogue.
    The h~ pre-activation is doubled before the step loop (``2 gi_h``, exact), so the product
    gives ``2a`` for ``tanh(a) = 2 sigmoid(2a) - 1`` directly, as the ``addmm`` form does.
    """
    b, steps = gi.shape[0], gi.shape[1]
    fused = torch.ops.mkldnn._linear_pointwise.binary
    key = ("gru_out", (b, steps, hd))
    if key not in ws or ws[key].dtype != gi.dtype:
        ws[key] = torch.empty(key[1], dtype=gi.dtype, device=gi.device)
    out = ws[key]
    gh2 = gi[:, :, 2 * hd :].mul(2.0)  # (B, T, H): 2 x the h~ input part
    rz = torch.sigmoid(gi[:, 0, hd : 2 * hd])  # z of step 0 (h0 = 0)
    torch.mul(rz, torch.tanh(gi[:, 0, 2 * hd :]), out=out[:, 0])
    for t in range(1, steps):
        h = out[:, t - 1]
        rz = fused(h, gi[:, t, : 2 * hd], w_rz.weight, None, "add").sigmoid_()
        h_tilde = fused(rz[:, :hd] * h, gh2[:, t], w_hh2.weight, None, "add")
        h_tilde.sigmoid_().mul_(2.0).sub_(1.0)  # tanh(a) = 2 sigmoid(2a) - 1
        torch.lerp(h, h_tilde, rz[:, hd:], out=out[:, t])
    return out


FUSED_SCAN_MAX_DIM = 256
"""Widest GRU (input and hidden width) whose CPU inference runs :func:`scan_time_major`: for
small cells each step's GEMMs are short and their count, not their FLOP, sets the cost, so the
input maps ride inside the step GEMMs (twice the K) and the activations in their epilogues
(``small``, d 64, one thread: 3.8 ms per 256 pixels in 512-pixel chunks against 5.2 for the
precomputed-input scan in 256-pixel chunks). From d 512 (v1, v1.1: 32-pixel chunks, weights of
several MB re-read per step) the doubled K costs more than it saves, and the precomputed input
map of :meth:`GRUCell.scan` stays (v1 152 vs 154 ms, v1.1 371 vs 349 ms per 256 pixels)."""


def fused_scan_weights(cell: GRUCell) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """(weight, bias) of the two step maps of :func:`scan_time_major` for ``cell``.

    ``[W_ir W_hr; W_iz W_hz]`` (2H, D + H) with bias ``[b_r; b_z]`` applied to ``[x_t | h]``,
    and ``[W_ih W_hh]`` (H, D + H) with bias ``b_h`` applied to ``[x_t | r * h]``.
    """
    w = cell
    rz = torch.cat(
        [torch.cat([w.W_ir.weight, w.W_hr.weight], 1), torch.cat([w.W_iz.weight, w.W_hz.weight], 1)]
    )
    hh = torch.cat([w.W_ih.weight, w.W_hh.weight], 1)
    return (rz.detach(), torch.cat([w.b_r, w.b_z]).detach()), (hh.detach(), w.b_h.detach())


def scan_time_major(
    xh: Tensor, hidden: int, w_rz: PackedWeight, w_h: PackedWeight, ws: dict
) -> Tensor:
    """GRU scan (h0 = 0) over a time-major buffer, each step as two fused oneDNN GEMMs.

    ``xh`` (T + 1, B, D + H) holds ``x_t`` in ``xh[t, :, :D]`` (filled by the caller, rows
    contiguous); step t reads ``[x_t | h_{t-1}] = xh[t]`` and writes ``h_t`` into
    ``xh[t + 1, :, D:]``. Per step: ``rz = sigmoid([x_t | h] W_rz^T + b)`` (the activation in
    the GEMM's epilogue), ``r * h`` next to a copy of ``x_t`` in one (B, D + H) buffer,
    ``h~ = tanh([x_t | r h] W_h^T + b_h)`` (epilogue again), ``h' = lerp(h, h~, z)``: four ops,
    no strided step slices, no per-step input map. Weights from :func:`fused_scan_weights`
    (packed, :func:`tessera_model.int8.cpu_weights` keys ``gru_xrz``, ``gru_xh``). The same
    values as :meth:`GRUCell.scan` to float32 rounding (oneDNN's sigmoid and tanh are within
    about 1e-7 of torch's); each pixel's result depends only on its own rows for a given B.

    Returns:
        (T, B, H) view of ``xh`` holding the hidden states after each step.
    """
    steps, b, hd = xh.shape[0] - 1, xh.shape[1], hidden
    dd = xh.shape[2] - hd
    key = ("gru_xrh", (b, dd + hd))
    if key not in ws or ws[key].dtype != xh.dtype:
        ws[key] = torch.empty(key[1], dtype=xh.dtype, device=xh.device)
    xrh = ws[key]
    step = torch.ops.mkldnn._linear_pointwise
    xh[0, :, dd:].zero_()
    for t in range(steps):
        row = xh[t]
        h = row[:, dd:]
        rz = step(row, w_rz.weight, w_rz.bias, "sigmoid", [], "")
        xrh[:, :dd].copy_(row[:, :dd])
        torch.mul(rz[:, :hd], h, out=xrh[:, dd:])
        h_tilde = step(xrh, w_h.weight, w_h.bias, "tanh", [], "")
        torch.lerp(h, h_tilde, rz[:, hd:], out=xh[t + 1, :, dd:])
    return xh[1:, :, dd:]


class TemporalContext(nn.Module):
    """Wraps :class:`GRUCell` under the key prefix ``temporal_context.gru_cell``."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.gru_cell = GRUCell(d_model, d_model)

    def forward(
        self, x: Tensor, workspace: dict | None = None,
        q_in: QuantisedWeight | PackedWeight | None = None, rec: Recurrent | None = None,
    ) -> Tensor:  # fmt: skip
        """x (B, T, D) -> GRU outputs (B, T, D)."""
        return self.gru_cell.scan(x, workspace, q_in, rec)


class TemporalAttentionPooling(nn.Module):
    """Temporal-aware attention pooling: (B, T, D) -> (B, D).

    Keys: ``temporal_context.gru_cell.*``, ``query`` (Linear(D, 1)), ``layer_norm``.
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.temporal_context = TemporalContext(d_model)
        self.query = nn.Linear(d_model, 1)
        self.layer_norm = nn.LayerNorm(d_model)

    def forward(
        self, x: Tensor, workspace: dict | None = None,
        q_in: QuantisedWeight | PackedWeight | None = None, rec: Recurrent | None = None,
    ) -> Tensor:  # fmt: skip
        """Pool transformer outputs.

        Args:
            x: (B, T, D) transformer outputs.
            workspace: CPU inference buffers (:meth:`GRUCell.scan`).
            q_in: int8 or packed GRU input maps (:meth:`GRUCell.scan`).
            rec: packed GRU recurrent maps (:meth:`GRUCell.scan`).

        Returns:
            (B, D) weighted sum over T; for T = 1 the single step itself.
        """
        if x.shape[1] == 1:
            return x[:, 0]
        context = self.temporal_context(x, workspace, q_in, rec)
        scores = self.query(self.layer_norm(context))  # (B, T, 1)
        # softmax in at least float32 (bf16 autocast), float64 stays float64
        weights = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=1)
        weights = weights.to(x.dtype)
        return (weights * x).sum(dim=1)

    def query_constants(self) -> tuple[Tensor, float]:
        """``(a, c)`` with ``query(LayerNorm(h)) = rstd (a . (h - mean)) + c``: ``a`` the query's
        weight times the LayerNorm's (H,) float32, ``c`` the query's bias plus its dot product
        with the LayerNorm's bias (computed in float64)."""
        ln = self.layer_norm
        params = (self.query.weight, self.query.bias, ln.weight, ln.bias)
        stamp = tuple((id(p), p._version) for p in params if p is not None)
        cached = getattr(self, "_query_constants", None)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        w = self.query.weight.detach()[0].double()
        lw = ln.weight.detach().double() if ln.weight is not None else torch.ones_like(w)
        c = float(self.query.bias.detach().double()[0])
        if ln.bias is not None:
            c += float(w @ ln.bias.detach().double())
        value = ((w * lw).float().contiguous(), c)
        object.__setattr__(self, "_query_constants", (stamp, value))
        return value

    def int8_kernel_runs(
        self, w_in: QuantisedWeight, w_rz: QuantisedWeight, w_hh: QuantisedWeight
    ) -> bool:
        """Whether :meth:`forward_int8` runs the compiled kernel (else its torch form, whose
        per-step ops want large batches)."""
        d = self.layer_norm.normalized_shape[0]
        return (
            cpu_kernels.gru_pool_i8_available() and d % 16 == 0
            and w_in.vnni is not None and w_rz.vnni is not None and w_hh.vnni is not None
        )  # fmt: skip

    def forward_int8(
        self, x: Tensor, xq: Quantised | None, w_in: QuantisedWeight, w_rz: QuantisedWeight,
        w_hh: QuantisedWeight, out: Tensor | None = None, ws: dict | None = None,
    ) -> Tensor:  # fmt: skip
        """Int8-dynamic CPU inference form of :meth:`forward`: the GRU's input maps and
        recurrence in int8 (:func:`gru_pool_int8_torch`), through the compiled kernel
        (:func:`tessera_model.cpu_kernels.gru_pool_i8`, which makes the input maps step by
        step, in cache) where it runs and the widths allow, else torch's ops.

        Args:
            x: (B, T, D) float32 transformer outputs.
            xq: their int8 rows (:data:`tessera_model.int8.Quantised`, (B T, D)), or ``None``
                (then quantised here).
            w_in, w_rz, w_hh: int8 ``[W_ir; W_iz; W_ih]`` (with the biases), ``[W_hr; W_hz]``
                and ``W_hh`` (:mod:`tessera_model.int8` keys ``gru_in``, ``gru_i8_rz``,
                ``gru_i8_hh``).
            out: optional (B, D) float32 buffer.
            ws: optional workspace (the torch form's input maps).

        Returns:
            (B, D); for T = 1 the single step itself.
        """
        b, t, d = x.shape
        out = torch.empty(b, d, dtype=x.dtype) if out is None else out
        if t == 1:
            return out.copy_(x[:, 0])
        a, c = self.query_constants()
        eps = self.layer_norm.eps
        flat = x.reshape(b * t, d)
        xq = quantise_rows(flat) if xq is None else xq
        if (
            self.int8_kernel_runs(w_in, w_rz, w_hh)
            and x.is_contiguous() and out.is_contiguous() and xq[0].is_contiguous()
        ):  # fmt: skip
            ins = (w_in.vnni, w_in.comp, w_in.scale, w_in.bias)
            rec = ((w_rz.vnni, w_rz.comp, w_rz.scale), (w_hh.vnni, w_hh.comp, w_hh.scale))
            return cpu_kernels.gru_pool_i8(xq, x, ins, *rec, a, c, eps, out)  # type: ignore[arg-type]
        gi = int8_linear(None, w_in, None, ws, xq=xq).view(b, t, -1)
        return out.copy_(gru_pool_int8_torch(gi, x, w_rz, w_hh, a, c, eps))

    def scan_buffer(self, ws: dict, batch: int, steps: int, like: Tensor) -> Tensor:
        """The (T + 1, B, D + H) buffer of :meth:`forward_time_major`; fill ``[:T, :, :D]``."""
        d = self.layer_norm.normalized_shape[0]
        key = ("gru_scan", (steps + 1, batch, 2 * d))
        if key not in ws or ws[key].dtype != like.dtype:
            ws[key] = torch.empty(key[1], dtype=like.dtype, device=like.device)
        return ws[key]

    def forward_time_major(
        self, xh: Tensor, ws: dict, w_rz: PackedWeight, w_h: PackedWeight
    ) -> Tensor:
        """CPU inference form of :meth:`forward` for T >= 2 on a time-major buffer.

        Args:
            xh: :meth:`scan_buffer`, the transformer outputs of step t in ``xh[t, :, :D]``.
            ws: workspace (buffers reused across chunks).
            w_rz, w_h: packed :func:`fused_scan_weights` (:func:`scan_time_major`).

        Returns:
            (B, D) weighted sum over T, the same as :meth:`forward` to float32 rounding.
        """
        steps = xh.shape[0] - 1
        d = self.layer_norm.normalized_shape[0]
        states = scan_time_major(xh, d, w_rz, w_h, ws)  # (T, B, H), rows of stride D + H
        ln = self.layer_norm
        if cpu_kernels.available() and xh.dtype == torch.float32:
            # the compiled LayerNorm on a contiguous copy: 0.37 against 0.94 ms for torch's
            # on the strided states of a 512-pixel small chunk (one thread)
            key = ("gru_normed", (steps * xh.shape[1], d))
            if key not in ws:
                ws[key] = torch.empty(key[1], dtype=xh.dtype)
            normed = ws[key]
            normed.view(states.shape).copy_(states)
            cpu_kernels.layer_norm(normed, ln.weight, ln.bias, ln.eps, out=normed)
        else:
            normed = nn.functional.layer_norm(states, (d,), ln.weight, ln.bias, ln.eps)
        scores = torch.addmm(self.query.bias, normed.view(-1, d), self.query.weight.t())
        weights = torch.softmax(scores.view(steps, -1).t(), dim=1)  # (B, T)
        x = xh[:steps, :, :d].transpose(0, 1)  # (B, T, D), strided
        return torch.bmm(weights.unsqueeze(1), x).squeeze(1)


def gru_pool_int8_torch(
    gi: Tensor, x: Tensor, w_rz: QuantisedWeight, w_hh: QuantisedWeight, a: Tensor, c: float,
    eps: float,
) -> Tensor:  # fmt: skip
    """The int8-dynamic GRU recurrence and pooling in torch's ops (``kernels/gru_i8.c``'s math).

    Per step t > 0 the hidden state's rows are quantised (:func:`tessera_model.int8.
    quantise_rows`) and multiplied by the int8 ``[W_hr; W_hz]``; the rows of ``r * h`` likewise
    by the int8 ``W_hh`` (exact integer sums, then the two scales); activations, the state
    update and the pooling stay float32. ``tanh(a) = 2 sigmoid(2a) - 1`` and the LayerNorm and
    query as ``rstd (a . (h - mean)) + c`` (:meth:`TemporalAttentionPooling.query_constants`),
    as the kernel computes them.

    Args:
        gi: (B, T, 3H) input maps with biases; x: (B, T, D); w_rz, w_hh: int8 weights;
        a, c, eps: the query constants and the LayerNorm's epsilon.

    Returns:
        (B, D) float32.
    """
    b, t, h3 = gi.shape
    hd = h3 // 3
    states = torch.empty(b, t, hd, dtype=torch.float32)
    h = torch.sigmoid(gi[:, 0, hd : 2 * hd]) * _tanh(gi[:, 0, 2 * hd :])
    states[:, 0] = h
    for s in range(1, t):
        g = gi[:, s]
        q, sc = quantise_rows(h)
        # exact integer sums, then the scales
        rz = torch._int_mm(q, w_rz.wq_t).float().mul_(w_rz.scale).mul_(sc)
        rz = rz.add_(g[:, : 2 * hd]).sigmoid_()
        q, sc = quantise_rows(rz[:, :hd] * h)
        h_tilde = torch._int_mm(q, w_hh.wq_t).float().mul_(w_hh.scale).mul_(sc)
        h_tilde = _tanh(h_tilde.add_(g[:, 2 * hd :]))
        h = torch.addcmul(h, rz[:, hd:], h_tilde.sub_(h))
        states[:, s] = h
    centred = states - states.mean(dim=2, keepdim=True)
    rstd = torch.rsqrt((centred * centred).mean(dim=2) + eps)
    scores = rstd * (centred @ a) + c
    weights = torch.softmax(scores, dim=1)
    return torch.bmm(weights.unsqueeze(1), x).squeeze(1)


def _tanh(x: Tensor) -> Tensor:
    """``tanh(x) = 2 sigmoid(2x) - 1`` (the kernel's form)."""
    return torch.sigmoid(2.0 * x).mul_(2.0).sub_(1.0)
