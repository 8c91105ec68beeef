"""Stage 2: one config trained on several datasets and scored as the user's Stage 2 table."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from nkat_search.atomic import write_text_atomic
from nkat_search.config import RunConfig
# loop.train_model is looked up at each call, so a stand-in put there is the one trained.
from nkat_search.train import loop, metrics
from nkat_search.train.sources import DataError


@dataclass
class Stage2Report:
    config: dict
    results: dict  # dataset -> TrainResult as a dict
    missing: dict[str, str] = field(default_factory=dict)  # dataset -> why it could not run
    table: metrics.Stage2Table | None = None

    def to_json(self) -> str:
        return json.dumps({
            "config": self.config,
            "results": self.results,
            "missing": self.missing,
            "table": self.table.to_dict() if self.table else None,
        }, indent=2)

    def to_markdown(self) -> str:
        lines = ["# Stage 2 evaluation", ""]
        if self.table is not None:
            lines.append(self.table.to_markdown())
        for name, why in self.missing.items():
            lines += ["", f"- {name}: not run ({why})"]
        return "\n".join(lines) + "\n"


def run_stage2(
    cfg: RunConfig,
    datasets: list[str],
    *,
    data_dir=None,
    device="auto",
    out_dir: str | Path | None = None,
    results: dict | None = None,
    on_dataset: Callable[[str, object], None] | None = None,
    progress: bool = True,
    train_kwargs: dict | None = None,
    train_fn: Callable | None = None,
) -> Stage2Report:
    """Train ``cfg`` on each dataset (skipping those in ``results``) and build the Stage 2 table.

    A dataset whose files are missing is recorded in ``report.missing`` with the reason, and the
    table names it; the aggregates cover the datasets that ran. ``train_fn`` replaces
    ``loop.train_model`` (the search's tests pass a stand-in trainer).
    """
    train_fn = train_fn or loop.train_model

    done = dict(results or {})
    missing: dict[str, str] = {}
    for name in datasets:
        if name in done:
            continue
        run_cfg = RunConfig.from_dict({"dataset": name}, base=cfg)
        run_out = Path(out_dir) / name if out_dir is not None else None
        try:
            done[name] = train_fn(run_cfg, data_dir=data_dir, device=device, out_dir=run_out,
                                     progress=progress, **(train_kwargs or {}))
        except DataError as err:
            missing[name] = str(err)
            continue
        if on_dataset is not None:
            on_dataset(name, done[name])
    present = {name: done[name] for name in datasets if name in done}
    report = Stage2Report(cfg.to_dict(), {n: dataclasses.asdict(r) for n, r in present.items()},
                          missing)
    if present:
        report.table = metrics.stage2_table({n: (r.accuracy, r.lam) for n, r in present.items()},
                                            missing=list(missing))
    return report


def write_report(report: Stage2Report, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``stage2.json`` and ``stage2.md`` atomically into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = (out_dir / "stage2.json", out_dir / "stage2.md")
    for path, text in zip(paths, (report.to_json(), report.to_markdown())):
        write_text_atomic(path, text)
    return paths
