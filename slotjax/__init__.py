"""slotjax: Slot Attention (Locatello et al., NeurIPS 2020) in JAX / Flax NNX."""

from slotjax.modules import SlotAttention

__all__ = ["SlotAttention"]
