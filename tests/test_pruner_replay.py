"""benchmarks/pruner_replay.py on hand-made curves: what its shares mean, in a real run of it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 8


def _curve(trial: int, final: float, start_s: float, epoch_s: float) -> dict:
    # A curve that rises to ``final`` by the last epoch, the way the recorded ones do.
    values = [final * (0.5 + 0.5 * e / EPOCHS) for e in range(1, EPOCHS + 1)]
    return {"trial": trial, "local_tpe": values, "time_start_s": start_s,
            "time_trial_s": start_s + EPOCHS * epoch_s}


def test_replay_counts_start_up_and_never_stops_a_passer_with_the_gate(tmp_path):
    # Three curves pass the gate (0.60), three cannot (they end far below it), and every trial
    # pays 40 s of start-up against 5 s per epoch: pruning shortens the epochs, not the start-up.
    curves = ([_curve(i, final, 40.0, 5.0) for i, final in enumerate((0.66, 0.70, 0.74))]
              + [_curve(3 + i, final, 40.0, 5.0) for i, final in enumerate((0.20, 0.22, 0.25))])
    path = tmp_path / "curves.json"
    path.write_text(json.dumps({"study": "hand-made", "epochs": EPOCHS, "curves": curves}))
    out = tmp_path / "replay.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "pruner_replay.py"), "--curves", str(path),
         "--orders", "6", "--parallel", "2", "--chosen", "gate, safety 1.0", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    rows = {row["pruner"]: row for row in result["rows"]}
    assert result["passing_curves"] == 3 and result["best_curve"] == 2
    assert rows["none"]["epochs_share"] == rows["none"]["seconds_share"] == 1.0
    gate = rows["gate, safety 1.0"]
    assert gate["chosen"] and gate["passers_kept_share"] == 1.0 and gate["best_kept_share"] == 1.0
    # The hopeless half stops early, so fewer epochs; but every trial's start-up is still paid.
    assert gate["epochs_share"] < 0.75
    start_share = 6 * 40.0 / (6 * (40.0 + EPOCHS * 5.0))
    trained_share = (gate["seconds_share"] - start_share) / (1 - start_share)
    assert abs(trained_share - gate["epochs_share"]) < 1e-3
    assert [row["pruner"] for row in result["rows"] if row["chosen"]] == ["gate, safety 1.0"]
