"""The gate pruner's prior: none recorded yet, so the pruner waits for the study's own curves.

benchmarks/curves_export.py --prior rewrites this module from recorded curves.
"""

PRIOR_EPOCHS = 40

PRIOR_RISE: tuple[float, ...] = ()
