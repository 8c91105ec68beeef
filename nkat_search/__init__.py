"""nkat-search: Optuna search service for the NKAT vision transformer."""
