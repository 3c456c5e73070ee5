"""The models in Flax NNX: layers, Slot Attention (Algorithm 1) and the two task models."""

from slotjax.nn.models import SetPredictor, SlotAutoencoder
from slotjax.nn.slot_attention import SlotAttention

__all__ = ["SetPredictor", "SlotAttention", "SlotAutoencoder"]
