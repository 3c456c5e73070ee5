"""Set prediction: each slot predicts an object's 19 properties; Hungarian-matched Huber loss, average precision at
distance thresholds (docs/architecture.md, docs/average_precision.md)."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from flax import nnx

from slotjax import visualize
from slotjax.data.files import most_objects
from slotjax.nn.models import SetPredictor
from slotjax.tasks.task import DataNeeds, Task
from slotjax.train import losses, metrics

OFFICIAL_RESOLUTION = 128  # not stored in the official weights: the paper's images


class SetPrediction(Task):
    name = "set_prediction"
    model_fields = ("head_hidden_size",)
    torch_model = "SetPredictor"
    datasets = ("scenes", "clevr")
    data = DataNeeds(targets=True)  # all CLEVR scenes (up to 10 objects), whole images
    tf_head = "mlp_classifier/"

    def build_model(self, config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> SetPredictor:
        return SetPredictor(**self.model_arguments(config), rngs=rngs)

    def loss(self, outputs: dict, batch: dict, config: ml_collections.ConfigDict) -> jax.Array:
        """The Hungarian-matched Huber loss, averaged over the batch."""
        return losses.hungarian_huber_loss(*matched_sets(outputs, batch))

    def scores(self, outputs: dict, batch: dict) -> dict[str, jax.Array]:
        return {"loss": losses.hungarian_huber_costs(*matched_sets(outputs, batch))}

    def pooled(self, outputs: dict, batch: dict) -> dict[str, jax.Array]:
        return {"predictions": outputs["predictions"], "targets": batch["target"]}

    def metrics(self, pooled: dict[str, np.ndarray]) -> dict[str, float]:
        return metrics.average_precision_at_thresholds(pooled["predictions"], pooled["targets"])

    def pictured(self, outputs: dict, batch: dict) -> dict[str, jax.Array]:
        return {"image": batch["image"], "predictions": outputs["predictions"], "target": batch["target"]}

    def picture(self, pictured: dict[str, np.ndarray]) -> np.ndarray:
        return visualize.set_prediction_grid(pictured["image"], pictured["predictions"], pictured["target"])

    def check_config(self, config: ml_collections.ConfigDict) -> None:
        most = most_objects(config)
        if config.num_slots < most:
            raise ValueError(
                f"num_slots={config.num_slots} is below the {most} objects a scene of {config.dataset!r} may "
                f"hold: the Hungarian matching would leave objects unmatched. Use --config.num_slots >= {most}."
            )

    def report(self, results: dict[str, float]) -> str:
        """The AP at each distance threshold, as a Markdown table."""
        names = [metrics.ap_metric_name(threshold) for threshold in metrics.AP_THRESHOLDS]
        thresholds = [str(t if t is not None else "none") for t in metrics.AP_THRESHOLDS]
        header = "| threshold | " + " | ".join(thresholds) + " |"
        values = "| AP        | " + " | ".join(f"{results[name]:.4f}" for name in names) + " |"
        return "\n".join([header, "|" + "---|" * (len(names) + 1), values])

    def tf_names(self, table, torch_names) -> None:
        table.mlp("mlp_classifier", "mlp_classifier")

    def tf_config(self, config: ml_collections.ConfigDict, variables, required, resolution: int | None) -> None:
        """The head's width; the resolution is not in the weights: the paper's 128 unless `resolution` says."""
        config.head_hidden_size = required("mlp_classifier/layer_with_weights-0/kernel", 2)[1]
        config.resolution = OFFICIAL_RESOLUTION if resolution is None else resolution


def matched_sets(outputs: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(predictions [B, K, 19], targets [B, K, 19]) for the Hungarian loss.

    Rows past the data's largest scene are padding (the config check refuses fewer slots than that), so a model with
    K < 10 slots is matched against the first K rows: the same loss without padding rows left unmatched.
    """
    predictions = outputs["predictions"]
    return predictions, batch["target"][:, : predictions.shape[1]]


SET_PREDICTION = SetPrediction()
