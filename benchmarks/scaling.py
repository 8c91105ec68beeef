"""Search throughput against the number of workers W (one per GPU) and trials per GPU K.

One fixed Stage-1-only study, run once per configuration in a fresh storage: the study file
(default studies/round2_short.yaml) at a reduced epoch count, Stage 2 off (``stage2.datasets: []``,
so CIFAR-10 is the whole score), the gate near 0 and no pruner, so every trial trains every epoch.
Its whole budget is enqueued up front, drawn from the search space by a random sampler with the
file's seed (the file's own ``enqueue`` first): every configuration trains the same models and
only the parallelism differs. The heartbeat interval is 2 s, so a worker whose budget is spent
notices the end of the others' trials at once. Worker i runs ``nkat-search worker --device cuda:i
--trials-per-gpu K`` as a subprocess, with CUDA_VISIBLE_DEVICES unset and the CPU cores split
over all W*K processes (OMP_NUM_THREADS, unless set).

Measured from the storage after the workers exit: finished trials (any terminal state); wall
seconds from the first spawn to the last exit (worker start-up included) and the span from the
first trial's start to the last one's end; trials per hour over the wall time; training images/s
summed over the W*K worker processes (each: its trials' training images over their epoch seconds,
the ``datasets.cifar10.epoch_seconds`` the objective stores) and the same images over the wall
time; mean GPU utilisation per GPU (nvidia-smi every second; '-' without it); the ratios to the
W=1 K=1 run; and the invariants: the study holds exactly the budget's trials, each number once,
none left running, every worker exited 0 (PASS/FAIL). Prints a table and writes JSON with the GPU
names and the command line. Timings mean something only on GPUs; --quick checks on a CPU that it
runs.

    python benchmarks/scaling.py --workers 1 2 --trials-per-gpu 1 2 4 --data-dir DIR \
        --out results/scaling.json
    python benchmarks/scaling.py --quick --workers 1 2 --trials-per-gpu 1 --data-dir DIR

Only the standard library is imported at the top: the GPU machine has optuna and SQLAlchemy but
no psycopg2, which only ``--storage-base postgresql://...`` needs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_sampling import UtilisationSampler, gpu_names  # noqa: E402

CIFAR10_TRAIN_IMAGES = 50_000
TERMINAL = ("COMPLETE", "PRUNED", "FAIL")
# The CPU check: a tiny model on data slices, one epoch; the numbers say nothing about NKAT.
QUICK_FIXED = {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 4, "epochs": 1,
               "warmup": 0, "batch_size": 64, "val_fraction": 0.1, "train_limit": 512,
               "test_limit": 128}
QUICK_SEARCH = {"conv_stem": {"type": "categorical", "choices": ["tiny", "small"]},
                "lr": {"type": "float", "low": 5.0e-4, "high": 2.0e-3, "log": True}}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], metavar="W",
                        help="worker counts to run (one worker per GPU: cuda:0..cuda:W-1)")
    parser.add_argument("--trials-per-gpu", type=int, nargs="+", default=[1], metavar="K",
                        help="concurrent trials per GPU to run with each worker count")
    parser.add_argument("--study", type=Path, default=None, metavar="FILE",
                        help="base study file (default studies/round2_short.yaml, --quick: "
                        "studies/quick.yaml)")
    parser.add_argument("--trials", type=int, default=None, metavar="N",
                        help="trial budget of every run (default 12, --quick: 4)")
    parser.add_argument("--epochs", type=int, default=None, metavar="E",
                        help="CIFAR-10 epochs per trial (default 2, --quick: 1)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the enqueued configurations (default: the file's)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="cuda: worker i on cuda:i (default); cpu: every worker on cpu "
                        "(default with --quick)")
    parser.add_argument("--data-dir", metavar="DIR", help="dataset root, passed to the workers")
    parser.add_argument("--storage-base", metavar="URL",
                        help="postgresql://user:pw@host:port: one new database per run (default: "
                        "SQLite, one file per run under the work dir)")
    parser.add_argument("--work-dir", type=Path, metavar="DIR",
                        help="storage files, checkpoints and worker logs (default: a temp dir, "
                        "removed at the end unless --keep)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work dir and the PostgreSQL databases")
    parser.add_argument("--timeout", type=float, default=3600, metavar="S",
                        help="per run; workers still alive then get SIGTERM (the run is FAIL)")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE",
                        help="JSON results (default results/scaling.json; --quick: "
                        "runs/scaling_quick.json, CPU timings are not results)")
    parser.add_argument("--quick", action="store_true",
                        help="CPU-sized check: tiny model, data slices, 1 epoch, 4 trials, cpu")
    args = parser.parse_args(argv)
    default_study = "quick.yaml" if args.quick else "round2_short.yaml"
    args.study = args.study or REPO / "studies" / default_study
    args.trials = args.trials or (4 if args.quick else 12)
    args.epochs = args.epochs or (1 if args.quick else 2)
    args.device = args.device or ("cpu" if args.quick else "cuda")
    args.out = args.out or (REPO / "runs" / "scaling_quick.json" if args.quick
                            else REPO / "results" / "scaling.json")
    if min(args.workers) < 1 or min(args.trials_per_gpu) < 1 or args.trials < 1 or args.epochs < 1:
        parser.error("--workers, --trials-per-gpu, --trials and --epochs must be >= 1")
    return args


# -- the study ----------------------------------------------------------------------------------

def scaling_study_text(args: argparse.Namespace) -> str:
    """The base file as a Stage-1-only study with its whole budget enqueued (see the docstring)."""
    import yaml

    data = yaml.safe_load(args.study.read_text())
    seed = data.get("seed", 0) if args.seed is None else args.seed
    fixed = dict(data.get("fixed") or {})
    if args.quick:
        fixed |= QUICK_FIXED
        data["search"] = QUICK_SEARCH
        for key in QUICK_SEARCH:  # quick.yaml may fix what this check searches
            fixed.pop(key, None)
        data["enqueue"] = []
    fixed["epochs"] = args.epochs
    fixed["warmup"] = min(fixed.get("warmup", 5), args.epochs)  # 5: RunConfig's default
    data.update({
        "name": "scaling", "n_trials": args.trials, "seed": seed, "fixed": fixed,
        "gate": {"local_tpe": 1e-6},  # must be > 0; every trial is timed to its last epoch
        "stage2": {"datasets": []},
        "pruner": {"type": "none"},
        "sampler": {**(data.get("sampler") or {}), "type": "random"},
        # A worker whose budget is spent polls for the others' trials every heartbeat interval
        # (30 s in round2_short.yaml); that wait would sit in the wall time of every run.
        "heartbeat": {**(data.get("heartbeat") or {}), "interval": 2,
                      "grace": max(60, (data.get("heartbeat") or {}).get("grace", 0))},
    })
    data["enqueue"] = fixed_configurations(data, seed, args.trials)
    return yaml.safe_dump(data, sort_keys=False)


def fixed_configurations(data: dict, seed: int, count: int) -> list[dict]:
    """The file's enqueued configs, then random draws from its space with ``seed``: ``count``."""
    import optuna
    import yaml

    from nkat_search.search.space import suggest_config
    from nkat_search.search.spec import parse_study_text

    queued = list(data.get("enqueue") or [])[:count]
    spec = parse_study_text(yaml.safe_dump({**data, "enqueue": queued}), "scaling study")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    draws = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    while len(queued) < count:
        trial = draws.ask()
        suggest_config(trial, spec)
        queued.append(dict(trial.params))
        draws.tell(trial, 0.0)
    return queued


# -- storage ------------------------------------------------------------------------------------

def new_storage(args: argparse.Namespace, work: Path, run: str) -> tuple[str, str | None]:
    """(URL, database to drop afterwards or None) of an empty storage for one run."""
    if not args.storage_base:
        return f"sqlite:///{work / (run + '.db')}", None
    import sqlalchemy

    base = args.storage_base.rstrip("/")
    database = f"nkat_scaling_{run}_{uuid.uuid4().hex[:8]}"
    engine = sqlalchemy.create_engine(_postgres(base) + "/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{database}"'))
    engine.dispose()
    return f"{_postgres(base)}/{database}", database


def drop_database(args: argparse.Namespace, database: str) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(_postgres(args.storage_base.rstrip("/")) + "/postgres",
                                      isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
    engine.dispose()


def _postgres(url: str) -> str:
    # SQLAlchemy maps a bare postgresql:// to psycopg 3; the project ships psycopg2.
    return "postgresql+psycopg2://" + url.split("://", 1)[1]


# -- GPU utilisation ----------------------------------------------------------------------------

# -- one run ------------------------------------------------------------------------------------

def worker_devices(device: str, workers: int) -> list[str]:
    """One device per worker: cuda:0..cuda:W-1, or cpu for every worker."""
    return [f"cuda:{i}" if device == "cuda" else "cpu" for i in range(workers)]


def run_one(args: argparse.Namespace, text: str, work: Path, workers: int, k: int) -> dict:
    from nkat_search.cli.commands.storage_arg import child_env
    from nkat_search.cli.commands.worker import worker_argv
    from nkat_search.cli.launch import start, threads_per_process
    from nkat_search.search.coordinator import create_study
    from nkat_search.search.storage import open_storage
    from nkat_search.search.storage_url import mask_url
    from nkat_search.search.spec import parse_study_text

    run = f"w{workers}k{k}"
    folder = work / run
    folder.mkdir(parents=True, exist_ok=True)
    url, database = new_storage(args, work, run)
    spec = parse_study_text(text, "scaling study")
    storage = open_storage(url)
    create_study(spec, storage)
    storage.engine.dispose()

    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    # cuda:i in the workers is then GPU i of nvidia-smi, whose per-index utilisation we report
    # (CUDA's default order, fastest first, need not match it).
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    # Recorded in the row, so set even for one process (then every core).
    env["OMP_NUM_THREADS"] = (env.get("OMP_NUM_THREADS")
                              or str(threads_per_process(workers * k) or os.cpu_count() or 1))
    env = child_env(url, env)  # the URL in NKAT_STORAGE, not on command lines (ps shows those)
    devices = worker_devices(args.device, workers)
    print(f"{run}: {workers} worker(s) x {k} trial(s) per device on {', '.join(devices)}, "
          f"{args.trials} trials, storage {mask_url(url)}", flush=True)

    processes, logs = [], []
    with UtilisationSampler() as gpus:
        started = time.monotonic()
        for i, device in enumerate(devices):
            argv = worker_argv(spec.name, device, folder / "checkpoints", trials_per_gpu=k,
                               data_dir=args.data_dir, quiet=True)
            log = folder / f"worker-{i}.log"
            # In our process group: a Ctrl-C on the benchmark stops its workers too.
            processes.append(start(argv, env=env, log=log, own_session=False))
            logs.append(log)
        timed_out = wait_all(processes, started + args.timeout, url, spec.name, run, args.trials)
        wall = time.monotonic() - started
    codes = [p.returncode for p in processes]
    row = measure(url, spec.name, args.trials)
    row |= {"run": run, "workers": workers, "trials_per_gpu": k, "processes": workers * k,
            "devices": devices, "wall_s": wall,
            "trials_per_hour": row["finished"] / wall * 3600 if wall > 0 else 0.0,
            "images_per_s_wall": row["images"] / wall if wall > 0 else 0.0,
            "gpu_util_mean": {f"cuda:{i}": m for i, m in gpus.means().items()},
            "worker_exit_codes": codes, "timed_out": timed_out,
            "omp_num_threads": env["OMP_NUM_THREADS"],
            "storage": mask_url(url).replace(str(work), "<work>")}
    if timed_out or any(codes):
        row["invariants"] = "FAIL"
        for log in logs:
            print(f"--- {log}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
    if database is not None and not args.keep:
        drop_database(args, database)
    return row


def wait_all(processes: list, deadline: float, url: str, study: str, run: str, budget: int) -> bool:
    """Wait for every worker, printing the finished-trial count as it moves; True on timeout."""
    last = None
    while any(p.poll() is None for p in processes):
        if time.monotonic() > deadline:
            for p in processes:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in processes:
                try:
                    p.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            return True
        done = finished_count(url, study)
        if done is not None and done != last:
            print(f"  {run}: {done}/{budget} trials finished", flush=True)
            last = done
        time.sleep(2)
    return False


def finished_count(url: str, study: str) -> int | None:
    """Terminal trials so far, or None when the storage is busy this time round."""
    import optuna

    try:
        trials = optuna.load_study(study_name=study, storage=url).get_trials(deepcopy=False)
    except Exception:  # noqa: BLE001 - a locked SQLite file only delays the progress line
        return None
    return sum(t.state.name in TERMINAL for t in trials)


def train_images_per_epoch(config: dict, dataset_size: int = CIFAR10_TRAIN_IMAGES) -> int:
    """Images one epoch trains on, as ``data.load_dataset`` and ``train.train_model`` slice them.

    The validation slice is ``round(n * val_fraction)`` (at least 1), ``train_limit`` keeps the
    first N of the rest, and an epoch is ``n_train // batch`` full batches.
    """
    n = dataset_size
    if config.get("val_fraction", 0) > 0:
        n -= min(max(1, round(n * config["val_fraction"])), n - 1)
    if config.get("train_limit"):
        n = min(n, config["train_limit"])
    batch = min(config["batch_size"], n)
    return n // batch * batch


def measure(url: str, study: str, budget: int) -> dict:
    """Counts, invariants and training throughput of a finished run, from the storage alone."""
    import optuna

    trials = optuna.load_study(study_name=study, storage=url).get_trials()
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    numbers = sorted(t.number for t in trials)
    invariants = "PASS" if numbers == list(range(budget)) and all(
        t.state.name in TERMINAL for t in trials) else "FAIL"

    per_worker: dict[str, list[float]] = {}  # worker identity -> [images, epoch seconds]
    for t in trials:
        run = (t.user_attrs.get("datasets") or {}).get("cifar10")
        # The config is a system attribute since the dashboard work; older studies kept a user one.
        config = t.system_attrs.get("config") or t.user_attrs.get("config")
        if not run or not config:
            continue
        seconds = run["epoch_seconds"]
        images = train_images_per_epoch(config) * len(seconds)
        entry = per_worker.setdefault(t.user_attrs.get("worker", "?"), [0, 0.0])
        entry[0] += images
        entry[1] += sum(seconds)
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    return {
        "trials": len(trials), "finished": sum(t.state.name in TERMINAL for t in trials),
        "states": states, "invariants": invariants,
        "images": sum(images for images, _ in per_worker.values()),
        "images_per_s_sum": sum(images / s for images, s in per_worker.values() if s > 0),
        "worker_processes_with_trials": len(per_worker),
        "trial_span_s": (max(ends) - min(starts)).total_seconds() if starts and ends else None,
    }


# -- the table ----------------------------------------------------------------------------------

def add_ratios(rows: list[dict]) -> None:
    """Throughput ratio of each run to the W=1 K=1 run (None when that run is not in the list)."""
    base = next((r for r in rows if r["workers"] == 1 and r["trials_per_gpu"] == 1), None)
    for row in rows:
        for key, ratio in (("trials_per_hour", "ratio_trials_per_hour"),
                           ("images_per_s_sum", "ratio_images_per_s")):
            ok = base is not None and base[key] > 0
            row[ratio] = row[key] / base[key] if ok else None


def format_table(rows: list[dict]) -> str:
    head = ["run", "W", "K", "procs", "trials", "wall s", "span s", "trials/h", "img/s sum",
            "img/s wall", "GPU util %", "x trials/h", "x img/s", "invariants"]
    lines = [head]
    for r in rows:
        util = "/".join(f"{r['gpu_util_mean'][d]:.0f}" for d in r["devices"]
                        if d in r["gpu_util_mean"]) or "-"
        ratio = [f"{v:.2f}x" if v is not None else "-"
                 for v in (r["ratio_trials_per_hour"], r["ratio_images_per_s"])]
        lines.append([r["run"], str(r["workers"]), str(r["trials_per_gpu"]), str(r["processes"]),
                      f"{r['finished']}/{r['trials']}", f"{r['wall_s']:.1f}",
                      f"{r['trial_span_s']:.1f}" if r["trial_span_s"] is not None else "-",
                      f"{r['trials_per_hour']:.1f}", f"{r['images_per_s_sum']:,.0f}",
                      f"{r['images_per_s_wall']:,.0f}", util, *ratio, r["invariants"]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w)
                               for i, (c, w) in enumerate(zip(line, widths))) for line in lines)


def main(argv=None) -> int:
    import importlib.metadata

    args = parse_args(argv)
    names = gpu_names()
    if args.device == "cuda" and max(args.workers) > len(names):
        print(f"scaling: --workers {max(args.workers)} needs that many GPUs; nvidia-smi lists "
              f"{len(names)} (use --quick or --device cpu on a CPU)", file=sys.stderr)
        return 2
    text = scaling_study_text(args)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="nkat-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for workers in args.workers:
            for k in args.trials_per_gpu:
                row = run_one(args, text, work, workers, k)
                rows.append(row)
                print(f"{row['run']}: {row['finished']}/{args.trials} trials in "
                      f"{row['wall_s']:.1f} s, invariants {row['invariants']}", flush=True)
    finally:
        if args.work_dir is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    add_ratios(rows)
    print(format_table(rows))
    result = {
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None
        else shlex.join([sys.executable, __file__, *argv]),
        "host": socket.gethostname(),
        "gpus": names, "device": args.device, "quick": args.quick,
        "torch": importlib.metadata.version("torch"),
        "optuna": importlib.metadata.version("optuna"),
        "cpu_count": os.cpu_count(),
        "budget": args.trials, "epochs": args.epochs, "base_study_file": str(args.study),
        "storage": "postgresql (one database per run)" if args.storage_base else "sqlite",
        "study_file": text,
        "runs": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r["invariants"] == "PASS" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
