"""PyTorch reference implementation of the slotjax models (for parity checks and users of torch)."""

from torch_reference.nn.models import SetPredictor, SlotAutoencoder, load_model, save_model
from torch_reference.nn.slot_attention import SlotAttention

__all__ = ["SetPredictor", "SlotAttention", "SlotAutoencoder", "load_model", "save_model"]
