"""What torch.compile costs a trial before its first epoch, per compile scope, side by side.

For a few Round 2 architectures (``stem/patch/embed_dim/depth``) and each scope of
``TrainOptions.compile_scope`` ("model": the whole model; "blocks": each Block, one graph shared by
all blocks), one row of:

- ``compile_s``: what the first ``WARM_STEPS`` training steps took beyond as many steady steps
  (as ``Timings`` counts a run's compile time), ``first_step_s``: the first step alone;
- ``step_ms``: a steady training step (forward, backward, clip, AdamW) at ``--batch``, the
  median of 5 chunks of ``--steps``;
- ``graphs``: Dynamo graphs compiled, and Inductor's FX graph cache hits and misses.

Every measurement runs in a fresh process with its own empty Inductor and Triton cache folders, so
no row is flattered by an earlier one. Then one pair per scope runs with a warm cache: the
``--warm`` architecture after the ``--warm-from`` one in the same cache folder (same embed_dim and
tokens, other stem and depth), the cross-trial case that only "blocks" can hit. The second of the
pair also has other continuous hyperparameters (``OTHER_KNOBS``: temperature, top_p, dropouts,
strength), as two trials of a study would: they are buffers of the model, inputs of the graph, so
only the shapes and top_k decide whether the cache entry fits.

    python benchmarks/compile_cost.py --out results/compile_cost.json            # one GPU
    python benchmarks/compile_cost.py --device cpu --archs tiny/2/384/7 --out /tmp/cc.json

Absolute times mean something only from a GPU; on the CPU (Inductor's default mode, no CUDA
graphs, small batch) only the ratios between rows of one run do.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nkat_search.config import RunConfig  # noqa: E402
from nkat_search.train.loop import (COMPILE_SCOPES, CUDA_COMPILE_MODE, WARM_STEPS,  # noqa: E402
                                    compile_model, param_groups, soft_cross_entropy)
from nkat_search.train.model import build_model  # noqa: E402

# The baseline (17 tokens), the longest rows of the space (65 tokens, deepest, widest), and one
# between; ConvStem, patch, embed_dim, depth.
ARCHS = ["tiny/2/384/7", "off/4/512/9", "small/2/448/8"]
# Same Block shape as the baseline (384 wide, 17 tokens), other stem and depth.
WARM_FROM, WARM = "tiny/2/384/7", "small/2/384/5"


# The warm row's continuous hyperparameters, all unlike the defaults the cache was filled with.
OTHER_KNOBS = {"temperature": 0.8, "top_p": 0.9, "dropout_attn": 0.2, "dropout_embed": 0.12,
               "nkat_strength": 0.004}


def model_config(arch: str, knobs: str = "default"):
    stem, patch, dim, depth = arch.split("/")
    fields = {"conv_stem": stem, "patch_size": int(patch), "embed_dim": int(dim),
              "depth": int(depth)}
    return RunConfig.from_dict(fields | (OTHER_KNOBS if knobs == "other" else {})).model


def measure(arch: str, scope: str, knobs: str, device: torch.device, batch: int,
            steps: int) -> dict:
    """One row, in this process: build, compile, time the first steps, then steady steps."""
    from torch._dynamo.utils import counters

    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = build_model(model_config(arch, knobs), 3, 10, device)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, fused=cuda)
    mode = CUDA_COMPILE_MODE if cuda else "default"
    forward = compile_model(model, mode, scope)
    images = torch.randn(batch, 3, 32, 32, device=device)
    targets = torch.nn.functional.one_hot(torch.arange(batch, device=device) % 10, 10).float()

    def step() -> None:
        if "reduce-overhead" in mode:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = soft_cross_entropy(forward(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def timed(n: int) -> float:
        sync()
        started = time.perf_counter()
        for _ in range(n):
            step()
        sync()
        return time.perf_counter() - started

    warm_steps = [timed(1) for _ in range(WARM_STEPS)]
    # The median of a few chunks: a CPU shared with other jobs stalls now and then.
    chunks = min(5, steps)
    steady = statistics.median(timed(steps // chunks) / (steps // chunks) for _ in range(chunks))
    warm, first = sum(warm_steps), warm_steps[0]
    inductor = counters["inductor"]
    return {"arch": arch, "scope": scope, "knobs": knobs, "compile_s": round(max(0.0, warm - WARM_STEPS * steady), 2),
            "first_step_s": round(first, 2), "step_ms": round(steady * 1e3, 2),
            "warm_steps_s": [round(t, 2) for t in warm_steps],
            "graphs": counters["stats"]["unique_graphs"],
            "fx_cache_hits": inductor["fxgraph_cache_hit"],
            "fx_cache_misses": inductor["fxgraph_cache_miss"],
            "device": torch.cuda.get_device_name(device) if cuda else "cpu", "batch": batch}


def run_child(args, arch: str, scope: str, cache: str, knobs: str = "default") -> dict:
    """``measure`` in a fresh process whose Inductor and Triton caches live in ``cache``."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=f"{cache}/triton")
    cmd = [sys.executable, __file__, "--child", arch, scope, knobs, "--device", args.device,
           "--batch", str(args.batch), "--steps", str(args.steps)]
    # Its warnings (a recompile, CUDA graphs skipped) go to this process's stderr.
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"{arch} {scope}: the measuring process failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--archs", nargs="+", default=ARCHS, help="stem/patch/embed_dim/depth")
    parser.add_argument("--scopes", nargs="+", default=list(COMPILE_SCOPES), choices=COMPILE_SCOPES)
    parser.add_argument("--warm-from", default=WARM_FROM)
    parser.add_argument("--warm", default=WARM, help="'' leaves the warm-cache rows out")
    parser.add_argument("--batch", type=int, help="default: 512 on a GPU, 16 on the CPU")
    parser.add_argument("--steps", type=int, help="steady steps timed (default: 50 GPU, 5 CPU)")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--child", nargs=3, metavar=("ARCH", "SCOPE", "KNOBS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    args.batch = args.batch or (512 if device.type == "cuda" else 16)
    args.steps = args.steps or (50 if device.type == "cuda" else 5)
    if args.child:
        print(json.dumps(measure(*args.child, device, args.batch, args.steps)))
        return 0

    rows = []
    columns = ("arch", "scope", "cache", "compile_s", "first_step_s", "step_ms", "graphs",
               "fx_cache_hits", "fx_cache_misses")
    print("  ".join(f"{c:>15}" for c in columns), flush=True)

    def add(row: dict) -> None:
        rows.append(row)
        print("  ".join(f"{row[c]!s:>15}" for c in columns), flush=True)

    with tempfile.TemporaryDirectory(prefix="compile-cost-") as tmp:
        for arch in args.archs:
            for scope in args.scopes:
                cache = tempfile.mkdtemp(dir=tmp)
                add(run_child(args, arch, scope, cache) | {"cache": "cold"})
        for scope in args.scopes if args.warm else []:
            cache = tempfile.mkdtemp(dir=tmp)
            run_child(args, args.warm_from, scope, cache)  # fills the cache
            add(run_child(args, args.warm, scope, cache, "other")
                | {"cache": f"warm ({args.warm_from})"})
    print(f"device: {rows[0]['device']}; torch {torch.__version__}; batch {args.batch}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
