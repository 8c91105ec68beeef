"""CLI edges: bad input is one line on stderr and exit code 2; params agrees with the model."""

import json

import pytest

from nkat_search.cli.main import main
from nkat_search.config import ConfigError, RunConfig
from nkat_search.train.model import build_model, count_parameters


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_params_json_equals_the_sum_of_trainable_numel(capsys):
    code, out, _ = run_cli(capsys, "params", "--json")
    assert code == 0
    rows = {r["dataset"]: r for r in json.loads(out)["datasets"]}
    model = build_model(RunConfig().model, in_chans=3, num_classes=10)
    expected = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert rows["cifar10"]["parameters"] == expected == count_parameters(model)
    assert rows["cifar10"]["lambda"] == pytest.approx(expected / 1e6)
    # Grayscale sets differ only by the input channels and the classifier's classes.
    assert rows["mnist"]["parameters"] == rows["fashion_mnist"]["parameters"]
    assert rows["emnist"]["num_classes"] == 26


@pytest.mark.parametrize("args, needle", [
    (["params", "--patch_size", "3"], "patch_size"),
    (["params", "--depth", "-1"], "depth"),
    (["params", "--conv_stem", "huge"], "conv_stem"),
    (["params", "--embed_dim", "100"], "embed_dim"),
])
def test_bad_flags_are_one_line_and_exit_2(capsys, args, needle):
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0]


def test_unknown_key_in_a_config_file_is_named(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("embed_dim: 384\nembedding_size: 7\n")
    code, _, err = run_cli(capsys, "params", "--config", str(path))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "embedding_size" in lines[0] and str(path) in lines[0]


def test_wrong_type_in_a_config_file_is_named(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("depth: seven\n")
    code, _, err = run_cli(capsys, "params", "--config", str(path))
    assert code == 2 and "depth" in err


def test_config_from_dict_round_trips():
    cfg = RunConfig()
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("value", ["2 9", [2, 9], (2, 9)])
def test_randaugment_takes_the_command_line_form_too(value):
    assert RunConfig.from_dict({"randaugment": value}).train.randaugment == (2, 9)


@pytest.mark.parametrize("value", ["2", "2 x", "2 9 1", [2], 29])
def test_bad_randaugment_names_both_forms(value):
    with pytest.raises(ConfigError, match=r'randaugment: expected two integers like \[2, 9\] or "2 9"'):
        RunConfig.from_dict({"randaugment": value})


def test_worker_device_all_without_a_gpu_is_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "worker", "--storage", f"sqlite:///{tmp_path / 'x.db'}",
                           "--study", "s", "--device", "all")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--device all" in lines[0] and "--device cpu" in lines[0]


def test_worker_device_all_means_every_visible_gpu(monkeypatch):
    import torch

    from nkat_search.cli.commands.worker import _devices

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert _devices("all") == [f"cuda:{i}" for i in range(8)]
    assert _devices("cuda:3") == ["cuda:3"]


def test_storage_defaults_to_the_environment(capsys, monkeypatch, tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path / 'env.db'}"
    optuna.create_study(study_name="from-env", storage=url)
    monkeypatch.setenv("NKAT_STORAGE", url)
    code, out, _ = run_cli(capsys, "status", "--study", "from-env", "--json")
    assert code == 0 and json.loads(out)["study"] == "from-env"


def test_version(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("nkat-search ") and out.split()[1] in (metadata.version("nkat-search"),
                                                                 "unknown")


@pytest.mark.parametrize("argv, needle", [
    (["status", "--study", "s", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "--depth", "seven"], "argument --depth: invalid int value"),
    (["nosuchcommand"], "invalid choice"),
])
def test_a_bad_flag_is_one_line_not_the_usage(capsys, argv, needle):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "--help" in err, err
    assert "usage:" not in err


def test_status_into_a_closed_pipe_is_no_traceback(tmp_path):
    """`status --json | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    import subprocess
    import sys

    import optuna

    url = f"sqlite:///{tmp_path / 'pipe.db'}"
    study = optuna.create_study(study_name="pipe", storage=url)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=40)
    shell = subprocess.run(
        f"{sys.executable} -m nkat_search status --study pipe --storage {url} --json | head -1",
        shell=True, capture_output=True, text=True, timeout=120)
    assert shell.stdout.strip() == "{"
    assert "Traceback" not in shell.stderr and "BrokenPipe" not in shell.stderr, shell.stderr


def test_commands_find_ups_storage_by_the_study_name(capsys, monkeypatch, tmp_path):
    """Right after `up`, `status --study NAME` from the same folder needs no --storage."""
    import optuna

    monkeypatch.delenv("NKAT_STORAGE", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    optuna.create_study(study_name="nkat-quick", storage=f"sqlite:///{tmp_path / 'runs' / 'nkat-quick.db'}")
    code, out, _ = run_cli(capsys, "status", "--study", "nkat-quick", "--json")
    assert code == 0 and json.loads(out)["study"] == "nkat-quick"
    code, out, _ = run_cli(capsys, "status", "--study", "nkat-quick", "--storage",
                           "runs/nkat-quick.db", "--json")  # a bare path
    assert code == 0 and json.loads(out)["study"] == "nkat-quick"
    code, _, err = run_cli(capsys, "status", "--study", "other")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no storage given (no runs/other.db here either)" in err and "NKAT_STORAGE" in err


@pytest.mark.parametrize("value, zero_ok, bad", [
    (None, False, False), (0.5, False, False), (0.0, True, False), (0.0, False, True),
    (-1.0, True, True), (float("nan"), True, True), (float("inf"), False, True)])
def test_duration_flags_take_finite_seconds(value, zero_ok, bad):
    from nkat_search.cli.checks import check_seconds
    from nkat_search.errors import UserError

    if not bad:
        check_seconds("--wait", value, zero_ok=zero_ok)
        return
    with pytest.raises(UserError) as caught:
        check_seconds("--wait", value, zero_ok=zero_ok)
    bound = ">= 0" if zero_ok else "> 0"
    assert str(caught.value) == f"--wait: must be a number of seconds {bound}, got {value}"
