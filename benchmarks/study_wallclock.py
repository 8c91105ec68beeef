"""A whole study's wall clock on one GPU: trials per hour and where the time went.

Runs ``nkat-search up`` on a study file (default ``studies/round2.yaml``, as shipped) with the
service's own workers for a fixed time, stops it as a user would (one Ctrl-C: the workers finish
their step and checkpoint; a second one after ``--drain`` seconds stops them at once), then reads
the study back from its SQLite file and reports:

- ``trials_per_hour``: trials that *finished* inside the window (complete, pruned, gate-failed or
  failed; not the ones stopped by the Ctrl-C) per hour of the window, ``up``'s start-up included;
  ``projected_study_minutes``: the file's whole budget at that rate. Short windows favour short
  trials (the long ones are still running when it closes): read the projection with the trial mix.
- ``images_per_s_total``: training images of every trial (``train_images``) over the wall time
  from ``up``'s start to its exit; ``gpu_busy_share``: the mean of nvidia-smi's utilization.gpu
  (share of time a kernel ran) over the window; the peak GPU memory in use.
- the trial mix: per trial its architecture, tokens per image, outcome, epochs and duration;
- where the time went, summed over trials, from the ``time_*_s`` attributes the objective
  records (data, setup, compile, training steps, evaluation, checkpoints; ``outside_trainer``:
  the rest of each trial's objective time) and ``idle_slots``: the worker slots' time not inside
  any trial (start-up, the budget lock, waiting). Code that predates those attributes (``--code``
  pointing at an older checkout) gets the coarse split its attributes allow: CIFAR-10 epoch time
  (compile included) and the rest.

    python benchmarks/study_wallclock.py --minutes 6 --trials-per-gpu 4 --mps on \
        --data-dir /root/nkat-data --label after --out results/study_wallclock.json

Runs of different ``--label`` are kept side by side in one JSON file. ``up`` is started by this
checkout's ``nkat_search/cli/launch.py`` (in a session of its own: the benchmark sends the
Ctrl-Cs, and ``up`` gets one SIGTERM if the benchmark dies), with ``--code`` as its folder and
first on its ``PYTHONPATH``. Only the standard library (and ``launch.py``, which imports nothing
else) is imported at the top; Optuna is imported to read the study back.
"""

from __future__ import annotations

import argparse
import datetime as dt
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_sampling import UtilisationSampler, gpu_names  # noqa: E402

from nkat_search.cli.launch import nkat_command, start  # noqa: E402
from nkat_search.train.model import tokens_per_image  # noqa: E402

PHASES = ("data", "setup", "compile", "train", "eval", "checkpoint")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, default=REPO / "studies" / "round2.yaml",
                        metavar="FILE", help="study file, run as shipped")
    parser.add_argument("--minutes", type=float, default=6.0,
                        help="length of the measured window (up's start-up included)")
    parser.add_argument("--drain", type=float, default=120.0, metavar="S",
                        help="seconds the workers get to checkpoint after the Ctrl-C")
    parser.add_argument("--trials-per-gpu", type=int, default=None, metavar="K",
                        help="passed to up (default: up's own default)")
    parser.add_argument("--mps", choices=("auto", "on", "off"), default=None,
                        help="passed to up (default: up's own; omitted for older code)")
    parser.add_argument("--extra", default="", metavar="ARGS",
                        help="more flags for up, as one string (e.g. '--checkpoint-interval 0')")
    parser.add_argument("--data-dir", metavar="DIR", help="dataset root, passed to up")
    parser.add_argument("--code", type=Path, default=REPO, metavar="DIR",
                        help="checkout whose nkat_search runs (default: this one); an older "
                        "checkout measures the code before a change")
    parser.add_argument("--label", default="run", help="name of this run in the JSON file")
    parser.add_argument("--work-dir", type=Path, metavar="DIR",
                        help="up's --out (default: a temp dir, removed unless --keep-db)")
    parser.add_argument("--keep-db", type=Path, metavar="FILE",
                        help="copy the study's SQLite file here at the end")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "study_wallclock.json",
                        metavar="FILE", help="JSON results; runs of other labels are kept")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.drain < 0:
        parser.error("--minutes must be > 0 and --drain >= 0")
    return args


def tokens(config: dict) -> int:
    """Tokens per image; a config without stem or patch has the recipe's (tiny, 2)."""
    return tokens_per_image(config.get("conv_stem", "tiny"), config.get("patch_size", 2))


def study_name(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("name:"):
            return line.split(":", 1)[1].strip().strip("'\"")
    raise SystemExit(f"{path}: no 'name:' line")


def run_up(args: argparse.Namespace, work: Path) -> dict:
    """Start up, wait out the window, stop it; returns the times (monotonic and wall clock)."""
    argv = ["up", "--study", str(args.study.resolve()), "--out", str(work), "--no-dashboard"]
    if args.trials_per_gpu is not None:
        argv += ["--trials-per-gpu", str(args.trials_per_gpu)]
    if args.mps is not None:
        argv += ["--mps", args.mps]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    argv += shlex.split(args.extra)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(args.code.resolve()),
                                                      env.get("PYTHONPATH")]))
    log = work / "up.log"
    log.unlink(missing_ok=True)  # this run's lines only (start appends)
    print(f"{args.label}: {shlex.join(nkat_command(argv))}  (code: {args.code})", flush=True)
    window = args.minutes * 60
    with UtilisationSampler() as gpus:
        started, wall_start = time.monotonic(), dt.datetime.now()
        process = start(argv, env=env, log=log, cwd=args.code.resolve())
        while process.poll() is None and time.monotonic() - started < window:
            time.sleep(1)
        stopped, wall_stop = time.monotonic(), dt.datetime.now()
        busy = dict(gpus.means())  # the window only: the drain is not the study's pace
        ended_early = process.poll() is not None
        for _ in range(3):  # Ctrl-C, then again (terminate), then kill: as up documents
            if process.poll() is not None:
                break
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=args.drain)
            except subprocess.TimeoutExpired:
                pass
        if process.poll() is None:
            process.kill()
            process.wait()
        memory = gpus.peak_memory_gib()
    return {"window_s": stopped - started, "wall_s": time.monotonic() - started,
            "wall_start": wall_start, "wall_stop": wall_stop, "gpu_busy": busy,
            "gpu_peak_memory_gib": memory, "up_exit": process.returncode,
            "ended_before_the_window": ended_early, "log": log}


def read_trials(db: Path, name: str) -> tuple[list, dict]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    return study.get_trials(deepcopy=False), study.user_attrs


def summarise(args, times: dict, trials: list, study_attrs: dict, budget: int) -> dict:
    stop = times["wall_stop"]
    rows, finished = [], 0
    phases = {phase: 0.0 for phase in PHASES}
    outside, trial_seconds, images, fine = 0.0, 0.0, 0, True
    coarse = {"cifar10_epochs_s": 0.0, "rest_s": 0.0}
    for t in sorted(trials, key=lambda t: t.number):
        attrs = t.user_attrs
        config = t.system_attrs.get("config") or attrs.get("config") or {}
        error = str(attrs.get("error", ""))
        done = (t.datetime_complete is not None and t.datetime_complete <= stop
                and t.state.name in ("COMPLETE", "PRUNED", "FAIL")
                and not error.startswith("interrupted"))
        finished += done
        start = t.datetime_start
        end = t.datetime_complete or times["wall_stop"]
        duration = (end - start).total_seconds() if start else 0.0
        if "time_trial_s" in attrs:
            for phase in PHASES:
                phases[phase] += attrs.get(f"time_{phase}_s", 0.0)
            outside += attrs["time_trial_s"] - sum(attrs.get(f"time_{p}_s", 0.0) for p in PHASES)
            trial_seconds += attrs["time_trial_s"]
            images += attrs.get("train_images", 0)
        elif start is not None:
            fine = False
            trial_seconds += duration
        cifar = (attrs.get("datasets") or {}).get("cifar10")
        epochs = [s for run in (attrs.get("datasets") or {}).values()
                  for s in run.get("epoch_seconds", [])]
        coarse["cifar10_epochs_s"] += sum(cifar["epoch_seconds"]) if cifar else 0.0
        coarse["rest_s"] += max(0.0, duration - sum(epochs))
        rows.append({
            "number": t.number, "state": t.state.name.lower(),
            "outcome": "interrupted" if error.startswith("interrupted") else attrs.get("outcome"),
            "finished_in_window": bool(done), "tokens": tokens(config) if config else None,
            **{k: config.get(k) for k in ("conv_stem", "patch_size", "embed_dim", "depth")},
            "lambda": attrs.get("lambda"), "local_tpe": attrs.get("local_tpe"),
            "global_tpe": attrs.get("global_tpe"),
            "cifar10_epochs": len(t.intermediate_values), "duration_s": round(duration, 1),
            "timings": {k: v for k, v in attrs.items()
                        if k.startswith("time_") or k in ("train_images", "checkpoints")},
        })
    window = times["window_s"]
    processes = (args.trials_per_gpu or 0) * max(1, len(times["gpu_busy"]))
    rate = finished / window * 3600 if window > 0 else 0.0
    result = {
        "label": args.label, "code": str(args.code), "study_file": str(args.study),
        "budget": budget, "trials_per_gpu": args.trials_per_gpu, "mps": args.mps,
        "extra": args.extra, "window_s": round(window, 1), "wall_s": round(times["wall_s"], 1),
        "up_exit_code": times["up_exit"], "ended_before_the_window": times["ended_before_the_window"],
        "trials_started": len(trials), "trials_finished_in_window": finished,
        "trials_per_hour": round(rate, 2),
        "projected_study_minutes": round(budget / rate * 60, 1) if rate > 0 else None,
        "gpu_busy_share": ({f"cuda:{i}": round(v / 100, 3) for i, v in times["gpu_busy"].items()}
                           or None),
        "gpu_peak_memory_gib": {f"cuda:{i}": round(v, 1)
                                for i, v in times["gpu_peak_memory_gib"].items()} or None,
        "trials": rows,
    }
    if fine:
        result["time_s"] = {**{p: round(v, 1) for p, v in phases.items()},
                            "outside_trainer": round(outside, 1)}
        result["images_per_s_total"] = round(images / times["wall_s"]) if images else 0
        if processes:
            slots = processes * window
            result["time_s"]["idle_slots"] = round(max(0.0, slots - trial_seconds), 1)
    result["coarse_time_s"] = {k: round(v, 1) for k, v in coarse.items()}
    return result


def format_run(r: dict) -> str:
    lines = [f"{r['label']}: {r['trials_finished_in_window']} trials finished in "
             f"{r['window_s']:.0f} s ({r['trials_started']} started) -> {r['trials_per_hour']:.1f} "
             f"trials/hour, projected {r['projected_study_minutes']} min for {r['budget']} trials",
             f"  GPU busy {r['gpu_busy_share']}, peak memory {r['gpu_peak_memory_gib']} GiB, "
             f"images/s total {r.get('images_per_s_total', '-')}"]
    if "time_s" in r:
        lines.append("  time (s, summed over trials): " + ", ".join(
            f"{k} {v:,.0f}" for k, v in r["time_s"].items()))
    lines.append("  coarse (s): " + ", ".join(f"{k} {v:,.0f}" for k, v in r["coarse_time_s"].items()))
    lines.append(f"  {'trial':>5} {'tokens':>6} {'stem':>5} {'patch':>5} {'dim':>4} {'depth':>5} "
                 f"{'outcome':<12} {'epochs':>6} {'seconds':>8}")
    for t in r["trials"]:
        lines.append(f"  {t['number']:>5} {t['tokens'] or '-':>6} {t['conv_stem'] or '-':>5} "
                     f"{t['patch_size'] or '-':>5} {t['embed_dim'] or '-':>4} "
                     f"{t['depth'] or '-':>5} {t['outcome'] or t['state']:<12} "
                     f"{t['cifar10_epochs']:>6} {t['duration_s']:>8.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import importlib.metadata

    args = parse_args(argv)
    name = study_name(args.study)
    budget = next(int(line.split(":", 1)[1]) for line in args.study.read_text().splitlines()
                  if line.startswith("n_trials:"))
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="nkat-wallclock-"))
    work.mkdir(parents=True, exist_ok=True)
    times = run_up(args, work)
    db = work / f"{name}.db"
    trials, attrs = read_trials(db, name)
    result = summarise(args, times, trials, attrs, budget)
    result |= {"device": ", ".join(gpu_names()) or "cpu", "host": socket.gethostname(),
               "torch": importlib.metadata.version("torch"), "cpu_count": os.cpu_count(),
               "command": shlex.join([sys.executable, *(sys.argv if argv is None
                                                         else [__file__, *argv])])}
    print(format_run(result))
    tail = times["log"].read_text(errors="replace").splitlines()[-12:]
    print("  up's last lines:\n" + "\n".join("    " + line for line in tail))
    if args.keep_db:
        import sqlite3

        # SQLite's backup API: a consistent copy, whatever is still in the write-ahead log.
        args.keep_db.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(db) as source, sqlite3.connect(args.keep_db) as target:
            source.backup(target)
    if args.work_dir is None and not args.keep_db:
        shutil.rmtree(work, ignore_errors=True)
    existing = json.loads(args.out.read_text()) if args.out.exists() else {"runs": {}}
    existing["runs"][args.label] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(existing, indent=2, default=str) + "\n")
    print(f"wrote {args.out} (run '{args.label}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
