"""PyTorch twins of `slotjax.train`'s losses and optimiser."""
