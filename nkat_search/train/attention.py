"""The fused NKAT attention core: one threshold per row from k row reductions, no sort, no topk.

Same definition as ``NKATAttention.attend`` (MISSION.md sec. 2): logits / temperature; keep the
entries with fewer than ``top_k`` strictly larger logits (ties with the k-th value kept); nucleus
on the softmax of the kept logits (an entry stays iff the kept probability mass strictly above it
is below ``top_p``; the top entry always stays; ties go together); softmax; attention dropout.
The per-row modulation is a factor on the output rows, applied by the caller.

Why it is written this way. ``torch.topk`` over rows of 257 logits does not fuse with anything,
and building the mask with it was most of the 257-token model's attention time (one layer, embed
448, forward + backward, compiled, on an H200: 28.6 ms; 23.7 ms with the same mask handed to
SDPA). Both filters only ever cut a row at one logit value, so the filter is a per-row threshold,
found on the distinct values from the top: level i has value m_i (the largest value below
m_{i-1}) and count c_i; it is kept by the top-k iff fewer than k entries lie above it, and by the
nucleus iff the kept mass above it, sum_{j<i} c_j exp(m_j - m_0) / Z, is below p. ``top_k`` levels
need 2 * top_k row reductions and nothing else. Under ``torch.compile`` Inductor fuses them, the
masked softmax and the dropout into one persistent-reduction kernel (the row in registers), and
the backward into one more; ``benchmarks/attention_codegen.py`` lists the kernels and
``benchmarks/attention_notes.md`` the bytes.

The autograd.Function keeps the bf16 logits, the dropout mask and the bf16 weights for backward
(5 bytes per logit; the explicit path's compiled graph keeps 6, plus topk's buffers) and
recomputes the probabilities from the logits and two per-row scalars (threshold, log-sum-exp).
"""

from __future__ import annotations

import torch
from torch import Tensor

# The level loop grows by two row reductions per level. With top_k off (or >= the row) and the
# nucleus on it needs one level per distinct value, up to the row length, where a sort is the
# better tool: configurations past this many levels stay on the explicit path. None of the
# searched ones (top_k 4..8) gets near it; the limit itself is not measured.
FUSED_MAX_LEVELS = 16


def nucleus_on(top_p: float | Tensor) -> bool:
    """Whether the nucleus filter is on: a float below 1, or any tensor.

    A tensor is a trial's value kept in a buffer (``NKATAttention``), so that compiled graphs take
    it as an input instead of a constant; a filter that is off is passed as the float 1.0 (on or
    off changes the graph's structure anyway).
    """
    return isinstance(top_p, Tensor) or top_p < 1.0


def dropout_on(dropout_p: float | Tensor) -> bool:
    """Whether dropout is on: a float above 0, or any tensor (as ``nucleus_on``; off is 0.0)."""
    return isinstance(dropout_p, Tensor) or dropout_p > 0


def filter_levels(top_k: int, top_p: float | Tensor, n: int) -> int:
    """How many value levels the threshold search walks for rows of ``n`` logits (0: no filter)."""
    return level_count(top_k, nucleus_on(top_p), n)


def level_count(top_k: int, nucleus: bool, n: int) -> int:
    """``filter_levels`` with the nucleus given as on or off."""
    if 0 < top_k < n:
        return top_k
    return n if nucleus else 0


def row_filter(scores: Tensor, top_k: int, top_p: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row ``(threshold, row_max, mass)`` of the top-k then nucleus filter, all float32 (..., 1).

    The kept entries are ``scores >= threshold``; their softmax weights are
    ``exp(scores - row_max) / mass``. ``scores`` is not differentiated through (the filter is a
    selection). Exact ties are one level, so they are kept or dropped together, as the definition
    says; shapes never depend on the data (``torch.compile`` and CUDA graphs friendly). ``top_p``
    is a float or a 0-dim tensor (``nucleus_on``).
    """
    s = scores.detach().float()
    n = s.shape[-1]
    topk_on = 0 < top_k < n
    nucleus = nucleus_on(top_p)
    row_max = s.amax(dim=-1, keepdim=True)
    if not topk_on and not nucleus:
        threshold = torch.full_like(row_max, float("-inf"))
        return threshold, row_max, (s - row_max).exp().sum(dim=-1, keepdim=True)
    neg_inf = torch.full((), float("-inf"), dtype=s.dtype, device=s.device)
    level = row_max
    above = torch.zeros_like(row_max, dtype=torch.int32)  # entries strictly above ``level``
    values, kept_levels, masses = [], [], []
    for i in range(filter_levels(top_k, top_p, n)):
        if i:
            level = torch.where(s < level, s, neg_inf).amax(dim=-1, keepdim=True)
        count = (s == level).sum(dim=-1, keepdim=True, dtype=torch.int32)
        # count == 0: the row has fewer distinct values than levels; nothing left to keep.
        kept = (count > 0) & (above < top_k) if topk_on else count > 0
        values.append(level)
        kept_levels.append(kept)
        masses.append(torch.where(kept, count * (level - row_max).exp(), 0.0))
        above = above + count
    topk_mass = sum(masses[1:], masses[0])
    threshold = row_max
    if not nucleus:
        # The kept levels are a prefix; the threshold is the lowest kept value.
        for value, kept in zip(values[1:], kept_levels[1:]):
            threshold = torch.where(kept, value, threshold)
        return threshold, row_max, topk_mass
    mass = above_mass = masses[0]
    for value, kept, level_mass in zip(values[1:], kept_levels[1:], masses[1:]):
        # Mass above a level only grows down the row, so the nucleus is a prefix of the levels too.
        keep = kept & (above_mass / topk_mass < top_p)
        threshold = torch.where(keep, value, threshold)
        mass = mass + torch.where(keep, level_mass, 0.0)
        above_mass = above_mass + level_mass
    return threshold, row_max, mass


def topk_nucleus_threshold(logits: Tensor, top_k: int, top_p: float | Tensor) -> Tensor:
    """The filter's per-row logit threshold (float32, (..., 1)): keep ``logits >= threshold``."""
    return row_filter(logits, top_k, top_p)[0]


class _NKATCore(torch.autograd.Function):
    """``dropout(softmax(filter(q k^T * scale))) @ v`` with a hand-written backward.

    Backward recomputes the probabilities ``P`` from the saved logits and per-row scalars, then
    ``dS = P * (dP - rowsum(P * dP))`` with ``dP = dW * dropout_mask / (1 - p)`` (the masked
    softmax's gradient: filtered entries have P = 0 and get none). ``scale``, ``top_p`` and
    ``dropout_p`` are floats or 0-dim tensors (``nucleus_on``, ``dropout_on``).
    """

    @staticmethod
    def forward(ctx, q, k, v, scale, top_k: int, top_p, dropout_p):
        logits = q @ k.transpose(-2, -1)
        scores = logits.float() * scale
        threshold, row_max, mass = row_filter(scores, top_k, top_p)
        probs = torch.where(scores >= threshold, (scores - row_max).exp(), 0.0) / mass
        if dropout_on(dropout_p):
            keep = torch.rand_like(probs) >= dropout_p
            weights = (probs * keep * (1.0 / (1.0 - dropout_p))).to(v.dtype)
        else:
            keep = None
            weights = probs.to(v.dtype)
        log_mass = row_max + mass.log()
        ctx.save_for_backward(q, k, v, logits, threshold, log_mass, keep, weights)
        ctx.scale, ctx.dropout_p = scale, dropout_p
        return weights @ v

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, logits, threshold, log_mass, keep, weights = ctx.saved_tensors
        grad_out = grad_out.to(v.dtype)
        grad_v = weights.transpose(-2, -1) @ grad_out
        grad_weights = (grad_out @ v.transpose(-2, -1)).float()
        if keep is not None:
            grad_weights = grad_weights * keep * (1.0 / (1.0 - ctx.dropout_p))
        # The probabilities again, from the bf16 logits and the row scalars. Written unlike the
        # forward's expressions on purpose: AOTAutograd's CSE would merge identical ones, and the
        # partitioner then keeps the forward's float32 probabilities (4 bytes per logit) and its
        # filter mask (1) alive for backward instead of recomputing them from the logits (kept
        # anyway). The mask stays a comparison (not the sign of scores - threshold, which Triton
        # may contract with the scaling into an unrounded FMA), so it is the forward's exactly.
        scores = logits.float() * ctx.scale
        keep_filter = ~(scores < threshold)
        probs = torch.where(keep_filter, (scores - log_mass).exp(), 0.0)
        grad_scores = probs * (grad_weights - (probs * grad_weights).sum(dim=-1, keepdim=True))
        grad_logits = (grad_scores * ctx.scale).to(q.dtype)
        return grad_logits @ k, grad_logits.transpose(-2, -1) @ q, grad_v, None, None, None, None


def fused_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | Tensor, top_k: int,
                    top_p: float | Tensor, dropout_p: float | Tensor = 0.0) -> Tensor:
    """The NKAT attention core from q, k, v (B, heads, N, head_dim), unmodulated: (B, heads, N, hd).

    ``dropout_p`` is applied as given (pass 0 in eval mode). ``scale``, ``top_p`` and ``dropout_p``
    may be 0-dim tensors (``nucleus_on``), so a compiled graph takes them as inputs. Under autocast, q, k, v arrive in
    bf16 and so do the logits (the matmul's output) and the weights, as on the explicit path; the
    filter and softmax run in float32 on ``logits * scale``. The explicit path rounds that product
    to bf16 again, which merges some neighbouring values into ties; here the ties are exactly
    those of the bf16 logits (identical tokens give identical logits), and ``compile`` gives the
    same as eager.
    """
    return _NKATCore.apply(q, k, v, scale, top_k, top_p, dropout_p)
