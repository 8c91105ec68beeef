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
Part 2 times forward + backward of one attention layer (batch 512, 257 tokens, embed 384, bf16
autocast) on the kernel (eager and compiled), the fused path (compiled) and SDPA with the filters
off, and the core alone (q, k, v to output) on SDPA and on the kernel with a few tile choices
(query block, key block, warps): the default is ``BLOCK_M``, ``BLOCK_N``, ``NUM_WARPS`` in
``train/attention_kernel.py``, the place to change it.

Prints one line per check, ``PASS`` or ``FAIL`` at the end of part 1 (exit 1 on FAIL; decided by
the default tiles, the other tile choices are reported beside), then the timing table. Nothing is
written.

    python benchmarks/attention_kernel_check.py [--no-timing | --no-check] [--batch 512]
    TRITON_INTERPRET=1 python benchmarks/attention_kernel_check.py --device cpu   # smoke run
"""

from __future__ import annotations

import argparse
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
    NUM_WARPS,
    _attention_fwd,
    kernel_attention,
)
from nkat_search.train.model import NKATAttention  # noqa: E402

TOP_K, TOP_P, TEMPERATURE = 6, 0.8, 0.65
TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
# (query block, key block, warps) for the core timing; the first is the default.
TILE_CHOICES = ((BLOCK_M, BLOCK_N, NUM_WARPS), (64, 64, 8), (32, 64, 4), (128, 64, 8),
                (64, 32, 4), (128, 32, 8))


def explicit_core(q, k, v, scale, keep=None, dropout_p=0.0):
    """``NKATAttention.attend`` with the modulation off; ``keep`` replaces nn.Dropout's mask."""
    cfg = ModelConfig(embed_dim=32, num_heads=8, top_k=TOP_K, top_p=TOP_P, dropout_attn=0.0,
                      nkat_strength=0.0)
    attn = NKATAttention(32, 8, layer_index=0, cfg=cfg)
    attn.scale = scale
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
    cases = [(n, d, dtype, ties, TILE_CHOICES[0]) for n in token_counts for d in (48, 56, 64)
             for dtype in (torch.float32, torch.bfloat16) for ties in (False, True)]
    # The other tile choices of the timing, at the longest rows in bf16: a choice whose kernels
    # form the scores with different MMA instructions (e.g. a 32-row query block: mma.sync in
    # the forward, wgmma in the dK / dV kernel) would show here as rows off. They do not decide
    # PASS; a BAD one must not become the default.
    cases += [(token_counts[-1], 48, torch.bfloat16, ties, tiles) for tiles in TILE_CHOICES[1:]
              for ties in (False, True)]
    for n, d, dtype, ties, tiles in cases:
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
                               block_n=block_n, num_warps=warps)
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
        if tiles == TILE_CHOICES[0]:  # the others are candidates: a BAD one is not to be used
            ok &= passed
        print(f"{'ok  ' if passed else 'BAD '} n={n:<3} d={d} "
              f"{str(dtype).removeprefix('torch.'):<8} {'ties  ' if ties else 'random'}"
              f" tiles {block_m}x{block_n} w{warps}"
              f" max rel err " + " ".join(f"{k} {v:.1e}" for k, v in errors.items())
              + f"; rows off {bad_rows}/{out.shape[0] * 8 * n}"
              + f" (tol {TOL[dtype]:.0e}, {seconds:.1f} s)", flush=True)
    ok &= check_dropout(device, small)
    return ok


def check_dropout(device, small: bool) -> bool:
    p = 0.17
    n = 64
    batch = 2 if small else 16
    gen = torch.Generator(device=device).manual_seed(3)
    q, k = torch.randn(2, batch, 8, n, 64, device=device, generator=gen).unbind(0)
    eye = torch.eye(n, device=device).expand(batch, 8, n, n).contiguous()
    seed = torch.tensor([1234], dtype=torch.int64, device=device)
    weights = _attention_fwd(q, k, eye, seed, 1.0, 0, 1.0, p, 64, 64, 4, False)[0]
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
    keep = _attention_fwd(q, k, eye, seed, scale, TOP_K, TOP_P, p, 64, 64, 4, False)[0] > 0
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = _attention_fwd(*leaves, seed, scale, TOP_K, TOP_P, p, 64, 64, 4, False)[0]
    grads = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = explicit_core(*ref_leaves, scale, keep=keep, dropout_p=p)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad)
    errors = {"out": rel(out, ref)}
    errors.update({name: rel(g, r) for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
    grad_ok = max(errors.values()) < 1e-4
    print(f"{'ok  ' if grad_ok else 'BAD '} dropout {p}, fixed seed: forward and backward on one "
          f"mask, max rel err " + " ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    return share_ok and grad_ok


def time_layers(device, batch: int, steps: int) -> None:
    from nkat_search.train.loop import CUDA_COMPILE_MODE

    n, dim = 257, 384
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, n, dim, device=device, generator=gen)
    rows = []

    def timed(name, fn):
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        started = time.perf_counter()
        try:
            for _ in range(3):
                fn()
            torch.cuda.synchronize(device)
            warm = time.perf_counter() - started
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(steps):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            ms = begin.elapsed_time(end) / steps
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30
            rows.append((name, f"{ms:8.2f}", f"{peak:8.2f}", f"{warm:6.1f}"))
        except Exception as err:  # noqa: BLE001 - one failed variant must not hide the others
            rows.append((name, "failed", f"{type(err).__name__}: {str(err)[:150]}", ""))
        print(f"timed {name}", flush=True)
        torch._dynamo.reset()

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

    timed("layer sdpa_filters_off, compiled", layer_step("auto", filters_off=True, compiled=True))
    timed("layer fused, compiled", layer_step("fused", compiled=True))
    timed("layer kernel, compiled", layer_step("kernel", compiled=True))
    timed("layer kernel, eager", layer_step("kernel"))

    q, k, v = (t.requires_grad_() for t in torch.randn(
        3, batch, 8, n, dim // 8, device=device, dtype=torch.bfloat16, generator=gen).unbind(0))
    scale = (dim // 8) ** -0.5 / TEMPERATURE

    def core(fn):
        def step():
            fn().float().sum().backward()
        return step

    sdpa = torch.nn.functional.scaled_dot_product_attention
    timed("core sdpa (no filter), dropout 0.17",
          core(lambda: sdpa(q, k, v, dropout_p=0.17, scale=scale)))
    timed("core kernel no filter, dropout 0.17",
          core(lambda: kernel_attention(q, k, v, scale, 0, 1.0, 0.17)))
    for block_m, block_n, warps in TILE_CHOICES:
        timed(f"core kernel top_k 6 top_p 0.8, dropout 0.17, tiles {block_m}x{block_n} w{warps}",
              core(lambda: kernel_attention(q, k, v, scale, TOP_K, TOP_P, 0.17, block_m=block_m,
                                            block_n=block_n, num_warps=warps)))
    # Skipping tiles whose probabilities are all 0: on random q, k (few such tiles) and on an
    # attention sink (every row keeps keys among the first 4: the other tiles are all empty),
    # the two ends of what trained attention may look like.
    sink_q = (q.detach() * 0.1 + 1.0).requires_grad_()
    sink_k = (k.detach() * 0.1).index_add(2, torch.arange(4, device=device), torch.full(
        (batch, 8, 4, dim // 8), 3.0, device=device, dtype=k.dtype)).requires_grad_()
    for name, (qq, kk) in (("random", (q, k)), ("sink", (sink_q, sink_k))):
        for skip in (False, True):
            timed(f"core kernel top_k 6 top_p 0.8, dropout 0.17, {name}, skip_empty {skip}",
                  core(lambda: kernel_attention(qq, kk, v, scale, TOP_K, TOP_P, 0.17,
                                                skip_empty=skip)))

    print(f"\nforward + backward, batch {batch}, {n} tokens, embed {dim}, bf16, {steps} steps "
          f"({torch.cuda.get_device_name(device)}, torch {torch.__version__})")
    print(f"{'variant':<62} {'ms':>8} {'peak GiB':>8} {'warm s':>6}")
    for row in rows:
        print(f"{row[0]:<62} " + " ".join(f"{c:>8}" for c in row[1:]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-timing", action="store_true", help="part 1 only")
    parser.add_argument("--no-check", action="store_true", help="part 2 only")
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
        time_layers(device, args.batch, args.steps)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
