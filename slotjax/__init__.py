"""slotjax: Slot Attention (Locatello et al., NeurIPS 2020) in JAX / Flax NNX."""

TASKS = ("discovery", "set_prediction")  # object discovery (SlotAutoencoder), set prediction (SetPredictor)

from slotjax.nn import SetPredictor, SlotAttention, SlotAutoencoder  # noqa: E402

__all__ = ["TASKS", "SetPredictor", "SlotAttention", "SlotAutoencoder"]
