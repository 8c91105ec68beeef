"""status, study show and export against real storages (SQLite file and PostgreSQL) holding a
hand-built study.

The study is created by the coordinator from a small study file and its trials are written with
Optuna directly, with the attributes of ``search/trials.py``, so these tests pin what status
counts, which trial each reader calls the best and what export writes, without training anything;
the last test re-runs an exported file with ``nkat-search train`` to show it is a usable config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from nkat_search.cli.main import main
from nkat_search.config import RunConfig, load_config_file
from nkat_search.search.coordinator import create_study
from nkat_search.search.spec import parse_study_text
from nkat_search.search.storage import open_storage
from nkat_search.search.trials import DatasetScore, attrs_of

optuna.logging.set_verbosity(optuna.logging.WARNING)

STUDY = "export-status-test"
STUDY_FILE = {
    "name": STUDY, "n_trials": 10, "seed": 3,
    "search": {"embed_dim": {"type": "int", "low": 64, "high": 128, "step": 64},
               "depth": {"type": "int", "low": 1, "high": 2},
               "temperature": {"type": "float", "low": 0.6, "high": 1.0}},
    "fixed": {"epochs": 2, "warmup": 0},
    "gate": {"local_tpe": 0.60},
    "sampler": {"constraints": {"consistency": 0.80, "robustness": 0.75}},
}
DISTRIBUTIONS = {"embed_dim": IntDistribution(64, 128, step=64), "depth": IntDistribution(1, 2),
                 "temperature": FloatDistribution(0.6, 1.0)}
# (global_tpe, embed_dim, depth, robustness): trials 0, 1, 2 meet the constraints, trial 1 is
# their best; trial 7 has the top value and misses Robustness 0.75.
COMPLETE = [(0.71, 64, 1, 0.80), (0.74, 128, 2, 0.80), (0.69, 64, 2, 0.80)]
INFEASIBLE_TOP = (0.80, 128, 1, 0.50)


def tiny_config(embed_dim: int, depth: int) -> dict:
    """A config that trains in seconds on the CPU; stored the way the objective stores it."""
    return RunConfig.from_dict({
        "embed_dim": embed_dim, "depth": depth, "temperature": 0.8, "mlp_ratio": 2.0,
        "epochs": 2, "warmup": 0, "batch_size": 64, "randaugment": [1, 5], "bf16": False,
    }).to_dict()


def complete_trial(gtpe: float, embed_dim: int, depth: int, robustness: float):
    scores = {"mnist": DatasetScore(0.99, 0.1, 2.4), "cifar10": DatasetScore(0.5, 0.1 * depth, 0.63)}
    return create_trial(
        params={"embed_dim": embed_dim, "depth": depth, "temperature": 0.8},
        distributions=DISTRIBUTIONS, value=gtpe, intermediate_values={1: 0.55, 2: 0.63},
        constraints={"consistency": 0.80 - 0.9, "robustness": 0.75 - robustness},
        user_attrs=attrs_of(
            outcome="complete", config=tiny_config(embed_dim, depth), local_tpe=0.63,
            datasets=scores, global_tpe=gtpe, consistency=0.9, robustness=robustness,
            feasible=robustness >= 0.75, missing_datasets=[], worker="host:1:cpu",
            timings={"time_train_s": 12.5, "time_trial_s": 14.0, "train_images": 4096}))


def build_study(url: str, infeasible_top: bool = False, feasible: bool = True) -> optuna.Study:
    """Trials 0-2 complete, 3 gate-failed, 4 pruned, 5 failed, 6 running (7: infeasible top)."""
    spec = parse_study_text(yaml.safe_dump(STUDY_FILE), file_name="tiny.yaml")
    study, _, _ = create_study(spec, open_storage(url))
    for gtpe, embed_dim, depth, robustness in COMPLETE:
        study.add_trial(complete_trial(gtpe, embed_dim, depth, robustness if feasible else 0.5))
    params = {"embed_dim": 64, "depth": 1, "temperature": 0.9}
    unmeasured = {"consistency": 2.25, "robustness": 2.25}
    # Pruned trials carry their last intermediate value as their value, as Optuna's tell sets it.
    study.add_trial(create_trial(  # trial 3: below the Local TPE gate
        params=params, distributions=DISTRIBUTIONS, state=TrialState.PRUNED, value=0.45,
        intermediate_values={1: 0.41, 2: 0.45}, constraints=unmeasured,
        user_attrs=attrs_of(outcome="gate_failed", config=tiny_config(64, 1), local_tpe=0.45,
                            feasible=False, reason="gate: Local TPE 0.4500 < 0.6")))
    study.add_trial(create_trial(  # trial 4: stopped early by the pruner
        params=params, distributions=DISTRIBUTIONS, state=TrialState.PRUNED, value=0.2,
        intermediate_values={1: 0.2}, constraints=unmeasured,
        user_attrs=attrs_of(outcome="pruned", feasible=False,
                            reason="pruned at epoch 1 of 2 by the median pruner")))
    study.add_trial(create_trial(  # trial 5: crashed
        params=params, distributions=DISTRIBUTIONS, state=TrialState.FAIL,
        user_attrs={"outcome": "failed",
                    "error": "Traceback (most recent call last):\nRuntimeError: out of memory"}))
    running = study.ask(DISTRIBUTIONS)  # trial 6: a worker holds it right now
    running.report(0.5, 1)
    running.set_user_attr("config", tiny_config(64, 1))
    running.set_user_attr("stage", 1)
    running.set_user_attr("dataset", "cifar10")
    running.set_user_attr("epoch", 1)
    if infeasible_top:
        study.add_trial(complete_trial(*INFEASIBLE_TOP))  # trial 7
    return study


@pytest.fixture(params=["sqlite", "postgres"])
def storage_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return request.getfixturevalue("fresh_postgres_url")


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_status_json_counts_every_outcome(storage_url, capsys):
    build_study(storage_url)
    code, out, _ = cli(capsys, "status", "--study", STUDY, "--storage", storage_url, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["study"] == STUDY and report["metric"] == "Global TPE"
    assert report["budget"]["budget"] == 10 and report["budget"]["used"] == 7
    summary = report["summary"]
    assert {k: summary[k] for k in ("complete", "pruned", "gate_failed", "failed", "interrupted",
                                    "running", "waiting", "total")} == {
        "complete": 3, "pruned": 1, "gate_failed": 1, "failed": 1, "interrupted": 0,
        "running": 1, "waiting": 0, "total": 7}
    assert summary["best_value"] == pytest.approx(0.74) and summary["best_trial"] == 1
    rows = {r["number"]: r for r in report["trials"]}
    assert rows[3]["outcome"] == "gate_failed" and rows[3]["local_tpe"] == pytest.approx(0.45)
    assert rows[3]["reason"] == "gate: Local TPE 0.4500 < 0.6" and rows[3]["feasible"] is False
    assert rows[6]["state"] == "running" and rows[6]["local_tpe"] == pytest.approx(0.5)
    assert rows[6]["progress"] == {"stage": 1, "dataset": "cifar10", "epoch": 1}
    assert rows[6]["feasible"] is None
    assert rows[1]["epochs"] == 2 and rows[1]["lambda"] == pytest.approx(0.2)
    assert rows[1]["datasets"]["mnist"] == {"accuracy": 0.99, "lambda": 0.1, "tpe": 2.4}
    assert rows[1]["feasible"] is True
    # The timing attributes of every trial, as the objective writes them.
    assert rows[1]["timings"] == {"time_train_s": 12.5, "time_trial_s": 14.0, "train_images": 4096}


def test_status_table_has_a_row_per_trial_and_the_summary(storage_url, capsys):
    build_study(storage_url)
    code, out, _ = cli(capsys, "status", "--study", STUDY, "--storage", storage_url)
    assert code == 0
    assert "3 complete, 1 pruned, 1 gate-failed, 1 failed, 1 running" in out
    assert "best Global TPE 0.7400 (trial 1)" in out
    assert "gate_failed" in out and "gate: Local TPE 0.4500 < 0.6" in out
    assert "RuntimeError: out of memory" in out
    assert "pruned at epoch 1 of 2 by the median pruner" in out
    assert "stage 1 cifar10 epoch 1/2 Local TPE 0.5000" in out  # the running trial
    header = out.splitlines()[1]
    for column in ("outcome", "acc cifar10", "acc mnist", "LocalTPE", "GlobalTPE", "feasible"):
        assert column in header
    # The searched parameters that differ between trials, by name; temperature differs too.
    assert "searched parameters that differ:" in out
    params_header = out.split("searched parameters that differ:")[1].splitlines()[1]
    assert params_header.split() == ["trial", "embed_dim", "depth", "temperature"]
    assert "missing datasets" not in out


def test_every_reader_takes_the_studys_best_trial_when_the_top_value_is_infeasible(
        storage_url, tmp_path, capsys):
    """status, study show, export, Optuna and `optuna best-trial` agree: trial 1, not trial 7.

    Before ``trials.best``, status, up's summary and export took the top value (trial 7), which
    misses the Robustness constraint, while study show and Optuna took trial 1.
    """
    study = build_study(storage_url, infeasible_top=True)
    assert study.trials[7].value == max(t.value for t in study.trials if t.value is not None
                                        and t.state == TrialState.COMPLETE)
    assert study.best_trial.number == 1

    code, out, _ = cli(capsys, "status", "--study", STUDY, "--storage", storage_url, "--json")
    report = json.loads(out)
    assert code == 0 and report["summary"]["best_trial"] == 1
    rows = {r["number"]: r for r in report["trials"]}
    assert rows[7]["feasible"] is False and rows[7]["reason"] == "infeasible: robustness 0.50 < 0.75"

    code, out, _ = cli(capsys, "study", "show", "--study", STUDY, "--storage", storage_url, "--json")
    assert code == 0 and json.loads(out)["best"]["number"] == 1
    assert json.loads(out)["best"]["feasible"] is True

    code, out, _ = cli(capsys, "export", "--study", STUDY, "--storage", storage_url, "--top", 5,
                       "--out", tmp_path / "export")
    assert code == 0, out
    best = yaml.safe_load((tmp_path / "export" / "best.yaml").read_text())
    assert best["study"]["trial"] == 1 and best["metrics"]["feasible"] is True
    assert "exported 4 trial(s)" in out and "5 asked, but the study has only 4 complete" in out
    assert "trial(s) 7 miss the constraints" in out
    last = yaml.safe_load((tmp_path / "export" / "trial-7.yaml").read_text())
    assert last["metrics"]["feasible"] is False

    env = dict(os.environ, PYTHONWARNINGS="ignore")
    optuna_cli = [sys.executable, "-c", "import sys, optuna.cli; sys.exit(optuna.cli.main())"]
    shown = subprocess.run([*optuna_cli, "best-trial", "--study-name", STUDY,
                            "--storage", storage_url, "-f", "json"], capture_output=True,
                           text=True, timeout=120, env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["number"] == 1


def test_with_no_feasible_trial_the_best_value_is_shown_and_exported_as_infeasible(
        tmp_path, capsys):
    """The stated fallback: Optuna has no best trial; we show and export the top value, marked."""
    url = f"sqlite:///{tmp_path / 'none-feasible.db'}"
    study = build_study(url, feasible=False)
    with pytest.raises(ValueError, match="No feasible trials"):
        study.best_trial
    code, out, _ = cli(capsys, "status", "--study", STUDY, "--storage", url)
    assert code == 0
    assert ("best Global TPE 0.7400 (trial 1, infeasible: no complete trial meets the "
            "constraints yet)") in out
    code, out, _ = cli(capsys, "export", "--study", STUDY, "--storage", url, "--out", tmp_path / "e")
    assert code == 0
    best = yaml.safe_load((tmp_path / "e" / "best.yaml").read_text())
    assert best["study"]["trial"] == 1 and best["metrics"]["feasible"] is False
    assert "MISSES the constraints" in (tmp_path / "e" / "best.yaml").read_text().splitlines()[0]


def test_status_names_datasets_that_were_missing(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'missing.db'}"
    study = optuna.create_study(study_name=STUDY, storage=url, direction="maximize")
    study.add_trial(create_trial(
        params={"embed_dim": 64, "depth": 1, "temperature": 0.8}, distributions=DISTRIBUTIONS,
        value=0.8, user_attrs={"outcome": "complete", "missing_datasets": ["emnist"]}))
    code, out, _ = cli(capsys, "status", "--study", STUDY, "--storage", url)
    assert code == 0
    assert "missing datasets, not in Global TPE: emnist" in out


def test_unknown_study_is_one_line_listing_the_studies(storage_url, capsys):
    build_study(storage_url)
    code, _, err = cli(capsys, "status", "--study", "nope", "--storage", storage_url)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "nope" in lines[0] and STUDY in lines[0]


def test_missing_sqlite_file_is_a_user_error_not_a_new_database(tmp_path, capsys):
    path = tmp_path / "typo.db"
    code, _, err = cli(capsys, "status", "--study", STUDY, "--storage", f"sqlite:///{path}")
    assert code == 2 and "does not exist" in err and not path.exists()


def test_export_top_two_writes_the_best_configs(storage_url, tmp_path, capsys):
    study = build_study(storage_url)
    out = tmp_path / "export"
    code, stdout, _ = cli(capsys, "export", "--study", STUDY, "--storage", storage_url,
                          "--top", 2, "--out", out)
    assert code == 0, stdout
    # Trials 1 (0.74) and 0 (0.71); nothing half-written left behind. The plots and the CSV
    # beside them are tests/test_study_files.py's.
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".png") == [
        "best.json", "best.yaml", "trial-0.json", "trial-0.yaml", "trial-1.json", "trial-1.yaml",
        "trials.csv"]
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["study"]["trial"] == 1 and best["study"]["name"] == STUDY
    assert best["study"]["study_file_hash"] == study.user_attrs["study_file_hash"]
    assert best["metrics"]["global_tpe"] == pytest.approx(0.74)
    assert best["metrics"]["datasets"]["mnist"]["accuracy"] == pytest.approx(0.99)
    assert best["metrics"]["constraints"] == pytest.approx({"consistency": -0.1,
                                                            "robustness": -0.05})
    stored = study.trials[1].user_attrs["config"]
    assert load_config_file(out / "best.yaml") == RunConfig.from_dict(stored)
    assert load_config_file(out / "trial-0.json") == RunConfig.from_dict(study.trials[0].user_attrs["config"])
    assert json.loads((out / "best.json").read_text()) == best
    # Readable by other users and containers (mkstemp alone makes files 0600).
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~_umask() for p in out.iterdir())


def test_export_into_an_earlier_export_replaces_its_trial_files(tmp_path, capsys):
    """--top 3, then --top 2 into the same folder: trial-2 (third) goes, a file that is not this
    study's export stays; --out naming a file is one line, exit 2. (On merge trial-2 stayed:
    3 trial files for --top 2, 4 for the issue's --top 3; --out FILE was a traceback.)"""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    build_study(url)
    out = tmp_path / "export"
    assert cli(capsys, "export", "--study", STUDY, "--storage", url, "--top", 3, "--out", out)[0] == 0
    (out / "trial-99.yaml").write_text("mine: true\n")
    assert cli(capsys, "export", "--study", STUDY, "--storage", url, "--top", 2, "--out", out)[0] == 0
    assert sorted(p.name for p in out.glob("trial-*")) == [
        "trial-0.json", "trial-0.yaml", "trial-1.json", "trial-1.yaml", "trial-99.yaml"]
    code, out_text, err = cli(capsys, "export", "--study", STUDY, "--storage", url,
                              "--out", out / "trials.csv")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not a folder" in err, err


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_export_with_no_complete_trial_says_so_and_exits_1(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    optuna.create_study(study_name=STUDY, storage=url, direction="maximize")
    code, _, err = cli(capsys, "export", "--study", STUDY, "--storage", url, "--out", tmp_path / "x")
    assert code == 1 and "nothing to export yet" in err
    assert not (tmp_path / "x").exists()


def test_exported_best_reruns_with_train(tmp_path, capsys, data_dir):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = build_study(url)
    assert cli(capsys, "export", "--study", STUDY, "--storage", url, "--out", tmp_path / "e")[0] == 0
    run_dir = tmp_path / "train"
    given = {"train_limit": 128, "test_limit": 64, "epochs": 1}
    flags = [x for key, value in given.items() for x in (f"--{key}", str(value))]
    result = subprocess.run(
        [sys.executable, "-m", "nkat_search", "train", "--config", str(tmp_path / "e" / "best.yaml"),
         *flags, "--device", "cpu", "--data-dir", str(data_dir), "--out", str(run_dir), "--quiet"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    ran = json.loads((run_dir / "metrics.json").read_text())["config"]
    assert ran == study.trials[1].user_attrs["config"] | given
    assert (run_dir / "metrics.json").stat().st_mode & 0o077 != 0  # not 0600


def test_ups_live_line_says_budget_running_trials_best_and_time_left(tmp_path):
    """It once said only `0 complete, 0 pruned, ... 1 running | best Global TPE -` for minutes."""
    from nkat_search.search.report import live_line, open_study, study_report

    url = f"sqlite:///{tmp_path / 'live.db'}"
    build_study(url)
    report = study_report(open_study(url, STUDY))
    line = live_line(report)
    assert line.startswith(
        "6/10 trials done (3 complete, 1 pruned, 1 gate-failed, 1 failed) | "
        "#6 stage 1 cifar10 epoch 1/2 Local TPE 0.5000 | best Global TPE 0.7400 (trial 1) | about ")
    assert line.endswith(" left")


def _row(started: str | None, seconds: float | None, outcome: str = "complete") -> dict:
    return {"started": started, "duration_s": seconds, "outcome": outcome, "retried_by": None}


def test_the_time_left_comes_from_the_studys_busy_time_across_runs_of_up():
    """A rate over the whole history, gaps between runs of up left out: it does not swing as one
    long trial or several short ones end (round2_aug's second window: 1h13m, then 19m 20 s later)."""
    from nkat_search.search.report import busy_seconds, eta_seconds

    rows = [
        # First run of up: two trials side by side, 100 s of wall time.
        _row("2026-12-07T10:00:00", 100.0), _row("2026-12-07T10:00:00", 60.0, "pruned"),
        # The next day, after a reboot: one trial of 50 s, then one running for 30 s so far.
        _row("2026-12-08T09:00:00", 50.0),
        _row("2026-12-08T09:00:50", 30.0, "running"),
        _row(None, None, "waiting"),
    ]
    assert busy_seconds(rows) == 180.0
    # 3 finished in 180 busy seconds, 7 of the 10 left: 420 s.
    assert eta_seconds(rows, 10) == 420.0
    assert eta_seconds(rows, 3) == 0.0
    assert eta_seconds(rows[3:], 10) is None  # nothing finished yet: no estimate
    # A configuration that a retry continues counts once, when the retry ends.
    rows[0]["retried_by"] = 5
    assert eta_seconds(rows, 10) == 8 * 180.0 / 2


def _interrupted(error: str) -> optuna.trial.FrozenTrial:
    return create_trial(state=TrialState.FAIL, user_attrs={
        "error": error, "stage": 1, "dataset": "cifar10"})


@pytest.mark.parametrize("retry_attrs, words", [
    (None, "retried as trial 7 (from its checkpoint, where that host has it)"),
    ({"resumed_from_epoch": 0}, "retried as trial 7, which trained again from epoch 0 "
                                "(no checkpoint on its host)"),
    ({"resumed_from_epoch": 12}, "retried as trial 7, which resumed from its checkpoint "
                                 "(cifar10 epoch 12)"),
])
def test_an_interrupted_trial_says_where_its_retry_really_started(retry_attrs, words):
    # A checkpoint lives on the host that wrote it: a retry on a fresh machine starts at epoch 0,
    # and the status line must not promise a resume that did not happen.
    from nkat_search.search.trials import INTERRUPTED, stop_reason
    trial = _interrupted(f"{INTERRUPTED}: stopped after epoch 35, checkpoint kept")
    retry = create_trial(state=TrialState.RUNNING, user_attrs=retry_attrs or {})
    retry.number = 7
    assert stop_reason(trial, retry) == f"interrupted in stage 1 (cifar10), after epoch 35; {words}"


def test_status_says_which_running_trials_lost_their_worker(tmp_path, capsys):
    """round2_aug's file after window 3: trials 45, 48 and 49 RUNNING, their machine lost. Trial
    45's heartbeat is set to the database's now here, as a live worker's would be: only 48 and 49
    are past the study's grace (600 s in studies/round2_aug.yaml)."""
    import shutil
    import sqlite3
    from pathlib import Path

    db = tmp_path / "aug.db"
    shutil.copy(Path(__file__).resolve().parents[1] / "results" / "round2" / "nkat-round2-aug"
                / "nkat-round2-aug.db", db)
    with sqlite3.connect(db) as connection:
        connection.execute(
            "UPDATE trial_heartbeats SET heartbeat = CURRENT_TIMESTAMP WHERE trial_id = "
            "(SELECT trial_id FROM trials WHERE number = 45)")
    assert main(["status", "--study", "nkat-round2-aug", "--storage", str(db), "--json"]) == 0
    rows = {row["number"]: row for row in json.loads(capsys.readouterr().out)["trials"]}
    running = {number for number, row in rows.items() if row["outcome"] == "running"}
    assert running == {45, 48, 49}
    assert not rows[45]["silent"] and rows[45]["heartbeat_age_s"] < 60
    assert rows[48]["silent"] and rows[49]["silent"]
    assert rows[48]["heartbeat_age_s"] > 120 and rows[48]["heartbeat_grace_s"] == 600
    assert "silent" not in rows[44]  # only running rows carry it
    assert main(["status", "--study", "nkat-round2-aug", "--storage", str(db), "--wide"]) == 0
    out = capsys.readouterr().out
    line45 = next(line for line in out.splitlines() if line.split()[:2] == ["45", "running"])
    line48 = next(line for line in out.splitlines() if line.split()[:2] == ["48", "running"])
    assert "no heartbeat" not in line45 and "stage 2 fashion_mnist epoch 24/40" in line45
    assert "no heartbeat for" in line48 and "worker gone; last: stage 2" in line48
    assert ("2 running trial(s) (48, 49) sent no heartbeat for longer than the study's grace "
            "(10m00s)") in out
