"""Study files: the shipped ones load, every bad one is refused in one line naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml

from nkat_search.cli.main import main
from nkat_search.config import RunConfig
from nkat_search.search.space import enqueue, suggest_config
from nkat_search.search.spec import load_study_file, parse_study_text

STUDIES = Path(__file__).resolve().parents[1] / "studies"

MINIMAL = {
    "name": "t",
    "n_trials": 2,
    "search": {"depth": {"type": "int", "low": 1, "high": 2},
               "conv_stem": {"type": "categorical", "choices": ["tiny", "small"]}},
    "fixed": {"epochs": 2, "warmup": 0},
    "gate": {"local_tpe": 0.6},
}


def test_round2_short_differs_from_round2_only_in_budget():
    full = load_study_file(STUDIES / "round2.yaml")
    short = load_study_file(STUDIES / "round2_short.yaml")
    assert short.search == full.search
    assert short.stage2_datasets == full.stage2_datasets
    assert short.base_config().train.epochs == 8 and short.n_trials == 8 and short.gate == 0.45


def test_round2_is_the_users_plan():
    spec = load_study_file(STUDIES / "round2.yaml")
    assert spec.n_trials == 50 and spec.gate == 0.60 and spec.direction == "maximize"
    assert spec.stage2_datasets == ["mnist", "fashion_mnist", "emnist"]
    s = spec.search
    assert s["patch_size"].choices == [2, 4]
    assert s["conv_stem"].choices == ["off", "tiny", "small"]
    assert (s["embed_dim"].low, s["embed_dim"].high, s["embed_dim"].step) == (384, 512, 64)
    assert (s["depth"].low, s["depth"].high) == (5, 9)
    assert (s["temperature"].low, s["temperature"].high) == (0.6, 1.0)
    assert (s["top_p"].low, s["top_p"].high) == (0.80, 0.95)
    assert (s["top_k"].low, s["top_k"].high) == (4, 8)
    assert (s["nkat_strength"].low, s["nkat_strength"].high) == (0.001, 0.005)
    assert (s["dropout_attn"].low, s["dropout_attn"].high) == (0.10, 0.25)
    assert (s["dropout_embed"].low, s["dropout_embed"].high) == (0.05, 0.15)
    assert (s["lr"].low, s["lr"].high, s["lr"].log) == (1e-4, 3e-4, True)
    assert (s["mixup"].low, s["mixup"].high) == (0.1, 0.3)
    assert (s["cutmix"].low, s["cutmix"].high) == (0.1, 0.3)
    base = spec.base_config()
    assert base.train.epochs == 40 and base.train.val_fraction == 0.1
    assert spec.sampler == {"type": "tpe", "n_startup_trials": 10, "multivariate": True}
    assert spec.constraints == {"consistency": 0.80, "robustness": 0.75}
    # The pruner is the one the replay of the recorded curves chose (results/pruner_replay.json).
    replay = json.loads((STUDIES.parent / "results" / "pruner_replay.json").read_text())
    chosen = [row for row in replay["rows"] if row.get("chosen")]
    assert len(chosen) == 1 and spec.pruner == chosen[0]["study_file_pruner"]
    assert spec.pruner["type"] == "gate"
    assert len(spec.file_hash) == 64

    # The enqueued first trial is the user's baseline command line, field for field.
    study = optuna.create_study(direction="maximize")
    enqueue(study, spec)
    cfg = suggest_config(study.ask(), spec)
    baseline = RunConfig.from_dict({"epochs": 40, "val_fraction": 0.1, "compile": True})
    assert cfg.to_dict() == baseline.to_dict()


def test_round2_aug_is_round2_plus_the_augmentation():
    full = load_study_file(STUDIES / "round2.yaml")
    aug = load_study_file(STUDIES / "round2_aug.yaml")
    assert aug.name == "nkat-round2-aug" and aug.gate == full.gate == 0.60
    assert aug.n_trials == full.n_trials and aug.stage2_datasets == full.stage2_datasets
    assert aug.pruner == full.pruner
    assert aug.base_config().to_dict() == full.base_config().to_dict()
    added = {"randaugment", "cutout"}
    assert set(aug.search) == set(full.search) | added
    for key in set(full.search) - {"mixup", "cutmix"}:
        assert aug.search[key] == full.search[key], key
    assert aug.search["mixup"].low == aug.search["cutmix"].low == 0.0  # off is searchable
    assert "0 0" in aug.search["randaugment"].choices and 0 in aug.search["cutout"].choices

    # The user's baseline first, then the same model with crop and flip only.
    study = optuna.create_study(direction="maximize")
    enqueue(study, aug)
    baseline = suggest_config(study.ask(), aug)
    assert baseline.to_dict() == RunConfig.from_dict(
        {"epochs": 40, "val_fraction": 0.1, "compile": True}).to_dict()
    light = suggest_config(study.ask(), aug).train
    assert (light.randaugment, light.cutout, light.mixup, light.cutmix) == ((0, 0), 0, 0.0, 0.0)


def test_quick_study_is_small():
    spec = load_study_file(STUDIES / "quick.yaml")
    base = spec.base_config()
    assert spec.n_trials <= 8 and base.train.epochs <= 3
    assert 0 < base.train.train_limit <= 4096 and 0 < base.train.test_limit <= 1024
    assert spec.search["embed_dim"].high <= 64 and spec.search["depth"].high <= 2
    assert set(spec.stage2_datasets) == {"mnist", "fashion_mnist", "emnist"}


def test_suggest_config_is_fixed_plus_suggested():
    spec = parse_study_text(yaml.safe_dump(MINIMAL))
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    cfg = suggest_config(study.ask(), spec)
    assert cfg.train.epochs == 2 and cfg.train.warmup == 0
    assert cfg.model.depth in (1, 2) and cfg.model.conv_stem in ("tiny", "small")


def _edit(path: str, value):
    """MINIMAL with ``value`` set at the dotted ``path`` (``None`` deletes the key)."""
    data = yaml.safe_load(yaml.safe_dump(MINIMAL))
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    if value is None:
        node.pop(last)
    else:
        node[last] = value
    return data


BAD_FILES = [
    ("unknown top-level key", _edit("colour", 1), "colour"),
    ("unknown search entry key", _edit("search.depth.lo", 1), "search.depth.lo"),
    ("unknown sampler key", _edit("sampler.seeds", 1), "sampler.seeds"),
    ("unknown constraint", _edit("sampler.constraints.accuracy", 0.9), "sampler.constraints.accuracy"),
    ("unknown pruner key", _edit("pruner", {"type": "median", "patience": 3}), "pruner.patience"),
    ("unknown pruner type", _edit("pruner", {"type": "sometimes"}), "pruner.type"),
    ("unknown heartbeat key", _edit("heartbeat", {"every": 3}), "heartbeat.every"),
    ("unknown stage2 key", _edit("stage2", {"datasets": ["mnist"], "epochs": 3}), "stage2.epochs"),
    ("inverted range", _edit("search.depth", {"type": "int", "low": 9, "high": 5}), "search.depth.low"),
    ("empty categorical", _edit("search.conv_stem", {"type": "categorical", "choices": []}),
     "search.conv_stem.choices"),
    ("categorical without choices", _edit("search.conv_stem", {"type": "categorical"}),
     "search.conv_stem.choices"),
    ("gate zero", _edit("gate.local_tpe", 0), "gate.local_tpe"),
    ("gate negative", _edit("gate.local_tpe", -0.5), "gate.local_tpe"),
    ("gate infinite", _edit("gate.local_tpe", float("inf")), "gate.local_tpe"),
    ("gate not a number", _edit("gate.local_tpe", "high"), "gate.local_tpe"),
    ("search key not a field", _edit("search.depht", {"type": "int", "low": 1, "high": 2}),
     "search.depht"),
    ("fixed key not a field", _edit("fixed.epoch", 3), "fixed.epoch"),
    ("searched and fixed", _edit("fixed.depth", 3), "fixed.depth"),
    ("invalid fixed value", _edit("fixed.epochs", 0), "epochs"),
    ("fixed value of wrong type", _edit("fixed.val_fraction", "ten percent"), "val_fraction"),
    ("int range on a float field", _edit("search.lr", {"type": "int", "low": 1, "high": 2}),
     "search.lr.type"),
    ("step with log", _edit("search.lr", {"type": "float", "low": 1e-4, "high": 3e-4, "step": 1e-4,
                                          "log": True}), "search.lr.step"),
    ("enqueue out of range", _edit("enqueue", [{"depth": 7}]), "enqueue[0].depth"),
    ("enqueue of an unsearched value", _edit("enqueue", [{"depth": 1, "epochs": 5}]),
     "enqueue[0].epochs"),
    ("more enqueued than the budget", _edit("enqueue", [{"depth": 1}, {"depth": 2}, {"depth": 1}]),
     "enqueue"),
    ("stage2 unknown dataset", _edit("stage2.datasets", ["mnist", "svhn"]), "stage2.datasets"),
    ("missing n_trials", _edit("n_trials", None), "n_trials"),
    ("zero trials", _edit("n_trials", 0), "n_trials"),
]


@pytest.mark.parametrize("case, data, key", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_study_file_is_one_line_naming_the_key(case, data, key, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    code = main(["study", "create", "--study", str(path), "--storage",
                 f"sqlite:///{tmp_path / 'study.db'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert key in err and str(path) in err, err
    assert not (tmp_path / "study.db").exists()  # the file is checked before any storage opens


def test_yaml_syntax_error_is_one_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    assert main(["study", "create", "--study", str(path), "--storage", "sqlite:///x.db"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not valid YAML" in err


@pytest.mark.parametrize("url, expect", [
    ("mysql://user:hunter2@db/x", "unsupported scheme"),
    ("postgresql+psycopg2://user:hunter2@127.0.0.1:1/nkat", "is PostgreSQL running"),
    ("postgresql://user:hunter2@127.0.0.1:1/nkat", "is PostgreSQL running"),
    ("sqlite:////proc/nkat/study.db", "writable path"),
    ("sqlite://relative.db", "three slashes"),
])
def test_wrong_storage_url_is_one_line(url, expect, tmp_path, capsys):
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    assert main(["study", "create", "--study", str(path), "--storage", url]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert expect in err and "hunter2" not in err, err
    assert url.split("://")[0] in err


def test_missing_postgres_database_names_the_fix(postgres_url, tmp_path, capsys):
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    url = postgres_url.rsplit("/", 1)[0] + "/no_such_db"
    assert main(["study", "create", "--study", str(path), "--storage", url]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "createdb no_such_db" in err, err


def test_worker_on_unknown_study_is_one_line(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert main(["worker", "--storage", url, "--study", "nope", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'nope' not found" in err, err


def test_a_raised_budget_extends_the_study_and_another_search_is_refused(tmp_path, capsys):
    """n_trials is the budget, not the search: raising it (in the file, or --n-trials) resumes.

    Before, any change to the file changed its hash and `study create` refused to resume.
    """
    from nkat_search.search.coordinator import budget_state, load_study_spec_from_storage

    url = f"sqlite:///{tmp_path / 'study.db'}"
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    assert main(["study", "create", "--study", str(path), "--storage", url]) == 0
    capsys.readouterr()
    path.write_text("# a comment, keys in another order\n"
                    + yaml.safe_dump(MINIMAL | {"n_trials": 4}, sort_keys=False))
    assert main(["study", "create", "--study", str(path), "--storage", url]) == 0
    assert "resumed study 't'" in capsys.readouterr().out
    assert main(["study", "create", "--study", str(path), "--storage", url, "--n-trials", "6"]) == 0
    assert "budget 6 trials (raised from 4)" in capsys.readouterr().out
    study = optuna.load_study(study_name="t", storage=url)
    assert budget_state(study)["budget"] == 6  # what every worker reads before each trial
    assert load_study_spec_from_storage(study._storage, "t").n_trials == 6

    path.write_text(yaml.safe_dump(_edit("gate.local_tpe", 0.5)))
    assert main(["study", "create", "--study", str(path), "--storage", url]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "another search definition" in err
    assert "--name" in err


def test_an_old_optuna_is_one_line_naming_the_floor():
    """Optuna 4.9 has no Trial.set_constraint: every trial failed after Stage 2, up exited 0."""
    import re

    from nkat_search.errors import UserError
    from nkat_search.search import OPTUNA_MIN, check_optuna

    with pytest.raises(UserError, match=r"optuna 4\.9\.0 is installed.*optuna>=5\.0"):
        check_optuna("4.9.0")
    check_optuna("5.0.0")
    check_optuna(optuna.__version__)
    pyproject = (STUDIES.parent / "pyproject.toml").read_text()
    floor = re.search(r'"optuna>=([\d.]+)"', pyproject).group(1)
    assert tuple(int(p) for p in floor.split(".")) == OPTUNA_MIN
