"""GPU self-check of the Triton NKAT kernel (issue 22): agreement with the explicit path, timings.

Run it first on a new GPU machine or Triton version: a compile error shows here in seconds, not
after the full benchmark's compiles. Part 1 compares ``kernel_attention`` with the explicit core
(``NKATAttention.attend``, modulation off) at 17, 65 and 257 tokens, head dims 48, 56 and 64,
float32 and bf16, on random data and on data with exact ties (q and k on grids that make every
score exact, so that no near-tie can flip a filter cut between the two sides): forward and the
gradients of q, k and v, as the largest error relative to the reference's largest value, and the
number of rows whose output is off by more than the tolerance (a row whose filter cut differs).
Float32 runs without TF32 on both sides. bf16 feeds both sides the same bf16 values; the explicit
side computes in float32 from them. Then dropout: the kept share against its binomial bounds, and
the gradients on a fixed seed against the explicit core given the mask the kernel's forward used.
Both checks run once per backward mode (``BWD_MODES``: split, atomic, sparse); a few cases also
run the other side of ``TAIL_BLOCK`` (agreement, longest rows), the backward on 8 warps
(``bwd_num_warps``, agreement, longest rows), the dK / dV programs on query tiles of 32
(``bwd_block_m``, agreement, longest rows) and the other side of ``PHILOX_ROUNDS`` (dropout
share and gradients): each against the same reference, candidates that do not decide PASS.
Part 2 times the attention core alone (q, k, v to output; batch 512, 8 heads of 48, 257 tokens,
bf16, forward + backward unless marked): SDPA; the kernel (top_k 6, top_p 0.8, dropout 0.17) at
each tile choice (query block, key block, warps) and backward mode, each also with the backward
on 8 warps of its own (and, at the default tiles, with the dK / dV programs on query tiles of
32); then, at the fastest of those, num_stages 1, 2 and 3,
dropout 0 (the mask's cost), the filter off, forward only (also SDPA's), skipping empty tiles
on an attention sink, and the defaults before session 12: ``tail_block`` 0 (with and without
backward, and with the filter off), ``philox_rounds`` 10, and both. Then one attention layer
(embed 384, bf16 autocast) on the kernel with its defaults (eager and compiled), the fused path
(compiled) and SDPA with the filters off. The defaults are ``BLOCK_M``, ``BLOCK_N``,
``NUM_WARPS``, ``BWD_NUM_WARPS``, ``BWD_MODE``, ``NUM_STAGES``, ``TAIL_BLOCK`` and
``PHILOX_ROUNDS`` in ``train/attention_kernel.py``, the place to change them. Part 1 also checks
tail tiles of 16 on random bf16 data against no tail tiles (forward and backward must form every
score alike: see ``check_tail_consistency``).

Prints one line per check, ``PASS`` or ``FAIL`` at the end of part 1 (exit 1 on FAIL; decided by
the default tiles and backward mode, the other choices are reported beside), then the timing
table; ``--out FILE`` also writes the timing rows as JSON (a list of ``name``, ``ms``,
``peak_gib``, ``warm_s``, ``device``, and ``error`` where a variant failed; rewritten after each
row, so a run cut short keeps what it timed).

    python benchmarks/attention_kernel_check.py [--no-timing | --no-check] [--batch 512]
        [--out FILE]
    python benchmarks/attention_kernel_check.py [--no-timing | --no-check] [--batch 512]
    TRITON_INTERPRET=1 python benchmarks/attention_kernel_check.py --device cpu   # smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from nkat_search.config import ModelConfig  # noqa: E402
from nkat_search.train.attention_kernel import (  # noqa: E402
    BLOCK_M,
    BLOCK_N,
    BWD_MODE,
    BWD_MODES,
    NUM_WARPS,
    PHILOX_ROUNDS,
    TAIL_BLOCK,
    _attention_fwd,
    kernel_attention,
    op_filter_args,
)
from nkat_search.train.model import NKATAttention  # noqa: E402

TOP_K, TOP_P, TEMPERATURE = 6, 0.8, 0.65
TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
# (query block, key block, warps) for the core timing; the first is the default. Session 7's H100
# (before the rand4x mask) ranked them 64x32 w4 8.61 ms, 64x64 w4 9.71, 32x64 w4 10.25, 128x32 w8
# 10.91, 128x64 w8 12.19, 64x64 w8 16.63: the last four are no longer timed.
TILE_CHOICES = ((BLOCK_M, BLOCK_N, NUM_WARPS), (64, 32, 4))
# The backward's own warps (bwd_num_warps), timed and checked beside the tiles' own (None) for
# every tile choice: at 4 warps every backward program spills at 64 x 64 tiles
# (results/kernel_registers.json), at 8 fewer or none.
BWD_WARPS_CHOICE = 8
# The dK / dV (and sparse slots) programs' own query tile (bwd_block_m), timed and checked at the
# default tiles for every backward mode: at 32 rows and 4 warps the atomic and split dK / dV
# programs spill nothing under Triton 3.6 (results/kernel_registers_triton36.json). Its 32-row
# score tiles may be formed with other MMA instructions than the forward's 64 rows: rows off in
# the agreement check would show that, and such a choice must not become the default.
BWD_BLOCK_M_CHOICE = 32
# Software pipelining depths timed at the best (tiles, bwd_mode) pair; 3 is Triton's default on
# sm_90, so that row repeats the best one.
NUM_STAGES_CHOICES = (1, 2, 3)


def explicit_core(q, k, v, scale, keep=None, dropout_p=0.0):
    """``NKATAttention.attend`` with the modulation off; ``keep`` replaces nn.Dropout's mask."""
    cfg = ModelConfig(embed_dim=32, num_heads=8, top_k=TOP_K, top_p=TOP_P, dropout_attn=0.0,
                      nkat_strength=0.0)
    attn = NKATAttention(32, 8, layer_index=0, cfg=cfg)
    attn.scale.fill_(scale)
    if keep is not None:
        attn.attn_drop = FixedDropout(keep, dropout_p)
    return attn.attend(q, k, v, None)


class FixedDropout(torch.nn.Module):
    def __init__(self, keep: torch.Tensor, p: float):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, weights: torch.Tensor) -> torch.Tensor:
        return weights * self.keep / (1.0 - self.p)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def inputs(batch, n, d, ties, device, seed):
    """q and k on a grid (integers / 16, or small integers for ties) that bf16 holds exactly and
    whose products sum exactly in float32: both sides then see bit-identical scores, so no
    near-tie at a threshold can go either way and every row must agree."""
    gen = torch.Generator(device=device).manual_seed(seed)
    if ties:  # small integers: many exact ties, at the k-th value and inside the nucleus
        q, k = torch.randint(-2, 3, (2, batch, 8, n, d), device=device, generator=gen).float()
    else:
        q, k = torch.randint(-32, 33, (2, batch, 8, n, d), device=device, generator=gen) / 16
    v = torch.randn(batch, 8, n, d, device=device, generator=gen)
    grad = torch.randn(batch, 8, n, d, device=device, generator=gen)
    return q, k, v, grad


def check_agreement(device, small: bool) -> bool:
    ok = True
    batch = 2 if small else 8
    token_counts = (17, 33) if small else (17, 65, 257)
    default = (TILE_CHOICES[0], BWD_MODE)
    modes = sorted(BWD_MODES, key=lambda mode: mode != BWD_MODE)  # the default first
    cases = [(n, d, dtype, ties, TILE_CHOICES[0], mode, {}) for mode in modes
             for n in token_counts for d in (48, 56, 64)
             for dtype in (torch.float32, torch.bfloat16) for ties in (False, True)]
    # The other tile choices of the timing, at the longest rows in bf16: a choice whose kernels
    # form the scores with different MMA instructions (e.g. a 32-row query block: mma.sync in
    # the forward, wgmma in the dK / dV kernel) would show here as rows off. They and the other
    # backward mode do not decide PASS; a BAD one must not become the default.
    cases += [(token_counts[-1], 48, torch.bfloat16, ties, tiles, mode, {})
              for tiles in TILE_CHOICES[1:] for mode in BWD_MODES for ties in (False, True)]
    # Tail tiles the other way than the default (TAIL_BLOCK), at the longest rows: a candidate.
    tail = 0 if TAIL_BLOCK else 16
    cases += [(token_counts[-1], 48, dtype, ties, TILE_CHOICES[0], mode, dict(tail_block=tail))
              for mode in BWD_MODES for dtype in (torch.float32, torch.bfloat16)
              for ties in (False, True)]
    # The backward on its own warps (BWD_WARPS_CHOICE), candidates of the timing: another warp
    # count must not form any score otherwise than the forward did (rows off would show it).
    cases += [(token_counts[-1], 48, torch.bfloat16, ties, tiles, mode,
               dict(bwd_num_warps=BWD_WARPS_CHOICE))
              for tiles in TILE_CHOICES for mode in BWD_MODES for ties in (False, True)]
    # The backward's own query tile (BWD_BLOCK_M_CHOICE), a candidate of the timing likewise.
    cases += [(token_counts[-1], 48, torch.bfloat16, ties, TILE_CHOICES[0], mode,
               dict(bwd_block_m=BWD_BLOCK_M_CHOICE))
              for mode in BWD_MODES for ties in (False, True)]
    for n, d, dtype, ties, tiles, mode, options in cases:
        block_m, block_n, warps = tiles
        scale = d ** -0.5 / TEMPERATURE
        q, k, v, grad = inputs(batch, n, d, ties, device, seed=n * 100 + d)
        q, k, v = (t.to(dtype) for t in (q, k, v))
        ref_leaves = [t.float().requires_grad_() for t in (q, k, v)]
        ref = explicit_core(*ref_leaves, scale)
        ref_grads = torch.autograd.grad(ref, ref_leaves, grad)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        started = time.perf_counter()
        out = kernel_attention(*leaves, scale, TOP_K, TOP_P, 0.0, block_m=block_m,
                               block_n=block_n, num_warps=warps, bwd_mode=mode, **options)
        grads = torch.autograd.grad(out, leaves, grad.to(dtype))
        seconds = time.perf_counter() - started
        errors = {"out": rel(out, ref)}
        errors.update({name: rel(g, r) for name, g, r in
                       zip(("dq", "dk", "dv"), grads, ref_grads)})
        row_err = ((out.double() - ref.double()).abs().amax(-1)
                   / ref.double().abs().max())
        bad_rows = int((row_err > TOL[dtype]).sum())
        worst = max(errors.values())
        passed = worst < TOL[dtype]
        if (tiles, mode) == default and not options:
            ok &= passed  # the others are candidates: a BAD one is not to be used
        print(f"{'ok  ' if passed else 'BAD '} n={n:<3} d={d} "
              f"{str(dtype).removeprefix('torch.'):<8} {'ties  ' if ties else 'random'}"
              f" tiles {block_m}x{block_n} w{warps} bwd {mode}"
              + "".join(f" {key} {value}" for key, value in options.items())
              + " max rel err " + " ".join(f"{k} {v:.1e}" for k, v in errors.items())
              + f"; rows off {bad_rows}/{out.shape[0] * 8 * n}"
              + f" (tol {TOL[dtype]:.0e}, {seconds:.1f} s)", flush=True)
    check_tail_consistency(device, small)
    ok &= check_dropout(device, small)
    return ok


def check_tail_consistency(device, small: bool) -> None:
    """Tail tiles of 16 against none on random bf16 data (not on a grid): the forward's threshold
    is one of its scores, and the backward keeps what scores >= it, so backward must form each
    score bit for bit as the forward did. A tiling whose kernels formed some score with
    different MMA instructions would drop the threshold's own entry in many rows: gradients far
    off in most rows, where near-ties between the two tilings move only a few. Reported; the
    default's agreement rows decide PASS."""
    n = 33 if small else 257
    batch = 2 if small else 8
    gen = torch.Generator(device=device).manual_seed(9)
    q, k, v, grad = (t.to(torch.bfloat16) for t in
                     torch.randn(4, batch, 8, n, 48, device=device, generator=gen).unbind(0))
    scale = 48 ** -0.5 / TEMPERATURE
    for mode in BWD_MODES:
        runs = []
        for tail_block in (0, 16):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out = kernel_attention(*leaves, scale, TOP_K, TOP_P, 0.0, bwd_mode=mode,
                                   tail_block=tail_block)
            runs.append([out, *torch.autograd.grad(out, leaves, grad)])
        errors = {name: rel(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), *runs[::-1])}
        rows = q.shape[0] * 8 * n
        off = {}
        for name, index in (("out", 0), ("dq", 1)):
            row_err = ((runs[1][index].double() - runs[0][index].double()).abs().amax(-1)
                       / runs[0][index].double().abs().max())
            off[name] = int((row_err > TOL[torch.bfloat16]).sum())
        passed = max(off.values()) <= rows // 100
        print(f"{'ok  ' if passed else 'BAD '} random bf16 n={n} tail_block 16 against 0, "
              f"bwd {mode}: rows off out {off['out']}/{rows}, dq {off['dq']}/{rows}; max rel err "
              + " ".join(f"{key} {value:.1e}" for key, value in errors.items()), flush=True)


def check_dropout(device, small: bool) -> bool:
    p = 0.17
    n = 64
    batch = 2 if small else 16
    gen = torch.Generator(device=device).manual_seed(3)
    q, k = torch.randn(2, batch, 8, n, 64, device=device, generator=gen).unbind(0)
    eye = torch.eye(n, device=device).expand(batch, 8, n, n).contiguous()
    seed = torch.tensor([1234], dtype=torch.int64, device=device)
    weights = _attention_fwd(q, k, eye, seed, *op_filter_args(seed, 1.0, 0, 1.0, p),
                             64, 64, 4, False)[0]
    kept = weights > 0
    share = kept.float().mean().item()
    sigma = (p * (1 - p) / kept.numel()) ** 0.5
    probs = (q @ k.transpose(-2, -1)).softmax(dim=-1)
    scaling = rel(weights[kept], probs[kept] / (1 - p))
    share_ok = abs(share - (1 - p)) < 5 * sigma and scaling < 1e-4
    print(f"{'ok  ' if share_ok else 'BAD '} dropout {p}: kept share {share:.4f} (expected "
          f"{1 - p:.4f} +- {sigma:.4f}), kept weights vs probs / (1 - p) rel err {scaling:.1e}")

    # Gradients on a fixed seed against the explicit core given the forward's own mask.
    p = 0.3
    n, d = 64, 64
    q, k, v, grad = inputs(batch, n, d, False, device, seed=5)
    scale = d ** -0.5 / TEMPERATURE
    keep = _attention_fwd(q, k, eye, seed, *op_filter_args(seed, scale, TOP_K, TOP_P, p),
                          64, 64, 4, False)[0] > 0
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = explicit_core(*ref_leaves, scale, keep=keep, dropout_p=p)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad)
    # The default bwd_mode decides; the other is a candidate.
    for mode in BWD_MODES:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = _attention_fwd(*leaves, seed, *op_filter_args(seed, scale, TOP_K, TOP_P, p),
                             64, 64, 4, False, mode)[0]
        grads = torch.autograd.grad(out, leaves, grad)
        errors = {"out": rel(out, ref)}
        errors.update({name: rel(g, r) for name, g, r in
                       zip(("dq", "dk", "dv"), grads, ref_grads)})
        passed = max(errors.values()) < 1e-4
        if mode == BWD_MODE:
            grad_ok = passed
        print(f"{'ok  ' if passed else 'BAD '} dropout {p}, fixed seed, bwd {mode}: forward and "
              "backward on one mask, max rel err "
              + " ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    # The other Philox round count (a candidate): its own mask, kept share and gradients.
    rounds = 7 if PHILOX_ROUNDS == 10 else 10
    keep = _attention_fwd(q, k, eye, seed, *op_filter_args(seed, scale, TOP_K, TOP_P, p),
                          64, 64, 4, False, philox_rounds=rounds)[0] > 0
    all_kept = _attention_fwd(q, k, eye, seed, *op_filter_args(seed, scale, 0, 1.0, p),
                              64, 64, 4, False, philox_rounds=rounds)[0] > 0
    share = all_kept.float().mean().item()
    sigma = (p * (1 - p) / all_kept.numel()) ** 0.5
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = explicit_core(*ref_leaves, scale, keep=keep, dropout_p=p)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = _attention_fwd(*leaves, seed, *op_filter_args(seed, scale, TOP_K, TOP_P, p),
                         64, 64, 4, False, BWD_MODE, philox_rounds=rounds)[0]
    grads = torch.autograd.grad(out, leaves, grad)
    errors = {"out": rel(out, ref)}
    errors.update({name: rel(g, r) for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
    passed = max(errors.values()) < 1e-4 and abs(share - (1 - p)) < 5 * sigma
    print(f"{'ok  ' if passed else 'BAD '} dropout {p}, philox_rounds {rounds}: kept share "
          f"{share:.4f} (expected {1 - p:.4f} +- {sigma:.4f}), forward and backward on one mask, "
          "max rel err " + " ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    return share_ok and grad_ok


def time_layers(device, batch: int, steps: int, out_path: Path | None,
                choices_only: bool = False) -> None:
    """Times the core variants first (they decide the kernel's defaults), then whole layers.
    The variants that depend on the best (tiles, bwd_mode) pair take it from the rows before.
    ``choices_only``: SDPA and the (tiles, bwd_mode, bwd warps) choices alone, for short leases."""
    from nkat_search.train.loop import CUDA_COMPILE_MODE

    n, dim = 257, 384
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, n, dim, device=device, generator=gen)
    rows = []
    title = (f"batch {batch}, {n} tokens, embed {dim}, bf16, {steps} steps "
             f"({torch.cuda.get_device_name(device)}, torch {torch.__version__})")

    def timed(name, fn):
        """Milliseconds per call of ``fn`` (None if it failed); the row goes to the table and,
        rewritten after every row so that a cut-off run keeps what it timed, to ``out_path``."""
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        started = time.perf_counter()
        row = {"name": name, "device": torch.cuda.get_device_name(device)}
        try:
            for _ in range(3):
                fn()
            torch.cuda.synchronize(device)
            row["warm_s"] = round(time.perf_counter() - started, 1)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(steps):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            row["ms"] = round(begin.elapsed_time(end) / steps, 3)
            row["peak_gib"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**30, 3)
        except Exception as err:  # noqa: BLE001 - one failed variant must not hide the others
            row.update(ms=None, peak_gib=None, error=f"{type(err).__name__}: {str(err)[:300]}")
        rows.append(row)
        print(f"timed {name}", flush=True)
        if out_path is not None:
            out_path.write_text(json.dumps(rows, indent=1) + "\n")
        torch._dynamo.reset()
        return row["ms"]

    q, k, v = (t.requires_grad_() for t in torch.randn(
        3, batch, 8, n, dim // 8, device=device, dtype=torch.bfloat16, generator=gen).unbind(0))
    scale = (dim // 8) ** -0.5 / TEMPERATURE
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def core(fn):
        def step():
            fn().float().sum().backward()
        return step

    def forward_only(fn):
        def step():
            with torch.no_grad():
                fn()
        return step

    def kernel(top_k=TOP_K, top_p=TOP_P, dropout=0.17, tiles=TILE_CHOICES[0], qq=q, kk=k,
               **options):
        block_m, block_n, warps = tiles
        return lambda: kernel_attention(qq, kk, v, scale, top_k, top_p, dropout, block_m=block_m,
                                        block_n=block_n, num_warps=warps, **options)

    def tile_name(tiles):
        return f"{tiles[0]}x{tiles[1]} w{tiles[2]}"

    filt = f"top_k {TOP_K} top_p {TOP_P}"
    # Tiles x backward mode (and the backward's warps), filter on, dropout 0.17: the best is the
    # base of what follows.
    timed("core sdpa (no filter), dropout 0.17",
          core(lambda: sdpa(q, k, v, dropout_p=0.17, scale=scale)))
    best, best_ms = (TILE_CHOICES[0], BWD_MODE, None, None), float("inf")
    # The default tiles and mode first, each mode's backward warps and query tile side by side:
    # a short lease times the choices that matter most first.
    modes = sorted(BWD_MODES, key=lambda mode: mode != BWD_MODE)
    choices = [(tiles, mode, warps, block_m) for tiles in TILE_CHOICES for mode in modes
               for warps, block_m in ((None, None), (BWD_WARPS_CHOICE, None),
                                      (None, BWD_BLOCK_M_CHOICE))
               if block_m is None or tiles == TILE_CHOICES[0]]

    def backward_name(mode, bwd_warps, bwd_block_m):
        return (f"bwd {mode}" + ("" if bwd_warps is None else f", bwd_num_warps {bwd_warps}")
                + ("" if bwd_block_m is None else f", bwd_block_m {bwd_block_m}"))

    for tiles, mode, bwd_warps, bwd_block_m in choices:
        ms = timed(f"core kernel {filt}, dropout 0.17, {tile_name(tiles)}, "
                   + backward_name(mode, bwd_warps, bwd_block_m),
                   core(kernel(tiles=tiles, bwd_mode=mode, bwd_num_warps=bwd_warps,
                               bwd_block_m=bwd_block_m)))
        if ms is not None and ms < best_ms:
            best, best_ms = (tiles, mode, bwd_warps, bwd_block_m), ms
    tiles, mode, bwd_warps, bwd_block_m = best
    at = f"{tile_name(tiles)}, " + backward_name(mode, bwd_warps, bwd_block_m)
    best_backward = dict(tiles=tiles, bwd_mode=mode, bwd_num_warps=bwd_warps,
                         bwd_block_m=bwd_block_m)
    if choices_only:
        print_table(rows, title, at, best_ms, out_path)
        return
    for stages in NUM_STAGES_CHOICES:
        timed(f"core kernel {filt}, dropout 0.17, {at}, num_stages {stages}",
              core(kernel(**best_backward, num_stages=stages)))
    # Where the time goes: the dropout mask, the filter, the backward.
    timed(f"core kernel {filt}, dropout 0, {at}",
          core(kernel(dropout=0.0, **best_backward)))
    timed(f"core kernel no filter, dropout 0.17, {at}",
          core(kernel(top_k=0, top_p=1.0, **best_backward)))
    timed("forward only: core sdpa (no filter), dropout 0.17",
          forward_only(lambda: sdpa(q, k, v, dropout_p=0.17, scale=scale)))
    timed(f"forward only: core kernel {filt}, dropout 0.17, {tile_name(tiles)}",
          forward_only(kernel(tiles=tiles)))
    timed(f"forward only: core kernel no filter, dropout 0.17, {tile_name(tiles)}",
          forward_only(kernel(top_k=0, top_p=1.0, tiles=tiles)))
    # Skipping tiles whose probabilities are all 0 pays where attention concentrates: an
    # attention sink (every row keeps keys among the first 4; the other tiles are all empty).
    # On random q, k it cost 1.2 ms (session 7), so that pair is not timed again.
    sink_q = (q.detach() * 0.1 + 1.0).requires_grad_()
    sink_k = (k.detach() * 0.1).index_add(2, torch.arange(4, device=device), torch.full(
        (batch, 8, 4, dim // 8), 3.0, device=device, dtype=k.dtype)).requires_grad_()
    for skip in (False, True):
        timed(f"core kernel {filt}, dropout 0.17, {at}, sink, skip_empty {skip}",
              core(kernel(qq=sink_q, kk=sink_k, skip_empty=skip, **best_backward)))
    # The defaults before session 12, against the rows above (which ran TAIL_BLOCK 16 and
    # PHILOX_ROUNDS 7): no tail tiles (257 = 4 x 64 + 1, so the last 64-wide block of rows and
    # of keys holds one valid row or key), 10 Philox rounds, and both (session 12's 6.53 ms).
    timed(f"core kernel {filt}, dropout 0.17, {at}, tail_block 0",
          core(kernel(**best_backward, tail_block=0)))
    timed(f"forward only: core kernel {filt}, dropout 0.17, {tile_name(tiles)}, tail_block 0",
          forward_only(kernel(tiles=tiles, tail_block=0)))
    timed(f"core kernel no filter, dropout 0.17, {at}, tail_block 0",
          core(kernel(top_k=0, top_p=1.0, **best_backward, tail_block=0)))
    timed(f"core kernel {filt}, dropout 0.17, {at}, philox_rounds 10",
          core(kernel(**best_backward, philox_rounds=10)))
    timed(f"core kernel {filt}, dropout 0.17, {at}, tail_block 0, philox_rounds 10",
          core(kernel(**best_backward, tail_block=0, philox_rounds=10)))

    def layer_step(path, filters_off=False, compiled=False):
        values = dict(top_k=0, top_p=1.0, nkat_strength=0.0) if filters_off else {}
        cfg = ModelConfig(embed_dim=dim, num_heads=8, **values)
        torch.manual_seed(0)
        attn = NKATAttention(dim, 8, layer_index=0, cfg=cfg, path=path).to(device).train()
        forward = torch.compile(attn, mode=CUDA_COMPILE_MODE) if compiled else attn
        inp = x.clone().requires_grad_()

        def step():
            # Gradients start from None each step, as the training step's zero_grad leaves them:
            # accumulating into the last replay's .grad reads a CUDA graph output the next
            # replay overwrote (session 7's H100 run failed every compiled row that way).
            attn.zero_grad(set_to_none=True)
            inp.grad = None
            if compiled:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = forward(inp)
            out.float().sum().backward()
        return step

    # Whole layers (the kernel with its module defaults), last: compiling them takes the longest.
    timed("layer sdpa_filters_off, compiled", layer_step("auto", filters_off=True, compiled=True))
    timed("layer fused, compiled", layer_step("fused", compiled=True))
    timed("layer kernel, compiled", layer_step("kernel", compiled=True))
    timed("layer kernel, eager", layer_step("kernel"))

    print_table(rows, title, at, best_ms, out_path)


def print_table(rows: list[dict], title: str, at: str, best_ms: float,
                out_path: Path | None) -> None:
    print(f"\nforward + backward unless marked, {title}")
    print(f"best core kernel (tiles, bwd_mode, bwd_num_warps, bwd_block_m): {at}, "
          f"{best_ms:.2f} ms")
    width = max(len(row["name"]) for row in rows)
    print(f"{'variant':<{width}} {'ms':>8} {'peak GiB':>8} {'warm s':>6}")
    for row in rows:
        if row["ms"] is None:
            print(f"{row['name']:<{width}}   failed {row['error'][:150]}")
        else:
            print(f"{row['name']:<{width}} {row['ms']:8.2f} {row['peak_gib']:8.2f} "
                  f"{row['warm_s']:6.1f}")
    if out_path is not None:
        print(f"wrote {out_path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-timing", action="store_true", help="part 1 only")
    parser.add_argument("--no-check", action="store_true", help="part 2 only")
    parser.add_argument("--out", type=Path, help="also write the timing rows here as JSON")
    parser.add_argument("--choices-only", action="store_true",
                        help="part 2: SDPA and the kernel's 15 (tiles, bwd_mode, backward "
                             "warps or query tile) choices only, 16 of its 35 rows")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("attention_kernel_check: no CUDA device here (--device cpu with TRITON_INTERPRET=1 "
              "for a smoke run)", file=sys.stderr)
        return 2
    import triton

    print(f"torch {torch.__version__}, triton {triton.__version__}, {device}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 comparisons are float32 ones
    torch.backends.cudnn.allow_tf32 = False
    small = device.type == "cpu"
    passed = True
    if not args.no_check:
        passed = check_agreement(device, small)
        print("PASS" if passed else "FAIL", flush=True)
    if not args.no_timing and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        time_layers(device, args.batch, args.steps, args.out, args.choices_only)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
