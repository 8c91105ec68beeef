"""nkat_search.train.attention_kernel: the Triton kernel pair against the explicit path, on the CPU.

The kernels run under Triton's interpreter (``TRITON_INTERPRET=1``), which Triton reads when a
kernel is decorated, i.e. when ``attention_kernel`` is first imported; the other test files import
the model (and so the kernel module) without it. So every interpreted case runs in one child
process (this file run as a script, ``run_cases``), which prints its measurements as JSON; the
tests below judge them. Sizes are small (rows of 12 to 64 keys, tiles of 16 so that rows cross
tile borders and end in a partial tile) because the interpreter runs every program in Python.

Float32 tolerances: outputs and gradients within 2e-5 relative to the largest reference value
(the kernel sums in another order than torch's matmuls; measured errors are about 1e-6, at most
3e-6), except the modulation's alpha and beta, whose gradients are single sums over every output
entry with cancellation: 2e-4 relative to themselves (measured up to 5e-5). bf16:
5e-2 relative (the output and the gradients are rounded to bf16, 2**-8, and the explicit path
rounds the probabilities to bf16 before the product with v).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TILE = 16  # block_m = block_n in the interpreted cases
FLOAT32_TOL = 2e-5
SCALAR_SUM_TOL = 2e-4
BF16_TOL = 5e-2

# name -> (tokens, head_dim, top_k, top_p, ties, split_heads): the layer cases, each forward and
# gradients.
LAYER_CASES = {
    "n17_d48_k6_p08": (17, 48, 6, 0.8, False, False),
    "n17_d56_k6_p08_ties": (17, 56, 6, 0.8, True, False),
    "n33_d64_k4_p09": (33, 64, 4, 0.9, False, False),
    "n40_d48_k6_p08_ties": (40, 48, 6, 0.8, True, False),
    "n12_d48_topk_ge_n": (12, 48, 20, 0.8, False, False),  # top_k >= N: nucleus only, 12 levels
    "n17_d64_topk_only": (17, 64, 6, 1.0, True, False),  # top_p >= 1
    "n17_d48_no_filter": (17, 48, 0, 1.0, False, False),  # both off: the plain softmax pass
    "n40_d64_no_filter_ties": (40, 64, 0, 1.0, True, False),  # online softmax over 3 tiles
    "n17_d48_split_heads": (17, 48, 6, 0.8, True, True),  # 8 heads, q, k, v from a concatenation
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _layer_case(tokens: int, head_dim: int, top_k: int, top_p: float, ties: bool,
                split_heads: bool, bwd_mode: str = "split") -> dict:
    """The NKATAttention layer (modulation on) on the kernel and the explicit path: relative
    errors of the output and of every gradient."""
    from nkat_search.config import ModelConfig
    from nkat_search.train.model import NKATAttention

    heads = 8 if split_heads else 2
    dim = heads * head_dim
    cfg = ModelConfig(embed_dim=dim, num_heads=heads, top_k=top_k, top_p=top_p,
                      temperature=0.65, dropout_attn=0.0, nkat_strength=0.3,
                      split_heads=split_heads)
    torch.manual_seed(tokens + head_dim)
    attn = NKATAttention(dim, heads, layer_index=0, cfg=cfg).train()
    for module in attn.modules():  # larger logits than at init, so the filters cut rows unevenly
        if isinstance(module, torch.nn.Linear):
            module.weight.data.mul_(3)
    x = torch.randn(1 if split_heads else 2, tokens, dim)
    if ties:  # identical tokens: exactly tied logits, at the k-th value and inside the nucleus
        x[:, 1::2] = x[:, 1:2]
        x[:, 2:8] = x[:, 3:4]
    weight = torch.randn(x.shape)
    results = {}
    for path in ("explicit", "kernel"):
        layer = NKATAttention(dim, heads, layer_index=0, cfg=cfg, path=path).train()
        layer.load_state_dict(attn.state_dict())
        inp = x.clone().requires_grad_()
        if path == "kernel":
            import nkat_search.train.model as model_module
            real = model_module.kernel_attention
            model_module.kernel_attention = lambda *a: real(*a, block_m=TILE, block_n=TILE,
                                                            bwd_mode=bwd_mode)
            try:
                out = layer(inp)
            finally:
                model_module.kernel_attention = real
        else:
            out = layer(inp)
        (out * weight).sum().backward()
        results[path] = {"out": out.detach(), "grad_x": inp.grad,
                         **{name: p.grad.clone() for name, p in layer.named_parameters()}}
    return {name: _rel(results["kernel"][name], ref)
            for name, ref in results["explicit"].items()}


def _explicit_core(q, k, v, scale, top_k, top_p, keep=None, dropout_p=0.0):
    """The explicit path's core (``NKATAttention.attend``, modulation off), with an optional
    dropout mask applied as ``nn.Dropout`` would."""
    from nkat_search.config import ModelConfig
    from nkat_search.train.model import NKATAttention

    cfg = ModelConfig(embed_dim=8 * 4, num_heads=8, top_k=top_k, top_p=top_p, dropout_attn=0.0,
                      nkat_strength=0.0)
    attn = NKATAttention(32, 8, layer_index=0, cfg=cfg)
    attn.scale.fill_(scale)
    if keep is not None:
        attn.attn_drop = _FixedDropout(keep, dropout_p)
    return attn.attend(q, k, v, None)


class _FixedDropout(torch.nn.Module):
    """``nn.Dropout`` with a given mask."""

    def __init__(self, keep: torch.Tensor, p: float):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, weights: torch.Tensor) -> torch.Tensor:
        return weights * self.keep / (1.0 - self.p)


def _integer_ties_case(dtype: torch.dtype, bwd_mode: str = "split") -> dict:
    """q, k with small integer entries: every product is exact, so ties are exact in any summation
    order; forward and gradients against the explicit core in float32 from the same values."""
    from nkat_search.train.attention_kernel import kernel_attention

    gen = torch.Generator().manual_seed(5)
    q, k = torch.randint(-2, 3, (2, 2, 2, 33, 48), generator=gen).float().unbind(0)
    v = torch.randn(2, 2, 33, 48, generator=gen)
    grad = torch.randn(2, 2, 33, 48, generator=gen)
    q, k, v = (t.to(dtype).float() for t in (q, k, v))  # the values bf16 can hold
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = _explicit_core(*leaves, 0.25, 6, 0.8)
    ref_grads = torch.autograd.grad(ref, leaves, grad)
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = kernel_attention(*leaves, 0.25, 6, 0.8, 0.0, block_m=TILE, block_n=TILE,
                           bwd_mode=bwd_mode)
    grads = torch.autograd.grad(out, leaves, grad.to(dtype))
    result = {"out": _rel(out, ref), "dtype": str(out.dtype)}
    for name, a, b in zip(("grad_q", "grad_k", "grad_v"), grads, ref_grads):
        result[name] = _rel(a, b)
    # Ties do occur at the threshold: rows whose kept count exceeds top_k.
    scores = (q @ k.transpose(-2, -1)) * 0.25
    larger = (scores.unsqueeze(-2) > scores.unsqueeze(-1)).sum(-1)
    result["rows_with_ties_at_kth"] = int(((larger < 6).sum(-1) > 6).sum())
    return result


def _raw_fwd(q, k, v, seed, scale, top_k, top_p, dropout_p, skip_empty=False, bwd_mode="split",
             philox_rounds=10):
    """The forward op with a given seed tensor, on the test tiles: (output, threshold, lse)."""
    from nkat_search.train.attention_kernel import _attention_fwd, op_filter_args

    return _attention_fwd(q, k, v, seed, *op_filter_args(seed, scale, top_k, top_p, dropout_p),
                          TILE, TILE, 4, skip_empty, bwd_mode, philox_rounds=philox_rounds)


def _skip_empty_case(bwd_mode: str = "split") -> dict:
    """Tiles whose probabilities are all 0 skipped: the same output and gradients, bit for bit,
    on rows that all keep only keys 0..3 (an attention sink), so most key tiles are empty. (The
    atomic backward's dQ is a sum in no fixed order: its largest difference is reported too.)"""
    gen = torch.Generator().manual_seed(15)
    n = 64
    q = torch.randn(1, 2, n, 48, generator=gen) * 0.1 + 1.0
    k = torch.randn(1, 2, n, 48, generator=gen) * 0.1
    k[:, :, :4] += 3.0
    v, grad = torch.randn(2, 1, 2, n, 48, generator=gen).unbind(0)
    seed = torch.tensor([5], dtype=torch.int64)
    results = []
    for skip in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = _raw_fwd(*leaves, seed, 0.5, 2, 0.9, 0.2, skip_empty=skip, bwd_mode=bwd_mode)[0]
        results.append([out, *torch.autograd.grad(out, leaves, grad)])
    eye = torch.eye(n).expand(1, 2, n, n).contiguous()
    weights = _raw_fwd(q, k, eye, seed, 0.5, 2, 0.9, 0.0)[0]
    return {"kept_keys_beyond_4": int((weights[..., 4:] > 0).sum()),
            "identical": [bool(torch.equal(a, b)) for a, b in zip(*results)],
            "max_difference": max(_rel(a, b) for a, b in zip(*results))}


def _dropout_case(rounds: int = 10) -> dict:
    """Dropout 0.17, no filter, v = identity: the output is the weight matrix itself; Philox with
    ``rounds`` rounds."""
    p = 0.17
    gen = torch.Generator().manual_seed(11)
    n = 64
    q, k = torch.randn(2, 2, 2, n, 64, generator=gen).unbind(0)
    eye = torch.eye(n).expand(2, 2, n, n).contiguous()
    seed = torch.tensor([1234], dtype=torch.int64)
    weights = _raw_fwd(q, k, eye, seed, 1.0, 0, 1.0, p, philox_rounds=rounds)[0]
    probs = (q @ k.transpose(-2, -1)).softmax(dim=-1)
    kept = weights > 0
    again = _raw_fwd(q, k, eye, seed, 1.0, 0, 1.0, p, philox_rounds=rounds)[0]
    other = _raw_fwd(q, k, eye, seed + 1, 1.0, 0, 1.0, p, philox_rounds=rounds)[0]
    ten_rounds = _raw_fwd(q, k, eye, seed, 1.0, 0, 1.0, p)[0] > 0
    return {
        "share_equal_to_10_rounds": (kept == ten_rounds).float().mean().item(),
        "entries": kept.numel(),
        "kept_share": kept.float().mean().item(),
        "kept_weight_error": _rel(weights[kept], probs[kept] / (1 - p)),
        "same_seed_same_mask": bool(torch.equal(again, weights)),
        "other_seed_share_equal": (kept == (other > 0)).float().mean().item(),
        "rows_per_head_differ": bool((kept[:, 0] != kept[:, 1]).any()),
    }


def _dropout_gradient_case(bwd_mode: str = "split", rounds: int = 10) -> dict:
    """Forward and backward use the same mask: the kernel's gradients on a fixed seed against the
    explicit core with the mask read back from the kernel's own forward (v = identity)."""
    p = 0.3
    gen = torch.Generator().manual_seed(12)
    n = 33
    q, k, v = (t * 2 for t in torch.randn(3, 2, 2, n, 48, generator=gen).unbind(0))
    grad = torch.randn(2, 2, n, 48, generator=gen)
    seed = torch.tensor([99], dtype=torch.int64)
    eye = torch.eye(n, 48).expand(2, 2, n, 48).contiguous()  # 33 keys fit in 48 columns
    keep = _raw_fwd(q, k, eye, seed, 0.5, 6, 0.8, p, philox_rounds=rounds)[0][..., :n] > 0
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = _raw_fwd(*leaves, seed, 0.5, 6, 0.8, p, bwd_mode=bwd_mode, philox_rounds=rounds)[0]
    grads = torch.autograd.grad(out, leaves, grad)
    # Keep at filtered entries does not matter (their probability is 0); give them the mask too.
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = _explicit_core(*ref_leaves, 0.5, 6, 0.8, keep=keep, dropout_p=p)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad)
    # The same check against a mask from another seed must fail: the test can tell.
    wrong_keep = _raw_fwd(q, k, eye, seed + 1, 0.5, 6, 0.8, p, philox_rounds=rounds)[0]
    wrong_keep = wrong_keep[..., :n] > 0
    wrong_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    wrong = _explicit_core(*wrong_leaves, 0.5, 6, 0.8, keep=wrong_keep, dropout_p=p)
    wrong_grads = torch.autograd.grad(wrong, wrong_leaves, grad)
    result = {"out": _rel(out, ref), "wrong_seed_grad_q": _rel(grads[0], wrong_grads[0])}
    for name, a, b in zip(("grad_q", "grad_k", "grad_v"), grads, ref_grads):
        result[name] = _rel(a, b)
    return result


def _dropout_tiles_case() -> dict:
    """The mask is a function of (seed, head, row, column) alone: the same from forwards on other
    tiles (40 keys: partial tiles; one tiling without tail tiles, one 64-key tile masked), each of
    a Philox call's 4 outputs unbiased (its column residue's kept share), and backward on other
    tiles than the forward the mask came from."""
    from nkat_search.train.attention_kernel import (DROPOUT_COLUMNS_PER_PHILOX, _attention_fwd,
                                                    op_filter_args)

    p = 0.17
    gen = torch.Generator().manual_seed(16)
    n = 40
    q, k = torch.randn(2, 2, 2, n, 64, generator=gen).unbind(0)
    eye = torch.eye(n, 64).expand(2, 2, n, 64).contiguous()
    seed = torch.tensor([77], dtype=torch.int64)
    tiles = ((16, 16, 16), (32, 16, 16), (16, 32, 16), (64, 64, 0))  # (block_m, block_n, tail)
    masks = [_attention_fwd(q, k, eye, seed, *op_filter_args(seed, 1.0, 0, 1.0, p),
                            bm, bn, 4, False, tail_block=tail)[0][..., :n] > 0
             for bm, bn, tail in tiles]
    group = DROPOUT_COLUMNS_PER_PHILOX
    shares = [masks[0][..., r::group].float().mean().item() for r in range(group)]
    # Gradients on (32, 16) and (16, 32) tiles against the explicit core with the tile-16 mask.
    x, w, grad = (t * 2 for t in torch.randn(3, 2, 2, n, 48, generator=gen).unbind(0))
    ref_leaves = [t.clone().requires_grad_() for t in (q[..., :48], k[..., :48], w)]
    ref = _explicit_core(*ref_leaves, 0.5, 6, 0.8, keep=masks[0], dropout_p=p)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad)
    result = {"same_mask": [bool(torch.equal(m, masks[0])) for m in masks[1:]],
              "entries_per_residue": masks[0][..., ::group].numel(), "shares": shares}
    for bm, bn, _ in tiles[1:3]:
        leaves = [t.clone().requires_grad_() for t in (q[..., :48], k[..., :48], w)]
        out = _attention_fwd(*leaves, seed, *op_filter_args(seed, 0.5, 6, 0.8, p),
                             bm, bn, 4, False)[0]
        grads = torch.autograd.grad(out, leaves, grad)
        result[f"{bm}x{bn}"] = max(_rel(a, b) for a, b in zip((out, *grads), (ref, *ref_grads)))
    return result


def _seed_case() -> dict:
    """The public function draws its seed from torch's generator: reproducible under
    ``torch.manual_seed``, different on the next call."""
    from nkat_search.train.attention_kernel import kernel_attention

    gen = torch.Generator().manual_seed(13)
    q, k, v = torch.randn(3, 1, 2, 17, 48, generator=gen).unbind(0)

    def run():
        return kernel_attention(q, k, v, 0.5, 0, 1.0, 0.5, block_m=TILE, block_n=TILE)

    torch.manual_seed(0)
    first, second = run(), run()
    torch.manual_seed(0)
    replay = run()
    return {"replay_equal": bool(torch.equal(first, replay)),
            "next_call_equal": bool(torch.equal(first, second))}


def _tail_case() -> dict:
    """Tail tiles (``tail_block`` 16 under tiles of 32): rows and keys past the last full tile in
    tiles of 16. Against the same kernel without them: forward and gradients, both backward
    modes, filters on and off, exact ties, dropout; and against the explicit core with dropout
    0."""
    from nkat_search.train.attention_kernel import kernel_attention

    gen = torch.Generator().manual_seed(21)
    runs = {  # name: (tokens, top_k, top_p, dropout, bwd_mode, ties)
        "n40_filter_split": (40, 6, 0.8, 0.0, "split", False),
        "n40_filter_atomic_ties": (40, 6, 0.8, 0.0, "atomic", True),
        "n70_no_filter_atomic": (70, 0, 1.0, 0.0, "atomic", False),
        "n70_dropout_split": (70, 6, 0.8, 0.2, "split", False),
        "n70_dropout_atomic": (70, 6, 0.8, 0.2, "atomic", False),
        "n17_dropout_atomic": (17, 4, 0.9, 0.2, "atomic", False),
    }
    result = {}
    for name, (n, top_k, top_p, p, mode, ties) in runs.items():
        q, k, v, grad = torch.randn(4, 1, 2, n, 48, generator=gen).unbind(0)
        if ties:
            q, k = torch.randint(-2, 3, (2, 1, 2, n, 48), generator=gen).float().unbind(0)
        outs = []
        for tail in (0, 16):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            torch.manual_seed(4)  # the same dropout seed for both
            out = kernel_attention(*leaves, 0.3, top_k, top_p, p, block_m=32, block_n=32,
                                   bwd_mode=mode, tail_block=tail)
            outs.append([out, *torch.autograd.grad(out, leaves, grad)])
        result[name] = max(_rel(a, b) for a, b in zip(outs[1], outs[0]))
        if p == 0.0:
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            ref = _explicit_core(*leaves, 0.3, top_k, top_p)
            ref_all = [ref, *torch.autograd.grad(ref, leaves, grad)]
            result[f"{name}_vs_explicit"] = max(_rel(a, b) for a, b in zip(outs[1], ref_all))
    return result


# bwd_mode "sparse" runs on the cases with top_k on; top_k >= N takes the atomic route.
SPARSE_LAYER_CASES = ("n17_d48_k6_p08", "n17_d56_k6_p08_ties", "n33_d64_k4_p09",
                      "n40_d48_k6_p08_ties", "n12_d48_topk_ge_n", "n17_d64_topk_only",
                      "n17_d48_split_heads")


def _sparse_slots_case(slots: int) -> dict:
    """The sparse backward with fewer slots than kept entries: top_k 6, no nucleus, ties. With 4
    slots every query tile takes the dense fallback; with 8 only those holding a row of more than
    8 tied entries do (the errors differ from 16 slots' in the last bits, so the paths differ)."""
    import nkat_search.train.attention_kernel as ak

    saved = ak.SPARSE_SLOTS
    ak.SPARSE_SLOTS = slots
    try:
        return _layer_case(*LAYER_CASES["n17_d64_topk_only"], bwd_mode="sparse")
    finally:
        ak.SPARSE_SLOTS = saved


def _sparse_tail_case() -> dict:
    """The sparse backward under tail tiles (tiles of 32, tail 16, 40 and 70 tokens): against
    the explicit core with dropout 0, and with dropout against the atomic backward on the same
    seed (the same mask)."""
    from nkat_search.train.attention_kernel import kernel_attention

    gen = torch.Generator().manual_seed(23)
    result = {}
    for n, p in ((40, 0.0), (70, 0.0), (70, 0.2)):
        q, k, v, grad = torch.randn(4, 1, 2, n, 48, generator=gen).unbind(0)
        runs = {}
        for mode in ("sparse", "atomic"):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            torch.manual_seed(6)
            out = kernel_attention(*leaves, 0.3, 6, 0.9, p, block_m=32, block_n=32,
                                   bwd_mode=mode, tail_block=16)
            runs[mode] = [out, *torch.autograd.grad(out, leaves, grad)]
        if p == 0.0:
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            ref = _explicit_core(*leaves, 0.3, 6, 0.9)
            runs["explicit"] = [ref, *torch.autograd.grad(ref, leaves, grad)]
        ref = runs["explicit" if p == 0.0 else "atomic"]
        result[f"n{n}_p{p}"] = max(_rel(a, b) for a, b in zip(runs["sparse"], ref))
    return result


def _bwd_block_m_case() -> dict:
    """bwd_block_m (the dK / dV and slots programs' query tile) of 16 under tiles of 32 and tail
    tiles of 16, in every backward mode: at 40 tokens (40 = 2 x 16 + 8 tail rows) against the
    explicit core with dropout 0, at 70 (4 x 16 + 6) with dropout against the same mode at the
    forward's query tile on the same seed (the same mask).

    q and k hold small integers, so every score is exact in any summation order. On random
    floats the interpreter's matmul rounds a 16-row tile's scores otherwise than a 32-row one's
    in the last bit, the backward then misses the threshold's own entry in some rows, and dK and
    dV come out far off: whether a GPU's MMA instructions do the same is for the GPU agreement
    check (benchmarks/attention_kernel_check.py) to show, not this plumbing test."""
    from nkat_search.train.attention_kernel import BWD_MODES, kernel_attention

    gen = torch.Generator().manual_seed(29)
    result = {}
    for n, p in ((40, 0.0), (70, 0.2)):
        v, grad = torch.randn(2, 1, 2, n, 48, generator=gen).unbind(0)
        q, k = torch.randint(-2, 3, (2, 1, 2, n, 48), generator=gen).float().unbind(0)
        ref = None
        if p == 0.0:
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out = _explicit_core(*leaves, 0.3, 6, 0.9)
            ref = [out, *torch.autograd.grad(out, leaves, grad)]
        for mode in BWD_MODES:
            runs = []
            for bwd_block_m in (16, None):
                leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                torch.manual_seed(6)
                out = kernel_attention(*leaves, 0.3, 6, 0.9, p, block_m=32, block_n=32,
                                       bwd_mode=mode, tail_block=16, bwd_block_m=bwd_block_m)
                runs.append([out, *torch.autograd.grad(out, leaves, grad)])
            result[f"n{n}_p{p}_{mode}"] = max(_rel(a, b) for a, b in zip(runs[0], ref or runs[1]))
    return result


def _opcheck_case(variant: tuple = ()) -> dict:
    """torch.library.opcheck: schema, fake (meta) implementation, autograd registration and AOT
    dispatch of the forward op, i.e. what torch.compile relies on. ``variant``: the trailing
    arguments (bwd_mode, num_stages, tail_block, philox_rounds, bwd_num_warps, bwd_block_m),
    defaults if empty."""
    from nkat_search.train.attention_kernel import _attention_fwd, op_filter_args

    gen = torch.Generator().manual_seed(14)
    q, k, v = (t.requires_grad_() for t in torch.randn(3, 1, 2, 17, 48, generator=gen).unbind(0))
    seed = torch.tensor([7], dtype=torch.int64)
    args = (q, k, v, seed, *op_filter_args(seed, 0.5, 6, 0.8, 0.1), TILE, TILE, 4, False,
            *variant)
    report = torch.library.opcheck(_attention_fwd, args)
    return {name: str(value) for name, value in report.items()}


def run_cases(shard: int = 0, shards: int = 1) -> dict:
    """Every ``shards``-th case from ``shard``: the fixture runs two interpreters side by side."""
    cases = {f"layer_{name}": (lambda c=case: _layer_case(*c))
             for name, case in LAYER_CASES.items()}
    cases.update({f"layer_atomic_{name}": (lambda c=case: _layer_case(*c, bwd_mode="atomic"))
                  for name, case in LAYER_CASES.items()})
    cases.update({
        "integer_ties_float32": lambda: _integer_ties_case(torch.float32),
        "integer_ties_bf16": lambda: _integer_ties_case(torch.bfloat16),
        "dropout": _dropout_case,
        "dropout_gradient": _dropout_gradient_case,
        "dropout_rounds_7": lambda: _dropout_case(7),
        "dropout_gradient_rounds_7_atomic": lambda: _dropout_gradient_case("atomic", 7),
        "dropout_tiles": _dropout_tiles_case,
        "skip_empty": _skip_empty_case,
        "integer_ties_atomic_float32": lambda: _integer_ties_case(torch.float32, "atomic"),
        "integer_ties_atomic_bf16": lambda: _integer_ties_case(torch.bfloat16, "atomic"),
        "dropout_gradient_atomic": lambda: _dropout_gradient_case("atomic"),
        "skip_empty_atomic": lambda: _skip_empty_case("atomic"),
        "seed": _seed_case,
        "opcheck": _opcheck_case,
        "opcheck_atomic_stages": lambda: _opcheck_case(("atomic", 2)),
        "tail": _tail_case,
        "opcheck_no_tail_rounds_10": lambda: _opcheck_case(("split", None, 0, 10)),
        "integer_ties_sparse_float32": lambda: _integer_ties_case(torch.float32, "sparse"),
        "integer_ties_sparse_bf16": lambda: _integer_ties_case(torch.bfloat16, "sparse"),
        "dropout_gradient_sparse": lambda: _dropout_gradient_case("sparse", 7),
        "sparse_slots_4": lambda: _sparse_slots_case(4),
        "sparse_slots_8": lambda: _sparse_slots_case(8),
        "sparse_tail": _sparse_tail_case,
        # The backward's own warps and query tile (bwd_num_warps, bwd_block_m: the op's last
        # arguments) carried to backward.
        "opcheck_sparse": lambda: _opcheck_case(("sparse", None, 16, 7, 8, 16)),
        "bwd_block_m": _bwd_block_m_case,
    })
    cases.update({f"layer_sparse_{name}": (lambda c=LAYER_CASES[name]: _layer_case(
        *c, bwd_mode="sparse")) for name in SPARSE_LAYER_CASES})
    results = {}
    for name, case in list(cases.items())[shard::shards]:
        started = time.perf_counter()
        try:
            results[name] = case()
            results[name]["seconds"] = round(time.perf_counter() - started, 2)
        except Exception as err:  # noqa: BLE001 - reported to the test that reads this case
            results[name] = {"error": f"{type(err).__name__}: {err}"[:2000]}
    return results


@pytest.fixture(scope="module")
def interpreted() -> dict:
    # The interpreter runs on one core; two shards side by side halve the wait on a 2-core CI box.
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    shards = [subprocess.Popen([sys.executable, __file__, str(shard), "2"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
              for shard in range(2)]
    results = {}
    for proc in shards:
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for other in shards:
                other.kill()
            raise
        assert proc.returncode == 0, out[-2000:] + err[-3000:]
        results.update(json.loads(out.strip().splitlines()[-1]))
    return results


def _case(interpreted: dict, name: str) -> dict:
    result = interpreted[name]
    assert "error" not in result, result["error"]
    return result


def _assert_layer_matches(interpreted: dict, case: str) -> None:
    """A layer case (``_layer_case``): output and gradients within float32 tolerance of the
    explicit path; alpha and beta, single sums with cancellation, within their own."""
    errors = _case(interpreted, case)
    errors.pop("seconds")
    assert set(errors) >= {"out", "grad_x", "alpha", "beta", "proj.weight"}
    scalars = {name: errors.pop(name) for name in ("alpha", "beta")}
    assert max(errors.values()) < FLOAT32_TOL, errors
    assert max(scalars.values()) < SCALAR_SUM_TOL, scalars


def _assert_ties_match(interpreted: dict, case: str, dtype: str) -> None:
    """An integer-ties case (``_integer_ties_case``): ties at the cut occur, and the output and
    gradients are within the dtype's tolerance of the explicit core."""
    result = _case(interpreted, case)
    assert result["rows_with_ties_at_kth"] > 0  # the case does exercise ties at the cut
    tol = FLOAT32_TOL if dtype == "float32" else BF16_TOL
    assert result["dtype"] == ("torch.float32" if dtype == "float32" else "torch.bfloat16")
    errors = {k: v for k, v in result.items() if k.startswith(("out", "grad_"))}
    assert max(errors.values()) < tol, result


@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_kernel_layer_matches_explicit_forward_and_gradients(interpreted, name):
    _assert_layer_matches(interpreted, f"layer_{name}")


@pytest.mark.parametrize("dtype", ["float32", "bf16"])
def test_kernel_exact_ties_at_the_threshold(interpreted, dtype):
    _assert_ties_match(interpreted, f"integer_ties_{dtype}", dtype)


@pytest.mark.parametrize("name", ["dropout", "dropout_rounds_7"])
def test_kernel_dropout_keep_share_and_scaling(interpreted, name):
    result = _case(interpreted, name)
    sigma = math.sqrt(0.17 * 0.83 / result["entries"])
    assert abs(result["kept_share"] - 0.83) < 5 * sigma, result
    assert result["kept_weight_error"] < FLOAT32_TOL, result
    assert result["same_seed_same_mask"], result
    # Another seed: an independent mask agrees on about 0.83^2 + 0.17^2 = 0.72 of the entries.
    assert abs(result["other_seed_share_equal"] - 0.7178) < 0.03, result
    assert result["rows_per_head_differ"], result
    if name == "dropout_rounds_7":  # fewer rounds draw another mask, as independent
        assert abs(result["share_equal_to_10_rounds"] - 0.7178) < 0.03, result


# Every backward mode: split, atomic (with 7 and 10 rounds) and sparse.
@pytest.mark.parametrize("name", ["dropout_gradient", "dropout_gradient_rounds_7_atomic",
                                  "dropout_gradient_atomic", "dropout_gradient_sparse"])
def test_kernel_dropout_backward_uses_the_forward_mask(interpreted, name):
    result = _case(interpreted, name)
    for name in ("out", "grad_q", "grad_k", "grad_v"):
        assert result[name] < FLOAT32_TOL, result
    assert result["wrong_seed_grad_q"] > 1e-2, result  # the comparison can tell masks apart


def test_kernel_dropout_mask_does_not_depend_on_tiles(interpreted):
    result = _case(interpreted, "dropout_tiles")
    assert result["same_mask"] == [True] * 3, result
    sigma = math.sqrt(0.17 * 0.83 / result["entries_per_residue"])
    assert all(abs(share - 0.83) < 5 * sigma for share in result["shares"]), result
    assert max(result["32x16"], result["16x32"]) < FLOAT32_TOL, result


def test_kernel_skipping_empty_tiles_changes_nothing(interpreted):
    result = _case(interpreted, "skip_empty")
    assert result["kept_keys_beyond_4"] == 0, result  # every tile past the first is empty
    assert result["identical"] == [True] * 4, result


# bwd_mode "atomic": dQ summed with atomics in the dK / dV kernel; the same checks as "split".

@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_kernel_atomic_backward_layer_matches_explicit(interpreted, name):
    _assert_layer_matches(interpreted, f"layer_atomic_{name}")


@pytest.mark.parametrize("dtype", ["float32", "bf16"])
def test_kernel_atomic_backward_exact_ties(interpreted, dtype):
    _assert_ties_match(interpreted, f"integer_ties_atomic_{dtype}", dtype)


def test_kernel_atomic_backward_skipping_empty_tiles(interpreted):
    result = _case(interpreted, "skip_empty_atomic")
    assert result["kept_keys_beyond_4"] == 0, result
    assert result["max_difference"] < FLOAT32_TOL, result


# bwd_mode "sparse": dS and dQ from each row's kept entries, dK and dV from them spread on tiles.

@pytest.mark.parametrize("name", SPARSE_LAYER_CASES)
def test_kernel_sparse_backward_layer_matches_explicit(interpreted, name):
    _assert_layer_matches(interpreted, f"layer_sparse_{name}")


@pytest.mark.parametrize("dtype", ["float32", "bf16"])
def test_kernel_sparse_backward_exact_ties(interpreted, dtype):
    _assert_ties_match(interpreted, f"integer_ties_sparse_{dtype}", dtype)


@pytest.mark.parametrize("slots", [4, 8])
def test_kernel_sparse_backward_falls_back_to_dense_tiles_past_its_slots(interpreted, slots):
    _assert_layer_matches(interpreted, f"sparse_slots_{slots}")


def test_kernel_sparse_backward_under_tail_tiles(interpreted):
    result = _case(interpreted, "sparse_tail")
    result.pop("seconds")
    assert len(result) == 3, result
    assert all(error < FLOAT32_TOL for error in result.values()), result


def test_kernel_dropout_seed_follows_torch_generator(interpreted):
    result = _case(interpreted, "seed")
    assert result["replay_equal"] and not result["next_call_equal"], result


# The op's registration at the defaults (tail tiles of 16, 7 rounds); with bwd_mode "atomic"
# and 2 stages; without tail tiles and with 10 rounds; with the sparse backward on 8 warps and
# query tiles of 16.
@pytest.mark.parametrize("case", ["opcheck", "opcheck_atomic_stages", "opcheck_no_tail_rounds_10",
                                  "opcheck_sparse"])
def test_kernel_op_registration_passes_opcheck(interpreted, case):
    report = _case(interpreted, case)
    report.pop("seconds")
    assert report and all(value == "SUCCESS" for value in report.values()), report


def test_kernel_refuses_a_backward_query_tile_tl_dot_cannot_take():
    from nkat_search.train.attention_kernel import kernel_attention

    q = torch.randn(1, 2, 17, 48)
    with pytest.raises(ValueError, match="bwd_block_m 24 is not None or a power of two from 16"):
        kernel_attention(q, q, q, 0.3, 6, 0.9, bwd_block_m=24)


# Tail tiles against none (9 comparisons); the backward's own query tile against the forward's
# (bwd_block_m, 6).
@pytest.mark.parametrize("case, comparisons", [("tail", 9), ("bwd_block_m", 6)])
def test_kernel_tiling_changes_nothing_but_the_tiling(interpreted, case, comparisons):
    result = _case(interpreted, case)
    result.pop("seconds")
    assert len(result) == comparisons, result
    assert all(error < FLOAT32_TOL for error in result.values()), result


def test_kernel_tail_tiling_of_a_257_token_row():
    pytest.importorskip("triton")
    from nkat_search.train.attention_kernel import _launches, _tiling

    # 256 patches and the CLS token: 4 full blocks of 64 and one tail block of 16, rows and keys.
    assert _tiling(257, 48, 64, 64, 16) == (64, 64, 64, 16, 256, 256)
    assert _launches(257, 64, 16, 256) == [(4, 64, 0), (1, 16, 256)]
    # Without a tail: one launch, the last block masked; short rows: tails only.
    assert _tiling(257, 48, 64, 64, 0) == (64, 64, 64, 0, 257, 257)
    assert _launches(257, 64, 0, 257) == [(5, 64, 0)]
    assert _launches(17, 32, 16, 0) == [(2, 16, 0)]


@pytest.mark.parametrize("tail", [8, 24])
def test_kernel_refuses_a_tail_block_tl_dot_cannot_take(tail):
    pytest.importorskip("triton")
    from nkat_search.train.attention_kernel import kernel_attention

    q = torch.randn(1, 2, 17, 48)
    with pytest.raises(ValueError, match=f"tail_block {tail} is not 0 or a power of two"):
        kernel_attention(q, q, q, 0.3, 6, 0.8, tail_block=tail)


def test_kernel_refuses_philox_rounds_past_ten():
    pytest.importorskip("triton")
    from nkat_search.train.attention_kernel import kernel_attention

    q = torch.randn(1, 2, 17, 48)
    with pytest.raises(ValueError, match="philox_rounds 11 is not 1 to 10"):
        kernel_attention(q, q, q, 0.3, 6, 0.8, 0.1, philox_rounds=11)


# --- in process: no kernel launches, so no interpreter needed ------------------------------------

@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="kernels are interpreted functions in this process")
def test_kernels_compile_for_hopper_in_bf16(benchmark_script):
    pytest.importorskip("triton")
    from nkat_search.train import attention_kernel as ak

    # Triton's compiler for sm_90, no GPU needed: it catches what the interpreter lets through
    # (loop-carried type changes, layouts, shared memory).
    kr = benchmark_script("kernel_registers")
    tiles = kr.hopper_tiles()
    forward = dict(TOP_K=6, TOPK_ON=True, NUCLEUS_ON=True, LEVELS=6, LEVELS_PAD=8, **tiles)
    for fn, constexprs in ((ak._fwd_kernel, dict(DROPOUT=True, **forward)),
                           (ak._bwd_kv_kernel, dict(DROPOUT=True, ATOMIC_DQ=False,
                                                    **kr.dense_kv(), **tiles)),
                           (ak._bwd_q_kernel, dict(DROPOUT=True, **tiles))):
        compiled = kr.compile_for_hopper(fn, "bf16", constexprs, ak.NUM_WARPS)
        # Hopper's warpgroup MMA in every kernel: the score tiles must come out of the same
        # instruction in forward and backward (see _score_tile).
        assert "wgmma" in compiled.asm["ptx"], fn.__name__


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="kernels are interpreted functions in this process")
def test_kernel_variants_compile_for_hopper_in_bf16(benchmark_script):
    """The atomic backward, the one-pass forward without a filter, and the programs without tail
    tiles and with 10 Philox rounds (the benchmark's comparison rows) on key tiles of 64 and 32."""
    pytest.importorskip("triton")
    from nkat_search.train import attention_kernel as ak

    kr = benchmark_script("kernel_registers")
    tiles = kr.hopper_tiles()
    compiled = kr.compile_for_hopper(ak._bwd_kv_kernel, "bf16",
                                     dict(DROPOUT=True, ATOMIC_DQ=True, **kr.dense_kv(), **tiles),
                                     ak.NUM_WARPS)
    ptx = compiled.asm["ptx"]
    assert "wgmma" in ptx
    assert "red.global" in ptx or "atom.global" in ptx  # dQ summed in global memory
    no_filter = dict(TOP_K=0, TOPK_ON=False, NUCLEUS_ON=False, LEVELS=0, LEVELS_PAD=2,
                     DROPOUT=True, **tiles)
    compiled = kr.compile_for_hopper(ak._fwd_kernel, "bf16", no_filter, ak.NUM_WARPS)
    assert "wgmma" in compiled.asm["ptx"]
    for block_n in (64, 32):
        options = dict(tiles, BLOCK_N=block_n, TAIL=0, ROUNDS=10)
        forward = dict(TOP_K=6, TOPK_ON=True, NUCLEUS_ON=True, LEVELS=6, LEVELS_PAD=8,
                       DROPOUT=True, **options)
        for fn, constexprs in ((ak._fwd_kernel, forward),
                               (ak._bwd_kv_kernel,
                                dict(DROPOUT=True, ATOMIC_DQ=True, **kr.dense_kv(),
                                     **options))):
            compiled = kr.compile_for_hopper(fn, "bf16", constexprs, ak.NUM_WARPS)
            assert "wgmma" in compiled.asm["ptx"], (fn.__name__, block_n)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="kernels are interpreted functions in this process")
def test_kernel_tail_programs_compile_for_hopper_in_bf16(benchmark_script):
    """With tail tiles of 16: a forward program of full rows (its last key tile 16 wide) and one
    of tail rows, the dK / dV program of a tail key block, the dQ program of tail rows."""
    pytest.importorskip("triton")
    from nkat_search.train import attention_kernel as ak

    kr = benchmark_script("kernel_registers")
    tiles = dict(kr.hopper_tiles(), TAIL=16)
    forward = dict(TOP_K=6, TOPK_ON=True, NUCLEUS_ON=True, LEVELS=6, LEVELS_PAD=8, DROPOUT=True)
    for fn, constexprs in ((ak._fwd_kernel, dict(forward, **tiles)),
                           (ak._fwd_kernel, dict(forward, **dict(tiles, BLOCK_M=16))),
                           (ak._bwd_kv_kernel, dict(tiles, BLOCK_N=16, DROPOUT=True,
                                                    ATOMIC_DQ=True, **kr.dense_kv())),
                           (ak._bwd_q_kernel, dict(tiles, BLOCK_M=16, DROPOUT=True))):
        compiled = kr.compile_for_hopper(fn, "bf16", constexprs, ak.NUM_WARPS)
        assert ".entry" in compiled.asm["ptx"], fn.__name__


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="kernels are interpreted functions in this process")
def test_kernel_sparse_backward_programs_compile_for_hopper_in_bf16(benchmark_script):
    """bwd_mode "sparse": the slots program and the key-block program, which keeps the dense tile
    (wgmma, dQ atomics) as its fallback."""
    pytest.importorskip("triton")
    from nkat_search.train import attention_kernel as ak

    kr = benchmark_script("kernel_registers")
    tiles = dict(kr.hopper_tiles(), TAIL=16, S=ak.SPARSE_SLOTS, DROPOUT=True)
    # Full blocks: their loops over tail tiles (TAIL 16) compile within them.
    for fn, constexprs in ((ak._bwd_slots_kernel, tiles),
                           (ak._bwd_kv_kernel, dict(tiles, SPARSE=True, ATOMIC_DQ=True))):
        ptx = kr.compile_for_hopper(fn, "bf16", constexprs, ak.NUM_WARPS).asm["ptx"]
        assert ".entry" in ptx, fn.__name__
        if fn is ak._bwd_kv_kernel:
            assert "wgmma" in ptx and ("red.global" in ptx or "atom.global" in ptx)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="kernels are interpreted functions in this process")
def test_kernel_registers_reports_ptxas_usage(tmp_path, benchmark_script):
    """benchmarks/kernel_registers.py at one tile and warp count, with the backward's query tile
    of 32 too: ptxas's registers (1 to 255 a thread on sm_90) and spills, in the JSON it
    writes."""
    pytest.importorskip("triton")
    kr = benchmark_script("kernel_registers")
    out = tmp_path / "registers.json"
    assert kr.main(["--warps", "8", "--block-n", "64", "--bwd-block-m", "32",
                    "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["triton"] and result["ptxas"]
    assert [(row["program"], row["block_m"]) for row in result["rows"]] == (
        [(name, 64) for name in kr.programs()] + [(name, 32) for name in kr.BWD_BLOCK_M_PROGRAMS])
    for row in result["rows"]:
        assert row["warps"] == 8 and row["block_n"] == 64 and row["arch"].startswith("sm_90")
        assert 1 <= row["registers"] <= 255 and row["shared_bytes"] > 0
        assert row["spill_stores"] >= 0 and row["spill_loads"] >= 0
    # A program ptxas could not fit in 255 registers spills; the forward at 8 warps does not.
    assert result["rows"][0]["spill_stores"] == 0


def test_kernel_supports_and_cpu_auto_path(monkeypatch):
    import nkat_search.train.model as model_module
    from nkat_search.config import ModelConfig
    from nkat_search.train.attention_kernel import KERNEL_MAX_LEVELS, kernel_supports
    from nkat_search.train.model import build_model

    assert kernel_supports(48, 6, 0.8, 257) and kernel_supports(64, 0, 1.0, 512)
    assert not kernel_supports(96, 6, 0.8, 257)  # head dim past the padded 64
    assert kernel_supports(48, 0, 0.8, KERNEL_MAX_LEVELS)
    assert not kernel_supports(48, 0, 0.8, KERNEL_MAX_LEVELS + 1)  # nucleus only: a level per key
    calls = []
    monkeypatch.setattr(model_module, "kernel_attention", lambda *a: calls.append(1))
    cfg = ModelConfig(embed_dim=32, num_heads=4, depth=1, conv_stem="off", patch_size=2)
    model = build_model(cfg, 3, 10).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert calls == []  # auto on the CPU: explicit, even for 257-token rows
    assert model.blocks[0].attn.nkat_path() == "explicit"
    model = build_model(cfg, 3, 10, attention_path="kernel").eval()
    assert model.blocks[0].attn.nkat_path() == "kernel"


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(run_cases(*map(int, sys.argv[1:3]))))
