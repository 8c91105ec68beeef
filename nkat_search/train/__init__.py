"""Training: the model, data, augmentation, the loop, metrics, Stage 2. Knows nothing of Optuna."""
