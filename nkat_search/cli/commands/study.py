"""``nkat-search study create|show``: the coordinator, and a look at a study's file and counts."""

from __future__ import annotations

import argparse
import json

from nkat_search.cli.commands.storage_arg import add_storage_argument, resolve_storage
from nkat_search.search.spec import check_study_name, load_study_file
from nkat_search.search.storage_url import mask_url

HELP = ("Create a study from a study file (or resume it: same name and same file), storing the "
        "file in the study so workers rebuild the same sampler and pruner; or show a study's "
        "stored file and its trial counts.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # The actions' help reads as the command's (main.py's HelpFormatter).
    formatter = parser.formatter_class
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    create = sub.add_parser("create", help="create or resume a study from a study file",
                            formatter_class=formatter)
    create.add_argument("--study", required=True, metavar="FILE", help="study file (YAML)")
    add_storage_argument(create)
    create.add_argument("--name", metavar="NAME", help="study name (default: the file's name)")
    create.add_argument("--n-trials", type=int, metavar="N",
                        help="the study's budget (default: the file's n_trials); a resumed "
                        "study may be extended so, or by a changed n_trials in the file")
    show = sub.add_parser("show", help="print a study's stored file and its trial counts",
                          formatter_class=formatter)
    show.add_argument("--study", required=True, metavar="NAME", help="study name")
    add_storage_argument(show)
    show.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    import optuna  # here and in _create, _show: not for --help

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return _create(args) if args.action == "create" else _show(args)


def _create(args: argparse.Namespace) -> int:
    from nkat_search.search.coordinator import budget_state, create_study
    from nkat_search.search.report import budget_text
    from nkat_search.search.storage import open_storage

    spec = load_study_file(args.study)
    if args.name is not None:
        check_study_name(args.name, "--name")  # before the storage: a SQLite file is made on open
    url = resolve_storage(args.storage, args.name or spec.name)
    study, created, previous = create_study(spec, open_storage(url), args.name, args.n_trials)
    state = budget_state(study)
    verb = "created" if created else "resumed"
    change = ""
    if previous is not None and previous != state["budget"]:
        change = f" ({'raised' if state['budget'] > previous else 'lowered'} from {previous})"
    print(f"{verb} study '{study.study_name}' in {mask_url(url)}: file {spec.file_name} "
          f"(sha256 {spec.file_hash[:12]}), budget {state['budget']} trials{change}, "
          f"{budget_text(state)}; {len(spec.enqueue) if created else 0} enqueued now")
    return 0


def _show(args: argparse.Namespace) -> int:
    from nkat_search.search.coordinator import load_study, load_study_spec_from_storage, summary
    from nkat_search.search.report import budget_text, describe_lost, open_storage_for_reading

    storage = open_storage_for_reading(resolve_storage(args.storage, args.study))
    spec = load_study_spec_from_storage(storage, args.study)
    info = summary(load_study(storage, args.study, spec), spec)
    if args.json:
        print(json.dumps({"study": args.study, "file_hash": spec.file_hash,
                          "search_hash": spec.search_hash, "file_name": spec.file_name,
                          "file": spec.text, **info}, indent=2))
        return 0
    print(f"# study '{args.study}' (file {spec.file_name}, sha256 {spec.file_hash[:12]})")
    print(spec.text.rstrip())
    print()
    print(f"budget: {budget_text(info)}, {info['retries']} retries")
    if info["lost"]:
        print(describe_lost(info["lost"]))
    print("states: " + (", ".join(f"{k} {v}" for k, v in sorted(info["states"].items())) or "none"))
    print("outcomes: " + (", ".join(f"{k} {v}" for k, v in sorted(info["outcomes"].items()))
                          or "none"))
    best = info["best"]
    if best:
        note = "" if best["feasible"] else "; no complete trial meets the constraints yet"
        print(f"best: trial {best['number']} global_tpe {best['global_tpe']:.4f} "
              f"(consistency {_num(best['consistency'])}, robustness {_num(best['robustness'])}"
              f"{note})")
    return 0


def _num(value) -> str:
    return "-" if value is None else f"{value:.4f}"
