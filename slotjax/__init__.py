"""slotjax: Slot Attention (Locatello et al., NeurIPS 2020) in JAX / Flax NNX."""

from slotjax.models import SetPredictor, SlotAutoencoder
from slotjax.modules import SlotAttention

__all__ = ["SetPredictor", "SlotAttention", "SlotAutoencoder"]
