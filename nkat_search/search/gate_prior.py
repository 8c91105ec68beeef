"""The gate pruner's prior: the largest rise factor seen after each epoch.

Written by benchmarks/curves_export.py from results/curves/round2_curves.json (11 full curves of
40 epochs, pruning off); do not edit by hand. Entry e - 1 is max over the curves
of Local TPE(last epoch) / best Local TPE up to epoch e (search/gate_pruner.py).
"""

PRIOR_EPOCHS = 40

PRIOR_RISE = (
    2.4234,  # epoch 1
    1.9339,  # epoch 2
    1.7563,  # epoch 3
    1.6410,  # epoch 4
    1.5187,  # epoch 5
    1.4207,  # epoch 6
    1.3778,  # epoch 7
    1.3254,  # epoch 8
    1.2858,  # epoch 9
    1.2699,  # epoch 10
    1.2431,  # epoch 11
    1.2301,  # epoch 12
    1.1983,  # epoch 13
    1.1858,  # epoch 14
    1.1645,  # epoch 15
    1.1482,  # epoch 16
    1.1421,  # epoch 17
    1.1310,  # epoch 18
    1.1303,  # epoch 19
    1.1164,  # epoch 20
    1.1069,  # epoch 21
    1.0965,  # epoch 22
    1.0896,  # epoch 23
    1.0834,  # epoch 24
    1.0684,  # epoch 25
    1.0578,  # epoch 26
    1.0538,  # epoch 27
    1.0426,  # epoch 28
    1.0411,  # epoch 29
    1.0287,  # epoch 30
    1.0281,  # epoch 31
    1.0223,  # epoch 32
    1.0174,  # epoch 33
    1.0126,  # epoch 34
    1.0109,  # epoch 35
    1.0069,  # epoch 36
    1.0053,  # epoch 37
    1.0030,  # epoch 38
    1.0009,  # epoch 39
)
