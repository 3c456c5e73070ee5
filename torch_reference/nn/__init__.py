"""PyTorch twins of `slotjax.nn`: layers, Slot Attention and the two models."""
