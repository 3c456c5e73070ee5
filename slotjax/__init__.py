"""slotjax: Slot Attention (Locatello et al., NeurIPS 2020) in JAX / Flax NNX."""

from slotjax.nn import SetPredictor, SlotAttention, SlotAutoencoder
from slotjax.tasks import TASKS  # object discovery (SlotAutoencoder), set prediction (SetPredictor), by name

__all__ = ["TASKS", "SetPredictor", "SlotAttention", "SlotAutoencoder"]
