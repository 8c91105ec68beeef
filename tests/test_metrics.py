"""Metrics against hand-computed values (arithmetic written out beside each expectation)."""

import math

import pytest

from nkat_search.train import metrics


def test_tpe_at_lambda_nine_is_the_accuracy():
    # log10(1 + 9) = 1, so TPE = accuracy / 1.
    assert metrics.tpe(0.75, 9.0) == pytest.approx(0.75)


def test_tpe_of_the_baseline_sized_model():
    # lambda 12.55: log10(13.55) = 1.131939...; 0.753 / 1.131939 = 0.665230...
    assert metrics.tpe(0.753, 12.55) == pytest.approx(0.753 / math.log10(13.55))
    assert metrics.tpe(0.753, 12.55) == pytest.approx(0.66523, abs=1e-5)


def test_global_tpe_uses_mean_accuracy_over_log_of_mean_lambda():
    # mean acc = (0.9 + 0.5) / 2 = 0.7; mean lambda = (1 + 3) / 2 = 2; log10(3) = 0.4771213
    # 0.7 / 0.4771213 = 1.467132
    assert metrics.global_tpe([0.9, 0.5], [1.0, 3.0]) == pytest.approx(1.467132, abs=1e-6)


def test_consistency_and_robustness_that_pass():
    tpes = [0.99, 0.90, 0.80, 0.70]
    # mean = 3.39 / 4 = 0.8475; deviations 0.1425, 0.0525, -0.0475, -0.1475
    # squares 0.02030625 + 0.00275625 + 0.00225625 + 0.02175625 = 0.047075; / 4 = 0.01176875
    # std = sqrt(0.01176875) = 0.1084839; consistency = 1 - 0.1084839 / 0.8475 = 0.8719954
    assert metrics.consistency(tpes) == pytest.approx(0.8719954, abs=1e-6)
    # robustness = 0.70 / 0.8475 = 0.8259587
    assert metrics.robustness(tpes) == pytest.approx(0.8259587, abs=1e-6)


def test_consistency_and_robustness_that_fail_their_targets():
    tpes = [1.0, 0.2]
    # mean 0.6, population std 0.4: consistency = 1 - 0.4 / 0.6 = 1/3; robustness = 0.2 / 0.6 = 1/3
    assert metrics.consistency(tpes) == pytest.approx(1 / 3)
    assert metrics.robustness(tpes) == pytest.approx(1 / 3)
    table = metrics.stage2_table({"mnist": (1.0, 9.0), "cifar10": (0.2, 9.0)})
    assert not table.checks["consistency"]["passed"]
    assert not table.checks["robustness"]["passed"]
    assert not table.passed


def test_stage2_table_pass_fail_against_the_users_targets():
    lam = 9.0  # log10(10) = 1, so every TPE equals its accuracy
    table = metrics.stage2_table({"mnist": (0.99, lam), "fashion_mnist": (0.90, lam),
                                  "emnist": (0.80, lam), "cifar10": (0.70, lam)})
    # global = mean acc 0.8475 / log10(1 + 9) = 0.8475
    assert table.global_tpe == pytest.approx(0.8475)
    assert table.checks["global_tpe"]["passed"]
    assert table.checks["local_tpe_cifar10"]["value"] == pytest.approx(0.70)
    assert all(row.passed for row in table.rows)
    assert table.passed
    markdown = table.to_markdown()
    assert "| cifar10 | 0.7000 | 9.0000 | 0.7000 |" in markdown


def test_a_missing_dataset_is_named_and_fails_the_table():
    table = metrics.stage2_table({"mnist": (0.99, 9.0), "cifar10": (0.80, 9.0)}, missing=["emnist"])
    assert table.missing == ["emnist"]
    assert not table.passed
    assert "emnist | missing" in table.to_markdown()


def test_accuracy_needed_for_the_gate():
    # 0.60 * log10(1 + 12.55) = 0.60 * 1.131939 = 0.679164
    assert metrics.accuracy_for_tpe(0.60, 12.55) == pytest.approx(0.679164, abs=1e-6)
