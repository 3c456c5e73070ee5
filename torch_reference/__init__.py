"""PyTorch reference implementation of the slotjax models (for parity checks and users of torch)."""

from torch_reference.modules import SlotAttention

__all__ = ["SlotAttention"]
