"""PyTorch reference implementation of the slotjax models (for parity checks and users of torch)."""

from torch_reference.nn.models import SetPredictor, SlotAutoencoder
from torch_reference.nn.slot_attention import SlotAttention
from torch_reference.weights import load_model, save_model

__all__ = ["SetPredictor", "SlotAttention", "SlotAutoencoder", "load_model", "save_model"]
