"""The pieces behind tests/test_reliability.py, checked fast and in-process on real storages.

Damaged checkpoints (set aside, the one before or a fresh start), the retry accounting (faults
count, stops do not; a configuration whose retries are spent is reported by status and by the
worker's exit code), passwords kept out of --help, command lines and errors, and bad input that
must be one line and exit 2.
"""

from __future__ import annotations

import json
import time

import optuna
import pytest
import torch
import yaml

from nkat_search.cli.main import main
from nkat_search.config import RunConfig
from nkat_search.train.loop import (CheckpointUnreadable, TrainOptions, previous_checkpoint,
                                    train_model)

optuna.logging.set_verbosity(optuna.logging.WARNING)
# The tests ask and tell by hand, as the worker does; Optuna warns that heartbeats expect optimize.
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")

TINY = {"embed_dim": 32, "depth": 1, "train_limit": 128, "test_limit": 64, "batch_size": 64,
        "epochs": 2, "warmup": 1, "dataset": "mnist"}
EVERY_EPOCH = TrainOptions(checkpoint_interval_s=0)


def truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def test_a_damaged_checkpoint_falls_back_to_the_one_before_then_to_a_fresh_start(
        data_dir, tmp_path):
    cfg = RunConfig.from_dict(TINY)
    straight = train_model(cfg, data_dir=data_dir, device="cpu", out_dir=tmp_path / "a",
                           progress=False, options=EVERY_EPOCH)
    path = tmp_path / "b" / "checkpoint.pt"
    train_model(cfg, data_dir=data_dir, device="cpu", out_dir=path.parent, progress=False,
                options=EVERY_EPOCH)
    assert torch.load(previous_checkpoint(path), weights_only=False)["epoch"] == 1
    truncate(path)

    resumed = train_model(cfg, data_dir=data_dir, device="cpu", out_dir=path.parent,
                          progress=False, options=EVERY_EPOCH)
    assert resumed.resumed_from_epoch == 1  # epoch 2 was damaged: it is trained again
    assert resumed.accuracy == straight.accuracy  # and bit for bit as before
    assert (path.parent / "checkpoint.pt.unreadable").exists()
    assert torch.load(path, weights_only=False)["epoch"] == 2

    # Both damaged: both set aside, one line saying so; the next run starts over.
    truncate(path)
    previous_checkpoint(path).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointUnreadable, match="set aside"):
        train_model(cfg, data_dir=data_dir, device="cpu", out_dir=path.parent, progress=False)
    assert {p.name for p in path.parent.iterdir()} == {
        "checkpoint.pt.unreadable", "checkpoint.prev.pt.unreadable"}
    again = train_model(cfg, data_dir=data_dir, device="cpu", out_dir=path.parent,
                        progress=False)
    assert again.resumed_from_epoch == 0 and again.accuracy == straight.accuracy


STUDY_TEXT = {
    "name": "units", "n_trials": 1, "seed": 1,
    "search": {"temperature": {"type": "float", "low": 0.6, "high": 1.0}},
    "fixed": {"conv_stem": "tiny", "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 4,
              "epochs": 2, "warmup": 0, "batch_size": 64, "val_fraction": 0.1,
              "train_limit": 256, "test_limit": 64},
    "gate": {"local_tpe": 1e-6}, "stage2": {"datasets": ["mnist"]},
    "sampler": {"type": "random"}, "pruner": {"type": "none"},
    "heartbeat": {"interval": 1, "grace": 2, "max_retry": 1},
}


def spec():
    from nkat_search.search.spec import parse_study_text

    return parse_study_text(yaml.safe_dump(STUDY_TEXT, sort_keys=False))


def test_a_damaged_stage2_checkpoint_resumes_or_restarts_inside_the_objective(data_dir, tmp_path):
    """Inside Stage 2 as well: MNIST's last checkpoint truncated, the trial resumes from the one
    before and records it (``resumed_from_epoch_mnist``); both damaged, MNIST starts over."""
    from nkat_search.search.objective import Objective
    from nkat_search.search.trials import TrialRecord

    objective = Objective(spec(), checkpoint_root=tmp_path, data_dir=data_dir, device="cpu",
                          progress=False, checkpoint_interval_s=0)
    first = optuna.create_study(direction="maximize")
    first.optimize(objective, n_trials=1)
    mnist = tmp_path / "units" / "trial-0" / "mnist"

    def again() -> optuna.trial.FrozenTrial:
        study = optuna.create_study(direction="maximize")  # trial 0 again, same folder
        study.enqueue_trial(first.trials[0].params)
        study.optimize(objective, n_trials=1)
        trial = study.trials[0]
        assert trial.state.name == "COMPLETE", trial.user_attrs
        assert trial.value == first.trials[0].value  # bit for bit, whichever way it resumed
        return trial

    truncate(mnist / "checkpoint.pt")
    record = TrialRecord.of(again())
    assert record.resumed_from_epoch == 2       # CIFAR-10 restored, not retrained
    assert record.resumed == {"mnist": 1}       # from checkpoint.prev.pt
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (mnist / name).write_bytes(b"garbage")
    record = TrialRecord.of(again())
    assert record.resumed == {}                 # MNIST trained from scratch
    assert (mnist / "checkpoint.pt.unreadable").exists()
    assert (mnist / "checkpoint.prev.pt.unreadable").exists()


def stale(study, storage, trial) -> None:
    """Make ``trial`` look like its worker died: it beat once, then fell silent past the grace."""
    storage.record_heartbeat(trial._trial_id)
    # SQLite's CURRENT_TIMESTAMP counts whole seconds: a margin of more than one.
    time.sleep(STUDY_TEXT["heartbeat"]["grace"] + 1.5)


@pytest.fixture(scope="module")
def spent_chain(tmp_path_factory) -> tuple[str, optuna.Study]:
    """A configuration stopped politely three times, then killed twice with max_retry 1."""
    from nkat_search.search.coordinator import create_study
    from nkat_search.search.stale_trials import fail_stale_trials
    from nkat_search.search.storage import open_storage

    url = f"sqlite:///{tmp_path_factory.mktemp('spent') / 's.db'}"
    hb = STUDY_TEXT["heartbeat"]
    storage = open_storage(url, heartbeat_interval=hb["interval"], grace_period=hb["grace"],
                           max_retry=hb["max_retry"])
    study = create_study(spec(), storage)[0]
    retry = storage.get_heartbeat_stale_trial_callback()
    trial = study.ask()
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    for stop in range(3):
        number = retry.requeue(study, study.trials[-1], counted=False)
        trial = study.ask()
        assert trial.number == number == stop + 1  # the copy, not a new configuration
        if stop < 2:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    for kill in range(2):  # the worker of trial 3, then of its retry, dies
        stale(study, storage, trial)
        assert fail_stale_trials(study) == [trial._trial_id]
        if kill == 0:
            assert study.trials[3].user_attrs["error"].endswith("retry queued")
            trial = study.ask()
            assert trial.number == 4
    return url, study


def test_faults_count_against_max_retry_and_stops_do_not(spent_chain):
    from nkat_search.search.coordinator import budget_state

    _, study = spent_chain
    trials = study.trials
    assert [t.state.name for t in trials] == ["FAIL"] * 5
    assert [t.system_attrs.get("retry_faults") for t in trials] == [None, 0, 0, 0, 1]
    killed = trials[3]
    assert killed.user_attrs["outcome"] == "failed"
    assert killed.user_attrs["error"].startswith("worker lost: no heartbeat")
    assert "retries spent" in trials[4].user_attrs["error"]
    state = budget_state(study, 1)
    assert state["used"] == 1 and state["retries"] == 4
    assert [c["trial"] for c in state["lost"]] == [0] and state["lost"][0]["attempts"] == 5


def test_a_spent_configuration_is_loud_in_status_and_the_worker_exit_code(
        spent_chain, tmp_path, data_dir, capsys):
    from nkat_search.search.worker import EXIT_LOST, WorkerOptions, run_worker

    url, _ = spent_chain
    assert main(["status", "--study", "units", "--storage", url]) == 0
    out = capsys.readouterr().out
    assert "1 configuration(s) ended without a result" in out and "retries spent" in out
    assert main(["status", "--study", "units", "--storage", url, "--json"]) == 0
    assert [c["trial"] for c in json.loads(capsys.readouterr().out)["lost"]] == [0]
    code = run_worker(WorkerOptions(storage=url, study="units", device="cpu",
                                    data_dir=str(data_dir), checkpoint_dir=str(tmp_path / "c"),
                                    progress=False))
    assert code == EXIT_LOST
    assert "ended without a result" in capsys.readouterr().out


def test_failures_are_the_same_way_whatever_their_numbers():
    from nkat_search.search.worker import failure_signature

    one = failure_signature("out of GPU memory: Tried to allocate 1.01 GiB (GPU 0; 79.1 GiB)")
    two = failure_signature("out of GPU memory: Tried to allocate 3.5 GiB (GPU 1; 79.1 GiB)")
    assert one == two
    assert failure_signature("RuntimeError: CUDA error") != failure_signature("KeyError: 'x'")


# -- passwords -------------------------------------------------------------------------------

SECRET = "s3cr%40t-Pw"
PG_URL = f"postgresql+psycopg2://nkat:{SECRET}@db.example:5432/nkat"


@pytest.mark.parametrize("command", ["worker", "status", "export", "dashboard", "study create",
                                     "study show"])
def test_help_never_prints_the_password_from_the_environment(command, monkeypatch, capsys):
    monkeypatch.setenv("NKAT_STORAGE", PG_URL)
    with pytest.raises(SystemExit) as done:
        main([*command.split(), "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--storage" in out and "$NKAT_STORAGE" in out
    assert "s3cr" not in out and "db.example" not in out


def test_the_environment_still_supplies_the_url(monkeypatch, tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'env.db'}"
    optuna.create_study(study_name="from-env", storage=url)
    monkeypatch.setenv("NKAT_STORAGE", url)
    assert main(["status", "--study", "from-env", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["study"] == "from-env"


def test_up_gives_its_children_the_url_in_the_environment_only(monkeypatch, tmp_path):
    import argparse
    import subprocess

    from nkat_search.cli.commands import up

    seen = []

    class FakeProcess:
        returncode = 0

        def __init__(self, argv, **kwargs):
            seen.append((argv, kwargs.get("env")))

        def poll(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(subprocess, "run", lambda argv, **kw: FakeProcess(argv, **kw))
    parser = argparse.ArgumentParser()
    up.add_arguments(parser)  # the flags as up parses them, defaults and all
    args = parser.parse_args(["--study", "s.yaml", "--workers", "2"])
    runner = up.Up(args, "s", PG_URL, tmp_path / "s")
    (tmp_path / "s" / "logs").mkdir(parents=True)
    runner._child(["study", "create", "--study", "s.yaml"])
    runner._start_workers()
    assert len(seen) == 3
    for argv, env in seen:
        assert "s3cr" not in " ".join(argv) and "--storage" not in argv, argv
        assert env["NKAT_STORAGE"] == PG_URL


def test_worker_siblings_get_no_url_on_their_command_line():
    import argparse

    from nkat_search.cli.commands import worker

    parser = argparse.ArgumentParser()
    worker.add_arguments(parser)
    args = parser.parse_args(["--storage", PG_URL, "--study", "s", "--device", "cpu"])
    argv = worker._sibling_argv(args, "cpu", 1)
    assert "--storage" not in argv and not any("s3cr" in a for a in argv)


@pytest.mark.parametrize("url", [
    "postgresql://nkat:p@ss@127.0.0.1:1/db",        # '@' not encoded: refused, whole password
    "postgresql://nkat:p%40ss@127.0.0.1:1/db",      # encoded: the driver's error, password out
])
def test_errors_never_print_a_password(url, capsys):
    code = main(["status", "--study", "s", "--storage", url])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "p@ss" not in err and "p%40ss" not in err and "ss@" not in err, err
    assert "nkat:***@127.0.0.1" in err, err


def test_mask_url_hides_the_whole_password():
    from nkat_search.search.storage_url import mask_url, redact

    assert mask_url("postgresql://u:p@ss@h:5/db") == "postgresql://u:***@h:5/db"
    assert mask_url("postgresql://u:pa:ss@h/db") == "postgresql://u:***@h/db"
    assert mask_url("sqlite:///runs/x.db") == "sqlite:///runs/x.db"
    assert mask_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert redact("failed for p@ss and p%40ss", "postgresql://u:p%40ss@h/db") == \
        "failed for *** and ***"


def test_a_slash_in_the_password_is_masked_and_refused(capsys):
    from nkat_search.search.storage_url import mask_url, redact

    # SQLAlchemy reads the password up to the '@', across the '/': pa/ss.
    url = "postgresql://nkat:pa/ss@127.0.0.1:1/db"
    assert mask_url(url) == "postgresql://nkat:***@127.0.0.1:1/db"
    assert redact("failed for pa/ss", url) == "failed for ***"
    code = main(["status", "--study", "s", "--storage", url])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "pa/ss" not in err and "nkat:***@127.0.0.1" in err, err
    assert "%2F" in err and "NKAT_STORAGE_PASSWORD_FILE" in err, err


def test_a_slash_in_the_user_is_masked_and_refused(capsys):
    from nkat_search.search.storage_url import mask_url, redact

    # SQLAlchemy would take "us" for the host and "er:pw@127.0.0.1:1/db" for the database, and
    # print the password in its "database ... does not exist" error.
    url = "postgresql://us/er:pw@127.0.0.1:1/db"
    assert mask_url(url) == "postgresql://us/er:***@127.0.0.1:1/db"
    assert redact("database er:pw@127.0.0.1:1/db", url) == "database er:***@127.0.0.1:1/db"
    assert mask_url("postgresql://h:5432/db") == "postgresql://h:5432/db"
    code = main(["status", "--study", "s", "--storage", url])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert ":pw@" not in err and "us/er:***@127.0.0.1" in err and "%2F" in err, err


# -- bad input: one line, exit 2 -------------------------------------------------------------

def one_line_exit_2(capsys, *argv) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--lr", "nan"),
                                         ("--temperature", "nan"), ("--top_p", "nan"),
                                         ("--dropout_attn", "nan"), ("--ema", "inf")])
def test_nan_and_inf_are_refused_for_float_fields(flag, value, capsys):
    line = one_line_exit_2(capsys, "params", flag, value)
    assert flag.lstrip("-") in line and "finite" in line


def test_a_duplicated_key_in_a_study_file_is_refused(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text("name: dup\nn_trials: 8\nsearch: {lr: {type: float, low: 1.0e-4, "
                    "high: 2.0e-4}}\nn_trials: 500\n")
    line = one_line_exit_2(capsys, "study", "create", "--study", str(path), "--storage",
                           f"sqlite:///{tmp_path / 'x.db'}")
    assert "duplicate key 'n_trials'" in line and "line 4" in line
    assert not (tmp_path / "x.db").exists()


def test_a_duplicated_key_in_a_config_file_is_refused(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text("lr: 2.0e-4\ndepth: 7\nlr: 2.0e-2\n")
    assert "duplicate key 'lr'" in one_line_exit_2(capsys, "params", "--config", str(path))


def test_nan_in_a_study_file_is_refused(tmp_path, capsys):
    path = tmp_path / "nan.yaml"
    path.write_text("name: n\nn_trials: 2\nsearch: {lr: {type: float, low: 1.0e-4, "
                    "high: 2.0e-4}}\nfixed: {temperature: .nan}\n")
    assert "temperature" in one_line_exit_2(capsys, "study", "create", "--study", str(path),
                                            "--storage", f"sqlite:///{tmp_path / 'x.db'}")


@pytest.mark.parametrize("argv", [["dashboard", "--port", "70000"],
                                  ["dashboard", "--port", "-1"]])
def test_a_port_out_of_range_is_one_line(argv, tmp_path, capsys):
    line = one_line_exit_2(capsys, *argv, "--storage", f"sqlite:///{tmp_path / 'x.db'}")
    assert "--port" in line and "65535" in line


def test_up_with_a_port_out_of_range_is_one_line(tmp_path, capsys):
    line = one_line_exit_2(capsys, "up", "--study", "studies/quick.yaml", "--port", "70000",
                           "--out", str(tmp_path / "runs"))
    assert "--port" in line
    assert not (tmp_path / "runs").exists()
