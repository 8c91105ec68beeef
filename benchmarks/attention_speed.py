"""Images/s and peak memory of the model step on each NKAT attention path, and an agreement check.

For 17, 65 and 257 tokens (ConvStem tiny + patch 2, off + patch 4, off + patch 2; everything else
the user's baseline: embed 384, depth 7, top_k 6, top_p 0.8, batch 512) this times the whole model
step on one fixed random batch, as ``train/loop.py`` runs it: bf16 autocast, the model compiled
with CUDA graphs (``CUDA_COMPILE_MODE``), loss, backward, gradient clipping, fused AdamW, EMA.
Four paths per token count:

- ``explicit``: ``NKATAttention.attend`` (topk / pairwise filters, masked softmax), forced;
- ``fused``: ``train/attention.py`` (per-row threshold, one fused kernel per direction), forced;
- ``kernel``: ``train/attention_kernel.py`` (Triton kernel pair, nothing N x N in memory), forced;
- ``sdpa_filters_off``: the same model with every NKAT filter off, on fused SDPA (the bar).

Every variant runs in its own process. They compile side by side (``--jobs`` at a time; compiling
is CPU work, and nine compiles in a row take most of a four-minute budget), then each times its
steps alone on the GPU while the others wait. Peak memory is each process's own
``max_memory_allocated`` from model build to the end of timing (compile and warm-up included).
A further process checks, on the GPU, that the compiled fused and kernel paths match the eager
explicit one (float32, forward and gradients, random and tied data), that the fused threshold and
the explicit filters give identical masks from the same bf16 logits, and the fused and kernel
dropouts' keep rates; it prints the errors and asserts nothing.

Prints a table and writes ``--out`` (default results/attention_speed.json): a list of rows with
``tokens``, ``path``, ``images_per_s``, ``ms_per_step``, ``ms_per_step_blocks`` (the timed steps
in four blocks: a row whose blocks differ by more than 10 % is flagged), ``peak_gib``,
``compile_s``, ``device`` (and ``error`` where a variant failed). ``--logs DIR`` keeps the
workers' logs there. ``--device cpu`` runs a tiny smoke version of the same
machinery (no CUDA graphs); its numbers mean nothing.

    python benchmarks/attention_speed.py [--tokens 17 65 257] [--steps 20] [--jobs 5] [--no-check]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from nkat_search.config import RunConfig  # noqa: E402
from nkat_search.train.model import (  # noqa: E402
    FUSED_MIN_TOKENS,
    KERNEL_BY_DEFAULT,
    KERNEL_MIN_TOKENS,
)

ARCHITECTURES = {  # tokens -> (conv_stem, patch_size)
    17: ("tiny", 2),
    65: ("off", 4),
    257: ("off", 2),
}
# Candidates: the kernel with other backward options (kernel_attention's arguments): bwd_mode
# "sparse" (attention_kernel.SPARSE_SLOTS), and the backward on 8 warps (BWD_NUM_WARPS). The
# split backward at key tiles of 32 and 8 warps is the one choice of the forward's query tiles
# whose programs spill nothing under the GPU machine's Triton 3.6, and the dK / dV programs on
# query tiles of 32 (bwd_block_m) spill nothing at the default tiles and warps
# (results/kernel_registers_triton36.json).
KERNEL_VARIANTS = {
    "kernel_sparse": dict(bwd_mode="sparse"),
    "kernel_bwd_w8": dict(bwd_num_warps=8),
    "kernel_sparse_bwd_w8": dict(bwd_mode="sparse", bwd_num_warps=8),
    "kernel_split_n32_bwd_w8": dict(bwd_mode="split", block_n=32, bwd_num_warps=8),
    "kernel_bwd_m32": dict(bwd_block_m=32),
}
PATHS = ("explicit", "fused", "kernel", "sdpa_filters_off", *KERNEL_VARIANTS)
FILTERS_OFF = {"top_k": 0, "top_p": 1.0, "nkat_strength": 0.0}


def run_config(tokens: int, path: str, args) -> RunConfig:
    stem, patch = ARCHITECTURES[tokens]
    values = {"conv_stem": stem, "patch_size": patch, "batch_size": args.batch}
    if args.depth is not None:
        values["depth"] = args.depth
    if args.embed_dim is not None:
        values["embed_dim"] = args.embed_dim
    if path == "sdpa_filters_off":
        values.update(FILTERS_OFF)
    return RunConfig.from_dict(values)


# --- worker: one variant ------------------------------------------------------------------------

class ModelStep:
    """The model step of ``train_model`` on one fixed batch (as benchmarks/profile_step.py)."""

    def __init__(self, cfg: RunConfig, path: str, device: torch.device, mode: str | None):
        from nkat_search.train.loop import EmaModel, param_groups
        from nkat_search.train.model import build_model

        torch.manual_seed(0)
        self.cfg = cfg
        if path in KERNEL_VARIANTS:
            import functools

            import nkat_search.train.model as model_module

            model_module.kernel_attention = functools.partial(model_module.kernel_attention,
                                                              **KERNEL_VARIANTS[path])
            path = "kernel"
        self.model = build_model(cfg.model, 3, 10, device,
                                 attention_path="auto" if path == "sdpa_filters_off" else path)
        self.ema = EmaModel(self.model, cfg.train.effective_ema())
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.train.weight_decay),
                                           lr=cfg.train.effective_lr(),
                                           fused=device.type == "cuda")
        self.forward = self.model if mode is None else torch.compile(self.model, mode=mode)
        self.cudagraphs = mode is not None and "reduce-overhead" in mode
        self.autocast = device.type == "cuda"
        self.device = device
        batch = cfg.train.batch_size
        gen = torch.Generator(device=device).manual_seed(0)
        self.images = torch.randn(batch, 3, 32, 32, device=device, generator=gen)
        labels = torch.randint(0, 10, (batch,), device=device, generator=gen)
        self.targets = torch.nn.functional.one_hot(labels, 10).float() * 0.9 + 0.01

    def __call__(self) -> None:
        from nkat_search.train.loop import soft_cross_entropy

        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.forward(self.images)
        loss = soft_cross_entropy(logits, self.targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.clip_grad,
                                       foreach=True)
        self.optimizer.step()
        self.ema.update()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def variant_worker(spec: dict) -> None:
    """Compile and warm up, say READY, wait for a line on stdin, time, say RESULT."""
    from nkat_search.train.loop import CUDA_COMPILE_MODE

    device = torch.device(spec["device"])
    row = {"tokens": spec["tokens"], "path": spec["path"]}
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        args = argparse.Namespace(**spec["args"])
        cfg = run_config(spec["tokens"], spec["path"], args)
        mode = None if args.eager else (CUDA_COMPILE_MODE if device.type == "cuda" else "default")
        step = ModelStep(cfg, spec["path"], device, mode)
        for _ in range(3):  # compile; CUDA graphs: warm-up run, record, first replay
            step()
        _sync(device)
        row["compile_s"] = round(time.perf_counter() - started, 1)
    except Exception as err:  # noqa: BLE001 - reported in the table, the others still run
        row["error"] = _one_line(err)
        traceback.print_exc()
        print("RESULT " + json.dumps(row), flush=True)
        return
    print("READY", flush=True)
    if not sys.stdin.readline():  # the main process is gone: do not time alone on nothing
        return
    try:
        for _ in range(2):  # the caches again, after waiting
            step()
        _sync(device)
        # Timed in blocks so that a slow stretch (another process on the GPU, clocks) shows as
        # blocks that disagree rather than hiding in the mean; the row reports the mean.
        blocks, total_s = [], 0.0
        for size in _block_sizes(args.steps):
            started = time.perf_counter()
            for _ in range(size):
                step()
            _sync(device)
            elapsed = time.perf_counter() - started
            total_s += elapsed
            blocks.append(elapsed / size * 1e3)
        ms = total_s / args.steps * 1e3
        row["ms_per_step"] = round(ms, 2)
        row["ms_per_step_blocks"] = [round(b, 2) for b in blocks]
        row["images_per_s"] = round(cfg.train.batch_size / ms * 1e3, 1)
        row["peak_gib"] = (round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                           if device.type == "cuda" else None)
    except Exception as err:  # noqa: BLE001
        row["error"] = _one_line(err)
        traceback.print_exc()
    print("RESULT " + json.dumps(row), flush=True)


def _block_sizes(steps: int, blocks: int = 4) -> list[int]:
    """``steps`` split into at most ``blocks`` near-equal timing blocks."""
    count = max(1, min(blocks, steps))
    return [steps // count + (1 if i < steps % count else 0) for i in range(count)]


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


# --- worker: the agreement check ----------------------------------------------------------------

def check_worker(spec: dict) -> None:
    """Fused and kernel (compiled) against explicit (eager) on the GPU; prints every error, asserts
    nothing."""
    from nkat_search.config import ModelConfig
    from nkat_search.train.attention import fused_attention, row_filter
    from nkat_search.train.attention_kernel import kernel_attention
    from nkat_search.train.model import NKATAttention, topk_mask, nucleus_mask, topk_nucleus_mask

    device = torch.device(spec["device"])
    small = device.type == "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 comparison is a float32 one
    torch.backends.cudnn.allow_tf32 = False

    def say(text: str) -> None:
        print("CHECK " + text, flush=True)

    def tokens(n: int, dim: int, ties: bool) -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(n)
        x = torch.randn(4 if small else 32, n, dim, device=device, generator=gen)
        if ties:  # identical tokens (blank background, zero padding): exactly tied logits
            x[:, 1::2] = x[:, 1:2]
            x[:, 2:8] = x[:, 3:4]
        return x

    dim = 32 if small else 384
    for n in spec["tokens"]:
        cfg = ModelConfig(embed_dim=dim, num_heads=8, dropout_attn=0.0, nkat_strength=0.3)
        # One layer per path, the same weights; the fused and kernel ones compiled.
        layers, forwards = {}, {}
        for path in ("explicit", "fused", "kernel"):
            layers[path] = NKATAttention(dim, 8, layer_index=0, cfg=cfg, path=path).to(device)
            layers[path].train().load_state_dict(layers["explicit"].state_dict())
            forwards[path] = (layers[path] if path == "explicit"
                              else torch.compile(layers[path], dynamic=False))
        for ties in (False, True):
            x = tokens(n, dim, ties)
            weight = torch.randn(x.shape, device=device, generator=torch.Generator(
                device=device).manual_seed(1))
            results = {}
            for path in ("explicit", "fused", "kernel"):
                if path == "kernel" and device.type == "cpu":
                    continue  # the kernel needs CUDA (or Triton's interpreter)
                layers[path].zero_grad(set_to_none=True)
                inp = x.clone().requires_grad_()
                out = forwards[path](inp)
                (out * weight).sum().backward()
                results[path] = [("out", out.detach()), ("grad_x", inp.grad)] + [
                    (name, p.grad.clone()) for name, p in layers[path].named_parameters()]
            for path in [p for p in results if p != "explicit"]:
                errors = []
                for (name, a), (_, b) in zip(results["explicit"], results[path]):
                    rel = ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()
                    errors.append(f"{name} {rel:.1e}")
                worst = max(float(e.split()[-1]) for e in errors)
                say(f"float32 layer, {n} tokens, {'ties' if ties else 'random'}, {path}: max "
                    f"relative error {worst:.1e} ({', '.join(errors)})")
        if device.type == "cuda":
            # Under bf16 autocast the explicit path rounds logits * scale to bf16 again, the
            # fused one scales the bf16 logits in float32, so a near-tie at a row's threshold
            # can go either way: the size of that difference, for reading training runs.
            x = tokens(n, dim, True)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                a = forwards["explicit"](x).float()
                for path in ("fused", "kernel"):
                    b = forwards[path](x).float()
                    rel = ((a - b).norm(dim=-1) / a.norm(dim=-1)).flatten()
                    say(f"bf16 autocast layer, {n} tokens, ties, {path}: per-token relative "
                        f"difference median {rel.median():.1e}, max {rel.max():.1e}")
        torch._dynamo.reset()

    # Which path the model takes by itself when compiled on this device (path "auto").
    import nkat_search.train.model as model_module
    from nkat_search.train.model import build_model

    for n in spec["tokens"]:
        stem, patch = ARCHITECTURES[n]
        cfg = ModelConfig(embed_dim=64, depth=2, conv_stem=stem, patch_size=patch)
        model = build_model(cfg, 3, 10, device)
        calls = {"fused_attention": [], "kernel_attention": []}
        real = {name: getattr(model_module, name) for name in calls}
        for name in calls:
            setattr(model_module, name,
                    lambda *a, _name=name, **kw: calls[_name].append(1) or real[_name](*a, **kw))
        try:
            torch.compile(model)(torch.randn(2, 3, 32, 32, device=device))
        finally:
            for name in calls:
                setattr(model_module, name, real[name])
        say(f"auto path, compiled on {device.type}, {n} tokens: kernel in "
            f"{len(calls['kernel_attention'])}, fused core in {len(calls['fused_attention'])} of "
            f"{cfg.depth} layers")
        torch._dynamo.reset()

    # Masks from the same bf16 logits: the explicit filters (eager) against the fused threshold
    # (compiled, the code that training runs).
    threshold_fn = torch.compile(lambda logits: row_filter(logits, 6, 0.8)[0], dynamic=False)
    for n in spec["tokens"]:
        for ties in (False, True):
            gen = torch.Generator(device=device).manual_seed(n + 7)
            logits = torch.randn(4 if small else 256, 8, n, n, device=device, generator=gen) * 3
            logits = (logits.round() if ties else logits).to(torch.bfloat16)
            fused = logits >= threshold_fn(logits)
            if n > 32:
                explicit = topk_nucleus_mask(logits, 6, 0.8)
            else:
                keep = topk_mask(logits, 6)
                explicit = keep & nucleus_mask(
                    logits.float().masked_fill(~keep, float("-inf")).softmax(dim=-1), 0.8)
            differ = fused != explicit
            rows = differ.any(dim=-1)
            text = (f"bf16 masks, {n} tokens, {'ties' if ties else 'random'}: "
                    f"{int(differ.sum())} of {differ.numel():,} entries differ in "
                    f"{int(rows.sum())} of {rows.numel():,} rows")
            if differ.any():
                # Distance of those rows' nucleus masses from p, in float64: float32 rounding
                # of a mass within ~1e-6 of p can go either way.
                x = logits[rows][:64].double()
                larger = x.unsqueeze(-2) > x.unsqueeze(-1)
                keep = larger.sum(-1) < 6
                probs = x.masked_fill(~keep, float("-inf")).softmax(-1)
                above = (larger * probs.unsqueeze(-2)).sum(-1)
                gap = (above - 0.8).abs()[differ[rows][:64]].max()
                text += f"; largest |mass above - p| among them {gap:.1e}"
            say(text)
    torch._dynamo.reset()

    # Dropout's keep rate, through the output: top-1 keeps one weight of 1 per row (no ties in
    # random logits), v = 1, so a row is 1 / (1 - p) if its weight survived and 0 if not.
    dropped = torch.compile(lambda q, k, v: fused_attention(q, k, v, 1.0, 1, 1.0, 0.17))
    gen = torch.Generator(device=device).manual_seed(3)
    batch = 2 if small else 64
    q, k = torch.randn(2, batch, 8, 257, 48, device=device, generator=gen).unbind(0)
    out = dropped(q, k, torch.ones(batch, 8, 257, 1, device=device))
    rate = (out > 0).float().mean().item()
    sigma = (0.17 * 0.83 / out.numel()) ** 0.5
    say(f"dropout 0.17, fused: keep rate {rate:.4f} (expected 0.8300 +- {sigma:.4f}), kept "
        f"weights {out[out > 0].min().item():.4f}..{out[out > 0].max().item():.4f} "
        f"(1/0.83 = 1.2048)")
    if device.type == "cuda":
        # The kernel wants a head dim of 16 at least; v = 1 in every column, the same reading.
        dropped = torch.compile(lambda q, k, v: kernel_attention(q, k, v, 1.0, 1, 1.0, 0.17))
        out = dropped(q, k, torch.ones(batch, 8, 257, 16, device=device))[..., 0]
        rate = (out > 0).float().mean().item()
        say(f"dropout 0.17, kernel: keep rate {rate:.4f} (expected 0.8300 +- {sigma:.4f}), kept "
            f"weights {out[out > 0].min().item():.4f}..{out[out > 0].max().item():.4f}")


# --- main: start the workers, let them compile, time them one by one ----------------------------

def _reader(name: str, stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put((name, line.rstrip("\n")))
    lines.put((name, None))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="*", default=[17, 65, 257],
                        choices=sorted(ARCHITECTURES))
    parser.add_argument("--paths", nargs="*", default=list(PATHS[:4]), choices=PATHS,
                        help="default: the four paths; the kernel's candidates "
                             f"({', '.join(KERNEL_VARIANTS)}) when named")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--depth", type=int, default=None, help="default: the baseline's 7")
    parser.add_argument("--embed-dim", type=int, default=None, help="default: the baseline's 384")
    parser.add_argument("--jobs", type=int, default=None,
                        help="variants compiling at once (default: CPUs / 3, at most 5); 1 runs "
                             "them strictly one after the other, one process alive at a time")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="after this many seconds of compiling, start no more variants and "
                             "stop those still compiling (reported as such), so that the table "
                             "and the JSON always come out")
    parser.add_argument("--no-check", action="store_true", help="skip the agreement check")
    parser.add_argument("--eager", action="store_true", help="no torch.compile (smoke runs)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=str(ROOT / "results" / "attention_speed.json"))
    parser.add_argument("--logs", default=None,
                        help="keep each worker's log in this folder (default: a new temporary "
                             "folder, named at the end)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        (check_worker if spec["kind"] == "check" else variant_worker)(spec)
        return 0

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("attention_speed: no CUDA device here; run it on a GPU (or --device cpu for a "
              "smoke run)", file=sys.stderr)
        return 2
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({os.cpu_count()} cores)")
    cpus = os.cpu_count() or 1
    jobs = args.jobs or max(1, min(5, cpus // 3))
    worker_args = {k: getattr(args, k) for k in ("steps", "batch", "depth", "embed_dim", "eager")}
    print(f"device: {device_name}; torch {torch.__version__}; batch {args.batch}, "
          f"{args.steps} timed steps, {jobs} compiling at once", flush=True)

    # Slowest compiles first; the check alongside them.
    variants = [(t, p) for t in sorted(args.tokens, reverse=True) for p in args.paths]
    specs = [("check", {"kind": "check", "device": args.device, "tokens": sorted(args.tokens)})]
    if args.no_check:
        specs = []
    specs += [(f"{t}/{p}", {"kind": "variant", "device": args.device, "tokens": t, "path": p,
                            "args": worker_args}) for t, p in variants]

    logs = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="attention_speed_"))
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT),
               TORCHINDUCTOR_COMPILE_THREADS=str(max(1, cpus // max(1, jobs))))
    lines: queue.Queue = queue.Queue()
    procs: dict[str, subprocess.Popen] = {}
    state: dict[str, str] = {}  # name -> starting | ready | done
    results: dict[str, dict] = {}
    pending = list(specs)
    started_at = time.perf_counter()

    def start_next() -> None:
        name, spec = pending.pop(0)
        log = open(logs / f"{name.replace('/', '_')}.log", "w")
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
            cwd=ROOT)
        procs[name], state[name] = proc, "starting"
        threading.Thread(target=_reader, args=(name, proc.stdout, lines), daemon=True).start()

    def handle(name: str, line: str | None) -> None:
        if line is None:
            procs[name].wait()
            if name != "check" and name not in results:
                tokens, path = name.split("/")
                results[name] = {"tokens": int(tokens), "path": path,
                                 "error": f"worker exited with {procs[name].returncode}"}
            state[name] = "done"
        elif line == "READY":
            state[name] = "ready"
        elif line.startswith("RESULT "):
            results[name] = json.loads(line[len("RESULT "):])
        elif line.startswith("CHECK "):
            print(f"check: {line[len('CHECK '):]}", flush=True)

    def busy() -> int:
        # With one job a variant is timed as soon as it is ready and the next starts after it.
        counted = ("starting",) if jobs > 1 else ("starting", "ready", "timing")
        return sum(1 for s in state.values() if s in counted)

    def go(name: str) -> None:
        state[name] = "timing"
        procs[name].stdin.write("go\n")
        procs[name].stdin.flush()

    killed: set[str] = set()

    def over_budget() -> bool:
        return time.perf_counter() - started_at > args.budget_s

    # Phase 1: compile (jobs at a time) until every variant is ready or finished.
    while pending or busy():
        while pending and busy() < jobs and not over_budget():
            start_next()
        if over_budget():
            for name, _ in pending:
                if name != "check":
                    tokens, path = name.split("/")
                    results[name] = {"tokens": int(tokens), "path": path,
                                     "error": f"not started: over the {args.budget_s:.0f} s budget"}
            pending.clear()
            for name, s in state.items():
                if s == "starting" and name not in killed:
                    killed.add(name)
                    procs[name].kill()
                    if name != "check":
                        tokens, path = name.split("/")
                        results[name] = {"tokens": int(tokens), "path": path, "error":
                                         f"stopped compiling at the {args.budget_s:.0f} s budget"}
        try:
            handle(*lines.get(timeout=5))
        except queue.Empty:
            continue
        if jobs == 1:
            for name in [n for n, s in state.items() if s == "ready"]:
                go(name)
    compile_wall = time.perf_counter() - started_at
    if "check" in killed:
        print(f"check: stopped at the {args.budget_s:.0f} s budget", flush=True)
    # Phase 2: each ready variant times alone, the others idle.
    for name, _ in specs:
        if state.get(name) == "ready":
            go(name)
            while state[name] != "done":
                handle(*lines.get())
    while any(s != "done" for s in state.values()):
        handle(*lines.get())

    rows = []
    for tokens, path in sorted(variants):
        row = results.get(f"{tokens}/{path}", {"tokens": tokens, "path": path,
                                                "error": "no result"})
        row["device"] = device_name
        rows.append(row)
    print(f"\ncompile phase {compile_wall:.0f} s, total {time.perf_counter() - started_at:.0f} s;"
          f" worker logs in {logs}")
    print(f"{'tokens':>6}  {'path':<23} {'images/s':>10} {'ms/step':>8} {'peak GiB':>9} "
          f"{'vs sdpa':>8} {'compile s':>9}")
    for row in rows:
        bar = next((r.get("images_per_s") for r in rows if r["tokens"] == row["tokens"]
                    and r["path"] == "sdpa_filters_off"), None)
        if "error" in row:
            print(f"{row['tokens']:>6}  {row['path']:<23} failed: {row['error']}")
            continue
        share = f"{row['images_per_s'] / bar:7.0%}" if bar else f"{'':>7}"
        peak = f"{row['peak_gib']:9.2f}" if row.get("peak_gib") is not None else f"{'':>9}"
        print(f"{row['tokens']:>6}  {row['path']:<23} {row['images_per_s']:>10,.0f} "
              f"{row['ms_per_step']:>8.1f} {peak} {share:>8} {row.get('compile_s', 0):>9.0f}")
    for row in rows:
        blocks = row.get("ms_per_step_blocks") or []
        if blocks and max(blocks) > 1.1 * min(blocks):
            print(f"uneven timing: {row['tokens']} tokens {row['path']}, ms per step by block "
                  f"{blocks}; run it again (worker logs in {logs})")
    for tokens in sorted(args.tokens):
        speed = {r["path"]: r.get("images_per_s") for r in rows if r["tokens"] == tokens}
        explicit, fused, kernel, bar = (speed.get(p) for p in PATHS[:4])
        taken = ("kernel" if KERNEL_BY_DEFAULT and tokens >= KERNEL_MIN_TOKENS else
                 "fused" if tokens >= FUSED_MIN_TOKENS else "explicit")
        candidates = [(name, speed.get(name), "90 %") for name in KERNEL_VARIANTS]
        for name, value, target in (("fused", fused, "70 %"), ("kernel", kernel, "90 %"),
                                    *candidates):
            if value and explicit:
                print(f"{tokens} tokens: {name} {value / explicit:.2f}x explicit"
                      + (f", {value / bar:.0%} of sdpa_filters_off (target {target})" if bar
                         else "")
                      + f"; training on a GPU takes {taken} (KERNEL_MIN_TOKENS = "
                      f"{KERNEL_MIN_TOKENS}, FUSED_MIN_TOKENS = {FUSED_MIN_TOKENS})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {out}")
    for name, row in results.items():
        if "error" in row:
            log = logs / f"{name.replace('/', '_')}.log"
            tail = log.read_text().strip().splitlines()[-15:] if log.exists() else []
            if tail:
                print(f"--- {name} failed; last lines of its log:\n" + "\n".join(tail))
    return 0


if __name__ == "__main__":
    sys.exit(main())
