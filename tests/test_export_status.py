"""status and export against real storages (SQLite file and PostgreSQL) holding a hand-built study.

The study is written with Optuna directly, with the trial attributes of docs/CONTRACTS.md, so these
tests pin what status counts and what export writes without training anything; the last test then
re-runs an exported file with ``nkat-search train`` to show the export is a usable config.
"""

from __future__ import annotations

import json
import subprocess
import sys

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from nkat_search.cli.main import main
from nkat_search.config import RunConfig, load_config_file

optuna.logging.set_verbosity(optuna.logging.WARNING)

STUDY = "export-status-test"
FILE_HASH = "0" * 63 + "1"
# (global_tpe, embed_dim, depth): trial numbers 0, 1, 2; trial 1 is the best.
COMPLETE = [(0.71, 64, 1), (0.74, 128, 2), (0.69, 64, 2)]
DISTRIBUTIONS = {"embed_dim": IntDistribution(64, 128, step=64), "depth": IntDistribution(1, 2),
                 "temperature": FloatDistribution(0.6, 1.0)}


def tiny_config(embed_dim: int, depth: int) -> dict:
    """A config that trains in seconds on the CPU; stored the way the objective stores it."""
    return RunConfig.from_dict({
        "embed_dim": embed_dim, "depth": depth, "temperature": 0.8, "mlp_ratio": 2.0,
        "epochs": 2, "warmup": 0, "batch_size": 64, "randaugment": [1, 5], "bf16": False,
    }).to_dict()


def build_study(url: str) -> optuna.Study:
    study = optuna.create_study(study_name=STUDY, storage=url, direction="maximize")
    study.set_user_attr("study_file_hash", FILE_HASH)
    study.set_user_attr("study_file_name", "tiny.yaml")
    study.set_user_attr("gate", 0.60)
    for gtpe, embed_dim, depth in COMPLETE:
        params = {"embed_dim": embed_dim, "depth": depth, "temperature": 0.8}
        study.add_trial(create_trial(
            params=params, distributions=DISTRIBUTIONS, value=gtpe,
            intermediate_values={1: 0.55, 2: 0.63},
            user_attrs={
                "outcome": "complete", "config": tiny_config(embed_dim, depth),
                "local_tpe": 0.63, "cifar10_accuracy": 0.5, "lambda": 0.1 * depth,
                "global_tpe": gtpe, "consistency": 0.9, "robustness": 0.8,
                "datasets": {"mnist": {"accuracy": 0.99, "lambda": 0.1, "tpe": 2.4,
                                       "epoch_seconds": [1.0, 1.0]}},
                "missing_datasets": [], "worker": "host:1:cpu",
            }))
    params = {"embed_dim": 64, "depth": 1, "temperature": 0.9}
    study.add_trial(create_trial(  # trial 3: below the Local TPE gate
        params=params, distributions=DISTRIBUTIONS, state=TrialState.PRUNED,
        intermediate_values={1: 0.41, 2: 0.45},
        user_attrs={"outcome": "gate_failed", "config": tiny_config(64, 1), "local_tpe": 0.45}))
    study.add_trial(create_trial(  # trial 4: stopped early by the pruner
        params=params, distributions=DISTRIBUTIONS, state=TrialState.PRUNED,
        intermediate_values={1: 0.2}, user_attrs={"outcome": "pruned"}))
    study.add_trial(create_trial(  # trial 5: crashed
        params=params, distributions=DISTRIBUTIONS, state=TrialState.FAIL,
        user_attrs={"outcome": "failed",
                    "error": "Traceback (most recent call last):\nRuntimeError: out of memory"}))
    running = study.ask(DISTRIBUTIONS)  # trial 6: a worker holds it right now
    running.report(0.5, 1)
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
    assert report["study"] == STUDY and report["study_file_hash"] == FILE_HASH
    summary = report["summary"]
    assert {k: summary[k] for k in ("complete", "pruned", "gate_failed", "failed", "running",
                                    "waiting", "total")} == {
        "complete": 3, "pruned": 1, "gate_failed": 1, "failed": 1, "running": 1, "waiting": 0,
        "total": 7}
    assert summary["best_value"] == pytest.approx(0.74) and summary["best_trial"] == 1
    rows = {r["number"]: r for r in report["trials"]}
    assert rows[3]["kind"] == "gate_failed" and rows[3]["local_tpe"] == pytest.approx(0.45)
    assert rows[6]["state"] == "running" and rows[6]["local_tpe"] == pytest.approx(0.5)
    assert rows[1]["epochs"] == 2 and rows[1]["lambda"] == pytest.approx(0.2)


def test_status_table_has_a_row_per_trial_and_the_summary(storage_url, capsys):
    build_study(storage_url)
    code, out, _ = cli(capsys, "status", "--study", STUDY, "--storage", storage_url)
    assert code == 0
    assert "3 complete, 1 pruned, 1 gate-failed, 1 failed, 1 running" in out
    assert "best Global TPE 0.7400 (trial 1)" in out
    assert "gate_failed" in out and "trial 5 failed: RuntimeError: out of memory" in out
    assert "missing datasets" not in out


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
    assert best["study"]["study_file_hash"] == FILE_HASH
    assert best["metrics"]["global_tpe"] == pytest.approx(0.74)
    assert best["metrics"]["datasets"]["mnist"]["accuracy"] == pytest.approx(0.99)
    stored = study.trials[1].user_attrs["config"]
    assert load_config_file(out / "best.yaml") == RunConfig.from_dict(stored)
    assert load_config_file(out / "trial-0.json") == RunConfig.from_dict(study.trials[0].user_attrs["config"])
    assert json.loads((out / "best.json").read_text()) == best


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
