"""slotjax: Slot Attention (Locatello et al., NeurIPS 2020) in JAX / Flax NNX."""

__all__ = ["SetPredictor", "SlotAttention", "SlotAutoencoder"]
_HOMES = {"SetPredictor": "models", "SlotAutoencoder": "models", "SlotAttention": "modules"}


def __getattr__(name: str):
    """The models load on first use, so that `slotjax.configs` and `slotjax.huge_pages` import without JAX."""
    if name not in _HOMES:
        raise AttributeError(f"module 'slotjax' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"slotjax.{_HOMES[name]}"), name)
