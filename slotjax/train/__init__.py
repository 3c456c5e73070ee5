"""Training: the steps, losses, metrics, optimiser, checkpoints, metric writers and the loops."""
