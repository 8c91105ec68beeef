"""``export`` writes the study as files: Optuna's plots as PNG and a CSV with a row per trial.

The studies live in a fresh PostgreSQL database and are written through Optuna's API with the
trial attributes of docs/CONTRACTS.md (tests/test_export_status.py builds the mixed one); the
command runs as a user runs it. The PNGs are decoded, not only named.
"""

from __future__ import annotations

import csv
import stat

import optuna
import pytest
from optuna.trial import TrialState, create_trial
from PIL import Image

from nkat_search.cli.main import main
from test_export_status import DISTRIBUTIONS, STUDY, build_study

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL_PLOTS = ["intermediate_values", "optimization_history", "parallel_coordinate",
             "param_importances", "timeline"]


def export(capsys, url, out, *extra):
    code = main(["export", "--study", STUDY, "--storage", url, "--out", str(out), *extra])
    stdout, stderr = capsys.readouterr()
    return code, stdout, stderr


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as image:
        image.load()  # decodes every row: a truncated file fails here
        assert image.format == "PNG" and min(image.size) > 200, (path, image.size)


def csv_rows(path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_export_writes_every_plot_and_a_csv_row_per_trial(fresh_postgres_url, tmp_path, capsys):
    study = build_study(fresh_postgres_url)  # complete, gate-failed, pruned, failed, running
    out = tmp_path / "export"
    code, stdout, stderr = export(capsys, fresh_postgres_url, out, "--top", "2")
    assert code == 0, stderr
    assert sorted(p.stem for p in out.glob("*.png")) == ALL_PLOTS
    for path in out.glob("*.png"):
        assert_png(path)
        assert f"wrote {path}" in stdout
    rows = csv_rows(out / "trials.csv")
    trials = study.get_trials()
    assert [int(r["number"]) for r in rows] == [t.number for t in trials]
    assert len(rows) == len(trials) >= 6
    assert [r["state"] for r in rows] == [t.state.name for t in trials]
    states = {t.state.name for t in trials}
    assert {"COMPLETE", "PRUNED", "FAIL", "RUNNING"} <= states, states
    assert [r["outcome"] for r in rows] == ["complete"] * 3 + [
        "gate_failed", "pruned", "failed", "running"]
    # Named columns, no spaces: a pruned trial's last Local TPE is never in a Global TPE column.
    assert not [c for c in rows[0] if " " in c or c == "value" or c.startswith("value")]
    for column in ("global_tpe", "local_tpe", "local_tpe_epoch", "feasible", "reason",
                   "constraint_consistency", "constraint_robustness", "consistency",
                   "robustness", "accuracy_cifar10", "params_embed_dim", "duration_s"):
        assert column in rows[0], column
    assert "config" not in " ".join(rows[0])  # the configs are the exported files
    for row, trial in zip(rows, trials):
        if trial.state.name == "COMPLETE":
            assert float(row["global_tpe"]) == pytest.approx(trial.value)
            assert float(row["constraint_robustness"]) == pytest.approx(
                trial.constraints["robustness"])
        else:
            assert row["global_tpe"] == ""
        if trial.state.name == "PRUNED":
            last = max(trial.intermediate_values)
            assert float(row["local_tpe"]) == pytest.approx(trial.intermediate_values[last])
            assert int(row["local_tpe_epoch"]) == last and row["feasible"] == "False"
        if "\n" in trial.user_attrs.get("error", ""):
            assert row["error"] == trial.user_attrs["error"]  # multi-line cells survive
    assert not list(out.glob(".*.tmp")), "a temporary file was left behind"


def test_a_study_without_complete_trials_gets_what_can_be_drawn(fresh_postgres_url, tmp_path,
                                                                  capsys):
    study = optuna.create_study(study_name=STUDY, storage=fresh_postgres_url,
                                direction="maximize")
    for number, (outcome, values) in enumerate([("gate_failed", {1: 0.41, 2: 0.45}),
                                                ("pruned", {1: 0.2}),
                                                ("gate_failed", {1: 0.38, 2: 0.52})]):
        study.add_trial(create_trial(
            params={"embed_dim": 64, "depth": 1, "temperature": 0.7 + 0.1 * number},
            distributions=DISTRIBUTIONS, state=TrialState.PRUNED, intermediate_values=values,
            user_attrs={"outcome": outcome}))
    out = tmp_path / "export"
    code, stdout, stderr = export(capsys, fresh_postgres_url, out)
    assert code == 1 and "nothing to export yet" in stderr
    assert not (out / "best.yaml").exists()
    assert sorted(p.stem for p in out.glob("*.png")) == ["intermediate_values", "timeline"]
    for path in out.glob("*.png"):
        assert_png(path)
    warning = [line for line in stderr.splitlines() if "no complete trial yet" in line]
    assert len(warning) == 1
    assert all(name in warning[0] for name in
               ("optimization_history", "param_importances", "parallel_coordinate"))
    assert "Traceback" not in stderr
    assert [r["outcome"] for r in csv_rows(out / "trials.csv")] == [
        "gate_failed", "pruned", "gate_failed"]


def test_a_plot_that_cannot_be_written_is_one_warning_not_a_failed_export(
        fresh_postgres_url, tmp_path, capsys):
    build_study(fresh_postgres_url)
    out = tmp_path / "export"
    (out / "timeline.png").mkdir(parents=True)  # a real fault: the rename onto it fails
    code, stdout, stderr = export(capsys, fresh_postgres_url, out)
    assert code == 0, stderr
    assert (out / "best.yaml").is_file() and (out / "trials.csv").is_file()
    lines = [line for line in stderr.splitlines() if "timeline.png" in line]
    assert len(lines) == 1 and "not written" in lines[0], stderr
    assert "Traceback" not in stderr
    for stem in ALL_PLOTS:
        if stem != "timeline":
            assert_png(out / f"{stem}.png")


def test_exported_files_get_the_mode_of_a_plain_open(fresh_postgres_url, tmp_path, capsys):
    """A container's user writes ./exports; mkstemp's 0600 would hide the files from the host's."""
    build_study(fresh_postgres_url)
    out = tmp_path / "export"
    assert export(capsys, fresh_postgres_url, out)[0] == 0
    plain = tmp_path / "plain"
    plain.write_text("")
    expected = stat.S_IMODE(plain.stat().st_mode)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert len(modes) >= 9 and set(modes.values()) == {expected}, (oct(expected), modes)


def test_a_study_with_no_trial_writes_no_study_files(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    optuna.create_study(study_name=STUDY, storage=url, direction="maximize")
    code, _, stderr = export(capsys, url, tmp_path / "x")
    assert code == 1 and "no trial yet" in stderr
    assert not (tmp_path / "x").exists()
