"""Study files: the YAML that describes one search, parsed and checked into a ``StudySpec``.

A study file is the whole definition of a search (space, fixed recipe, gate, Stage 2 datasets,
sampler, pruner, heartbeat). The coordinator stores its text in the study, and every worker
rebuilds the same spec from that text, so workers never need the file itself.

Every mistake a user can make in the file is caught here and reported as one line naming the key
(``search.embed_dim.low``) and the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nkat_search.config import (DATASET_NAMES, ConfigError, RunConfig, field_names, field_type,
                                load_yaml)
from nkat_search.errors import UserError

TOP_KEYS = ("name", "direction", "n_trials", "seed", "search", "fixed", "enqueue", "gate",
            "stage2", "sampler", "pruner", "heartbeat")
REQUIRED_KEYS = ("name", "n_trials", "search")
PARAM_TYPES = ("int", "float", "categorical")
PARAM_KEYS = {
    "int": ("type", "low", "high", "step", "log"),
    "float": ("type", "low", "high", "step", "log"),
    "categorical": ("type", "choices"),
}
SAMPLER_TYPES = ("tpe", "random")
SAMPLER_KEYS = ("type", "n_startup_trials", "multivariate", "constraints")
CONSTRAINT_KEYS = ("consistency", "robustness")
PRUNER_KEYS = {
    "none": ("type",),
    "median": ("type", "n_startup_trials", "n_warmup_steps", "interval_steps"),
    "percentile": ("type", "percentile", "n_startup_trials", "n_warmup_steps", "interval_steps"),
    "hyperband": ("type", "min_resource", "max_resource", "reduction_factor"),
    "threshold": ("type", "lower", "n_warmup_steps", "interval_steps"),
    "successive_halving": ("type", "min_resource", "reduction_factor", "min_early_stopping_rate",
                           "bootstrap_count"),
    # Stops what can no longer reach the gate (search/gate_pruner.py); ``rank`` is another pruner
    # of this table, asked as well, to rank the trials that still can.
    "gate": ("type", "safety", "rank"),
}
HEARTBEAT_KEYS = ("interval", "grace", "max_retry")
# Stage 1 always trains CIFAR-10; Stage 2 adds these (the user's MNIST family by default).
STAGE1_DATASET = "cifar10"
DEFAULT_STAGE2 = ("mnist", "fashion_mnist", "emnist")


@dataclass
class ParamSpec:
    """One searched field: an Optuna distribution in words."""

    name: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    choices: list | None = None

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not self.low <= value <= self.high:
            return False
        if self.step is not None:
            steps = (value - self.low) / self.step
            return math.isclose(steps, round(steps), abs_tol=1e-9)
        return True


@dataclass
class HeartbeatSpec:
    """Optuna's heartbeat: a trial whose worker is silent for ``grace`` s is FAIL and retried."""

    interval: int = 30
    grace: int = 120
    max_retry: int = 2


@dataclass
class StudySpec:
    name: str
    n_trials: int
    search: dict[str, ParamSpec]
    direction: str = "maximize"
    seed: int = 0
    fixed: dict[str, Any] = field(default_factory=dict)
    enqueue: list[dict[str, Any]] = field(default_factory=list)
    gate: float = 0.60
    stage2_datasets: list[str] = field(default_factory=lambda: list(DEFAULT_STAGE2))
    sampler: dict[str, Any] = field(default_factory=dict)
    constraints: dict[str, float] = field(default_factory=dict)
    pruner: dict[str, Any] = field(default_factory=lambda: {"type": "none"})
    heartbeat: HeartbeatSpec = field(default_factory=HeartbeatSpec)
    text: str = ""
    file_hash: str = ""
    file_name: str = ""
    search_hash: str = ""  # the search definition, without budget and heartbeat (search_hash())

    def base_config(self) -> RunConfig:
        """The baseline recipe with the ``fixed`` values applied (validated at load)."""
        return RunConfig.from_dict(dict(self.fixed))


def file_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def search_hash(spec: StudySpec) -> str:
    """sha256 of what defines the search: the parsed file without budget, name and heartbeat.

    A study resumes under a file with the same search hash: raising ``n_trials`` extends the
    budget, a changed comment, key order or heartbeat changes nothing that was searched. Any
    change to the space, the fixed recipe, the queued configs, gate, Stage 2 datasets, sampler,
    seed, constraints, pruner or direction would mix two searches in one study, and is refused.
    """
    definition = {
        "direction": spec.direction, "seed": spec.seed,
        "search": {name: dataclasses.asdict(param) for name, param in spec.search.items()},
        "fixed": spec.fixed, "enqueue": spec.enqueue, "gate": spec.gate,
        "stage2": spec.stage2_datasets, "sampler": spec.sampler, "constraints": spec.constraints,
        "pruner": spec.pruner,
    }
    return hashlib.sha256(json.dumps(definition, sort_keys=True, default=repr).encode()).hexdigest()


# A study name becomes a file name (up's OUT/NAME.db, OUT/NAME/{logs,export}) and a folder of the
# worker's --checkpoint-dir: one path component, printable in a shell command without quotes, and
# short enough for every file system (a 600-character name failed its trial: File name too long).
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


SEED_MAX = 2**32 - 1


def check_study_name(name: Any, where: str = "name") -> str:
    """``name`` if it is a safe study name; else ``ConfigError`` naming the rule."""
    if not isinstance(name, str) or not STUDY_NAME.fullmatch(name):
        shown = repr(name) if not isinstance(name, str) or len(name) <= 80 else \
            f"{name[:60]!r}... ({len(name)} characters)"
        raise ConfigError(f"{where}: {shown} is not a study name: 1 to 64 letters, digits, '.', "
                          "'_' or '-', starting with a letter or digit")
    return name


def load_study_file(path: str | Path) -> StudySpec:
    """Read and check a study file; any problem is one ``UserError`` line naming the key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise UserError(f"study file {path}: cannot read it ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise UserError(f"study file {path}: not UTF-8 text (byte {err.start}); save it as "
                        "UTF-8") from None
    return parse_study_text(text, file_name=str(path))


def parse_study_text(text: str, file_name: str = "<study file>") -> StudySpec:
    """Parse study-file text (from disk, or as stored in a study) into a checked ``StudySpec``."""
    import yaml  # PyYAML: only when a study file is read, not for every command's --help

    try:
        data = load_yaml(text)  # a key given twice is an error, not "the last one wins"
    except yaml.YAMLError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"study file {file_name}: not valid YAML ({first})") from None
    try:
        spec = _parse(data)
    except ConfigError as err:
        raise ConfigError(f"study file {file_name}: {err}") from None
    spec.text, spec.file_hash, spec.file_name = text, file_hash(text), file_name
    spec.search_hash = search_hash(spec)
    return spec


def _parse(data: Any) -> StudySpec:
    _mapping("study file", data)
    _known_keys("", data, TOP_KEYS)
    for key in REQUIRED_KEYS:
        if key not in data:
            raise ConfigError(f"{key}: missing (required keys: {', '.join(REQUIRED_KEYS)})")
    name = check_study_name(data["name"])
    direction = data.get("direction", "maximize")
    if direction != "maximize":
        raise ConfigError(f"direction: only 'maximize' is supported (the objective is Global TPE), "
                          f"got {direction!r}")
    n_trials = _int("n_trials", data["n_trials"], minimum=1)
    seed = _int("seed", data.get("seed", 0), minimum=0)
    if seed > SEED_MAX:
        raise ConfigError(f"seed: at most {SEED_MAX} (numpy's seeds are 32-bit), got {seed}")

    search = _parse_search(data["search"])
    fixed = data.get("fixed") or {}
    _mapping("fixed", fixed)
    for key in fixed:
        _config_field(f"fixed.{key}", key)
        if key in search:
            raise ConfigError(f"fixed.{key}: also in search; a field is either searched or fixed")
    try:
        base = RunConfig.from_dict(dict(fixed))
    except ConfigError as err:
        raise ConfigError(f"fixed: {err}") from None
    if "dataset" in search or "dataset" in fixed:
        raise ConfigError("dataset: set by the objective (cifar10, then the stage2 datasets); "
                          "remove it from search/fixed")
    _check_search_values(search, base)

    enqueue = _parse_enqueue(data.get("enqueue") or [], search, base)
    if len(enqueue) > n_trials:
        raise ConfigError(f"enqueue: {len(enqueue)} queued configs exceed n_trials={n_trials}")
    gate = _parse_gate(data.get("gate", {"local_tpe": 0.60}))
    stage2 = _parse_stage2(data.get("stage2", {"datasets": list(DEFAULT_STAGE2)}))
    sampler, constraints = _parse_sampler(data.get("sampler") or {})
    pruner = _parse_pruner(data.get("pruner") or {"type": "none"})
    heartbeat = _parse_heartbeat(data.get("heartbeat") or {})
    return StudySpec(name=name, n_trials=n_trials, search=search, direction=direction, seed=seed,
                     fixed=dict(fixed), enqueue=enqueue, gate=gate, stage2_datasets=stage2,
                     sampler=sampler, constraints=constraints, pruner=pruner, heartbeat=heartbeat)


def _parse_search(raw: Any) -> dict[str, ParamSpec]:
    _mapping("search", raw)
    if not raw:
        raise ConfigError("search: empty; name at least one config field to search")
    search = {}
    for key, entry in raw.items():
        where = f"search.{key}"
        _config_field(where, key)
        _mapping(where, entry)
        kind = entry.get("type")
        if kind not in PARAM_TYPES:
            raise ConfigError(f"{where}.type: expected one of {', '.join(PARAM_TYPES)}, got {kind!r}")
        _known_keys(where, entry, PARAM_KEYS[kind])
        if kind == "categorical":
            choices = entry.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ConfigError(f"{where}.choices: a categorical needs a non-empty list of choices")
            for choice in choices:
                if choice is not None and not isinstance(choice, (bool, int, float, str)):
                    raise ConfigError(f"{where}.choices: {choice!r} is not a scalar "
                                      "(Optuna choices are numbers, strings, booleans)")
            if len(set(map(repr, choices))) != len(choices):
                raise ConfigError(f"{where}.choices: duplicate choices in {choices}")
            search[key] = ParamSpec(key, kind, choices=list(choices))
            continue
        declared = field_type(key)
        if kind == "int" and declared is not int:
            raise ConfigError(f"{where}.type: {key} is a {getattr(declared, '__name__', declared)} "
                              "field; use type float or categorical")
        if kind == "float" and declared is not float:
            raise ConfigError(f"{where}.type: {key} is a {getattr(declared, '__name__', declared)} "
                              "field; use type int or categorical")
        number = _int if kind == "int" else _float
        for bound in ("low", "high"):
            if bound not in entry:
                raise ConfigError(f"{where}.{bound}: missing (an {kind} range needs low and high)")
        low, high = number(f"{where}.low", entry["low"]), number(f"{where}.high", entry["high"])
        if low > high:
            raise ConfigError(f"{where}.low: {low} > high {high}; the range is inverted")
        log = entry.get("log", False)
        if not isinstance(log, bool):
            raise ConfigError(f"{where}.log: expected true or false, got {log!r}")
        step = entry.get("step")
        if step is not None:
            step = number(f"{where}.step", step)
            if step <= 0:
                raise ConfigError(f"{where}.step: must be > 0, got {step}")
            if log:
                raise ConfigError(f"{where}.step: cannot be combined with log: true (Optuna)")
            steps = (high - low) / step
            if not math.isclose(steps, round(steps), abs_tol=1e-9):
                raise ConfigError(f"{where}.step: {step} does not divide high - low = {high - low}")
        if log and low <= 0:
            raise ConfigError(f"{where}.low: must be > 0 with log: true, got {low}")
        search[key] = ParamSpec(key, kind, low, high, step, log)
    return search


def _check_search_values(search: dict[str, ParamSpec], base: RunConfig) -> None:
    """Each end of each range (and each choice) must make a valid config with the fixed values."""
    for key, param in search.items():
        values = param.choices if param.type == "categorical" else [param.low, param.high]
        for value in values:
            try:
                RunConfig.from_dict({key: value}, base=base)
            except ConfigError as err:
                raise ConfigError(f"search.{key}: value {value!r} is invalid ({err})") from None


def _parse_enqueue(raw: Any, search: dict[str, ParamSpec], base: RunConfig) -> list[dict]:
    if not isinstance(raw, list):
        raise ConfigError(f"enqueue: expected a list of partial configs, got {type(raw).__name__}")
    baseline = base.to_dict()
    out = []
    for i, entry in enumerate(raw):
        where = f"enqueue[{i}]"
        _mapping(where, entry)
        for key, value in entry.items():
            _config_field(f"{where}.{key}", key)
            if key in search:
                if not search[key].contains(value):
                    raise ConfigError(f"{where}.{key}: {value!r} is outside the search range")
            elif _normal(value) != _normal(baseline[key]):
                # Only searched fields vary per trial; anything else would silently not apply.
                raise ConfigError(f"{where}.{key}: {value!r} differs from the fixed/baseline value "
                                  f"{baseline[key]!r} and {key} is not searched")
        try:
            RunConfig.from_dict(dict(entry), base=base)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        out.append({key: value for key, value in entry.items() if key in search})
    return out


def _parse_gate(raw: Any) -> float:
    _mapping("gate", raw)
    _known_keys("gate", raw, ("local_tpe",))
    if "local_tpe" not in raw:
        raise ConfigError("gate.local_tpe: missing (the Local TPE@CIFAR10 a trial must reach)")
    value = raw["local_tpe"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"gate.local_tpe: expected a number, got {value!r}")
    if not 0 < value < math.inf:
        raise ConfigError(f"gate.local_tpe: must be in (0, inf), got {value}")
    return float(value)


def _parse_stage2(raw: Any) -> list[str]:
    _mapping("stage2", raw)
    _known_keys("stage2", raw, ("datasets",))
    datasets = raw.get("datasets", list(DEFAULT_STAGE2))
    if not isinstance(datasets, list):
        raise ConfigError(f"stage2.datasets: expected a list, got {datasets!r}")
    out = []
    for name in datasets:
        if name not in DATASET_NAMES:
            raise ConfigError(f"stage2.datasets: {name!r} is not one of {', '.join(DATASET_NAMES)}")
        if name != STAGE1_DATASET and name not in out:
            out.append(name)
    return out


def _parse_sampler(raw: Any) -> tuple[dict, dict[str, float]]:
    _mapping("sampler", raw)
    _known_keys("sampler", raw, SAMPLER_KEYS)
    kind = raw.get("type", "tpe")
    if kind not in SAMPLER_TYPES:
        raise ConfigError(f"sampler.type: expected one of {', '.join(SAMPLER_TYPES)}, got {kind!r}")
    sampler = {"type": kind,
               "n_startup_trials": _int("sampler.n_startup_trials",
                                        raw.get("n_startup_trials", 10), minimum=0),
               "multivariate": raw.get("multivariate", True)}
    if not isinstance(sampler["multivariate"], bool):
        raise ConfigError(f"sampler.multivariate: expected true or false, got {sampler['multivariate']!r}")
    constraints_raw = raw.get("constraints", {"consistency": 0.80, "robustness": 0.75})
    _mapping("sampler.constraints", constraints_raw)
    _known_keys("sampler.constraints", constraints_raw, CONSTRAINT_KEYS)
    constraints = {key: _float(f"sampler.constraints.{key}", value)
                   for key, value in constraints_raw.items()}
    for key, target in constraints.items():
        # Consistency = 1 - std/mean and Robustness = min/mean are at most 1 (a trial whose four
        # TPEs are equal): a higher target would leave every trial infeasible, the study no best.
        if not target <= 1.0:
            raise ConfigError(f"sampler.constraints.{key}: {target:g} can never be met "
                                 f"({key} is at most 1); use a target of 1 or less")
    return sampler, constraints


def _parse_pruner(raw: Any) -> dict:
    _mapping("pruner", raw)
    kind = raw.get("type", "none")
    if kind not in PRUNER_KEYS:
        raise ConfigError(f"pruner.type: expected one of {', '.join(PRUNER_KEYS)}, got {kind!r}")
    _known_keys("pruner", raw, PRUNER_KEYS[kind])
    pruner = {"type": kind}
    for key, value in raw.items():
        if key == "type":
            continue
        if key == "rank":
            pruner[key] = _parse_rank_pruner(value)
        elif key == "safety":
            pruner[key] = _float("pruner.safety", value)
            if pruner[key] < 1:
                raise ConfigError(f"pruner.safety: must be >= 1 (it stretches the largest rise "
                                  f"seen), got {pruner[key]}")
        elif key in ("percentile", "lower"):
            pruner[key] = _float(f"pruner.{key}", value)
        elif key in ("max_resource", "min_resource") and value == "auto":
            pruner[key] = value
        else:
            pruner[key] = _int(f"pruner.{key}", value, minimum=1 if key in (
                "interval_steps", "min_resource", "max_resource", "reduction_factor") else 0)
    if kind == "percentile":
        if "percentile" not in pruner:
            raise ConfigError("pruner.percentile: missing (0..100; lower prunes more)")
        if not 0 <= pruner["percentile"] <= 100:
            raise ConfigError(f"pruner.percentile: must be in [0, 100], got {pruner['percentile']}")
    if kind == "threshold" and "lower" not in pruner:
        raise ConfigError("pruner.lower: missing (the Local TPE below which a trial is pruned)")
    if kind in ("hyperband", "successive_halving") and pruner.get("reduction_factor", 3) < 2:
        raise ConfigError("pruner.reduction_factor: must be >= 2")
    return pruner


def _parse_rank_pruner(raw: Any) -> dict:
    """``pruner.rank``: any pruner of the table but ``gate`` and ``none``, named as such."""
    _mapping("pruner.rank", raw)
    kind = raw.get("type")
    if kind in ("gate", "none") or kind not in PRUNER_KEYS:
        allowed = ", ".join(k for k in PRUNER_KEYS if k not in ("gate", "none"))
        raise ConfigError(f"pruner.rank.type: expected one of {allowed}, got {kind!r}")
    try:
        return _parse_pruner(raw)
    except ConfigError as err:
        raise ConfigError(str(err).replace("pruner.", "pruner.rank.", 1)) from None


def _parse_heartbeat(raw: Any) -> HeartbeatSpec:
    _mapping("heartbeat", raw)
    _known_keys("heartbeat", raw, HEARTBEAT_KEYS)
    spec = HeartbeatSpec()
    if "interval" in raw:
        spec.interval = _int("heartbeat.interval", raw["interval"], minimum=1)
    spec.grace = _int("heartbeat.grace", raw.get("grace", max(spec.grace, 2 * spec.interval)),
                      minimum=1)
    if spec.grace <= spec.interval:
        raise ConfigError(f"heartbeat.grace: {spec.grace} s must exceed the interval "
                          f"{spec.interval} s, or live trials would be declared dead")
    if "max_retry" in raw:
        spec.max_retry = _int("heartbeat.max_retry", raw["max_retry"], minimum=0)
    return spec


def _mapping(where: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")


def _known_keys(where: str, value: dict, allowed: tuple[str, ...]) -> None:
    for key in value:
        if key not in allowed:
            name = f"{where}.{key}" if where else str(key)
            raise ConfigError(f"{name}: unknown key; allowed here: {', '.join(allowed)}")


def _config_field(where: str, key: Any) -> None:
    if key not in field_names():
        raise ConfigError(f"{where}: not a config field (see `nkat-search train --help` for the "
                          "field names)")


def _int(where: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where}: must be >= {minimum}, got {value}")
    return value


def _float(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _normal(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
