"""K trials on one GPU, with and without CUDA MPS: how much training the GPU does at once.

A study's trials differ in cost by more than 10x (17 to 257 tokens), so images/s summed over
processes says little. This benchmark takes the first configurations of a study's trial stream
(the file's enqueued ones, then random draws from its space with its seed: the mix a study starts
with), measures each one's training rate alone, then runs K of them at once (configurations
0..K-1, one process each, the trainer's own step: augmentation, compiled model with CUDA graphs,
AdamW, EMA) and reports

    packing speed-up = sum over the K processes of (images/s together) / (images/s alone)

that is, how many trials' worth of training the GPU does at once, against one at a time. Every
process compiles and warms up first; all of them start their timed window together and train for
``--seconds``. With ``--mps on`` the parent starts a CUDA MPS control daemon for the run
(``nkat_search.cli.mps``) and stops it after.

    python benchmarks/packing.py --data-dir /root/nkat-data --k 2 4 6 --mps off on \
        --out results/packing.json

Compile caches are warm after the first run, so runs are ordered largest K first (the cold
compiles then happen in parallel). GPU only; prints a table and writes JSON, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from nkat_search.train.model import tokens_per_image  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, default=REPO / "studies" / "round2.yaml")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4, 6], metavar="K",
                        help="trials at once (1, alone, is always measured for each config)")
    parser.add_argument("--mps", nargs="+", choices=("off", "on"), default=["off", "on"])
    parser.add_argument("--seconds", type=float, default=10.0, help="timed window per run")
    parser.add_argument("--warmup", type=int, default=15, help="steps before the window")
    parser.add_argument("--data-dir", metavar="DIR")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "packing.json")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def mix(study: Path, count: int) -> list[dict]:
    """The first ``count`` configurations of the study's trial stream, as flat config dicts."""
    import yaml

    from nkat_search.config import RunConfig
    from scaling import fixed_configurations

    data = yaml.safe_load(study.read_text())
    params = fixed_configurations(data, data.get("seed", 0), count)
    fixed = dict(data.get("fixed") or {})
    return [RunConfig.from_dict(fixed | p | {"dataset": "cifar10"}).to_dict() for p in params]


def tokens(config: dict) -> int:
    return tokens_per_image(config["conv_stem"], config["patch_size"])


# -- one process --------------------------------------------------------------------------------

def child(spec_path: Path) -> int:
    """Train the spec's configs one after the other (one: a packing run; several: "alone").

    Each: compile, warm up, say ready, wait for go (only when packed), train for the window.
    """
    import torch

    from nkat_search.config import RunConfig
    from nkat_search.train.data import load_dataset
    from profile_step import Stepper

    spec = json.loads(spec_path.read_text())
    device = torch.device("cuda")
    data = None
    results = []
    for index, config in zip(spec["indices"], spec["configs"]):
        cfg = RunConfig.from_dict(config)
        if data is None:
            data = load_dataset("cifar10", spec["data_dir"], device,
                                val_fraction=cfg.train.val_fraction, seed=cfg.train.seed)
        torch._dynamo.reset()
        torch.cuda.reset_peak_memory_stats(device)
        stepper = Stepper(cfg, data, device, mode="reduce-overhead", compile_augment=True)
        for _ in range(spec["warmup"]):
            stepper.full_step()
        torch.cuda.synchronize()
        Path(spec["ready"]).write_text("ready")
        while spec["go"] and not Path(spec["go"]).exists():
            time.sleep(0.01)
        steps, started = 0, time.perf_counter()
        # No host sync inside the window: the CPU queues steps ahead and one sync ends it.
        while time.perf_counter() - started < spec["seconds"]:
            stepper.full_step()
            steps += 1
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        results.append({"index": index, "steps": steps, "seconds": seconds,
                        "images_per_s": steps * cfg.train.batch_size / seconds,
                        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30})
        del stepper
        torch.cuda.empty_cache()
    Path(spec["result"]).write_text(json.dumps(results))
    return 0


# -- the parent ---------------------------------------------------------------------------------

def run(configs: list[dict], indices: list[int], mps_mode: str, args, work: Path,
        alone: bool = False) -> dict:
    """K processes, one config each, timed together; ``alone``: one process, configs in turn."""
    from nkat_search.cli.mps import start_or_join

    tag = f"k{len(indices)}-{mps_mode}-{time.monotonic_ns()}"
    folder = work / tag
    folder.mkdir(parents=True)
    daemon = None
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(indices)))
    if mps_mode == "on":
        daemon, line = start_or_join("on", folder, gpus=1)
        print(f"  {line}", flush=True)
        env |= daemon.env()
    go = folder / "go"
    processes, specs = [], []
    started = time.monotonic()
    try:
        groups = [indices] if alone else [[index] for index in indices]
        for slot, group in enumerate(groups):
            spec = {"indices": group, "configs": [configs[i] for i in group],
                    "data_dir": args.data_dir, "warmup": args.warmup, "seconds": args.seconds,
                    "go": None if alone else str(go), "ready": str(folder / f"ready-{slot}"),
                    "result": str(folder / f"result-{slot}")}
            path = folder / f"spec-{slot}.json"
            path.write_text(json.dumps(spec))
            log = open(folder / f"log-{slot}.txt", "wb")
            processes.append(subprocess.Popen([sys.executable, __file__, "--child", str(path)],
                                              stdout=log, stderr=subprocess.STDOUT, env=env))
            specs.append(spec)
        while not all(Path(s["ready"]).exists() for s in specs):
            if any(p.poll() not in (None, 0) for p in processes):
                break
            time.sleep(0.05)
        ready_s = time.monotonic() - started
        go.write_text("go")
        codes = [p.wait() for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
        if daemon is not None:
            daemon.stop()
    results = []
    for slot, spec in enumerate(specs):
        if Path(spec["result"]).exists():
            results.extend(json.loads(Path(spec["result"]).read_text()))
        else:
            tail = (folder / f"log-{slot}.txt").read_text(errors="replace").splitlines()[-20:]
            print("\n".join(["  child failed:", *tail]), flush=True)
    return {"k": 1 if alone else len(indices), "mps": mps_mode, "indices": indices,
            "exit_codes": codes,
            "compile_and_warmup_s": round(ready_s, 1), "processes": results}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args.child)
    import torch

    from gpu_sampling import gpu_names

    top = max(args.k)
    configs = mix(args.study, top)
    work = Path(tempfile.mkdtemp(prefix="nkat-packing-"))
    print(f"device: {', '.join(gpu_names())}; torch {torch.__version__}; mix of {top} from "
          f"{args.study.name}: tokens {[tokens(c) for c in configs]}", flush=True)
    runs = []
    # Largest K first: the cold compiles of every config then run side by side.
    for k in sorted(args.k, reverse=True):
        for mode in args.mps:
            row = run(configs, list(range(k)), mode, args, work)
            runs.append(row)
            print(f"K={k} mps {mode}: " + ", ".join(
                f"#{p['index']} {p['images_per_s']:,.0f}" for p in row["processes"])
                + f" images/s (ready after {row['compile_and_warmup_s']} s)", flush=True)
    row = run(configs, list(range(top)), "off", args, work, alone=True)
    runs.append(row)
    alone = {p["index"]: p["images_per_s"] for p in row["processes"]}
    for index in range(top):
        print(f"alone #{index} ({tokens(configs[index])} tokens): "
              f"{alone.get(index, float('nan')):,.0f} images/s", flush=True)
    table = []
    for row in runs:
        if row["k"] == 1:
            continue
        parts = [p["images_per_s"] / alone[p["index"]] for p in row["processes"]
                 if p["index"] in alone]
        row["speedup"] = sum(parts) if len(parts) == row["k"] else None
        row["images_per_s_sum"] = sum(p["images_per_s"] for p in row["processes"])
        table.append(row)
    print(f"{'K':>3} {'MPS':>4} {'speed-up':>9} {'images/s sum':>13} {'peak GiB max':>13}")
    for row in sorted(table, key=lambda r: (r["k"], r["mps"])):
        speedup = f"{row['speedup']:.2f}x" if row["speedup"] is not None else "-"
        peak = max((p["peak_gib"] for p in row["processes"]), default=0.0)
        print(f"{row['k']:>3} {row['mps']:>4} {speedup:>9} {row['images_per_s_sum']:>13,.0f} "
              f"{peak:>13.1f}")
    result = {"command": shlex.join([sys.executable, __file__, *(argv or sys.argv[1:])]),
              "device": ", ".join(gpu_names()), "torch": torch.__version__,
              "study_file": str(args.study), "seconds": args.seconds, "warmup": args.warmup,
              "configs": configs, "tokens": [tokens(c) for c in configs],
              "alone_images_per_s": alone, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
