"""slotjax: Slot Attention (Locatello et al., NeurIPS 2020) in JAX / Flax NNX."""

from slotjax.nn import SetPredictor, SlotAttention, SlotAutoencoder
from slotjax.pretrained import load, predict, read_images  # a trained model on a user's own images
from slotjax.tasks import TASKS  # object discovery (SlotAutoencoder), set prediction (SetPredictor), by name

__all__ = ["TASKS", "SetPredictor", "SlotAttention", "SlotAutoencoder", "load", "predict", "read_images"]
