"""Evaluation metrics: (foreground) adjusted Rand index, mean best overlap, and set-prediction AP.

ARI / FG-ARI and mBO (object discovery) are computed in JAX, batched and
jit-able, from one-hot contingency tables; docs/metrics.md defines them.
Conventions for ARI (scikit-learn's `adjusted_rand_score` is the reference):

* The score is 1.0 whenever the two clusterings agree on every pair of
  pixels, which covers identical labellings up to a permutation of ids, both
  labellings being a single cluster, and images with a single counted pixel.
* An image with no counted pixel at all (for FG-ARI: no foreground pixel)
  has no defined score and gets NaN, as does an image without objects for
  mBO.  The mean over a data set skips those images (`jnp.nanmean`).

Average precision (set prediction) follows the official CLEVR evaluation
(docs/average_precision.md), down to its ranking of tied confidences
(`official_ranking`), and runs on the host in NumPy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from slotjax.data import encoding

# ---------------------------------------------------------------------------
# Adjusted Rand index.
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("num_true_ids", "num_pred_ids", "ignore_background"))
def adjusted_rand_index(
    true_ids: jax.Array,
    pred_ids: jax.Array,
    num_true_ids: int,
    num_pred_ids: int,
    ignore_background: bool = False,
) -> jax.Array:
    """Adjusted Rand index per image.

    Args:
      true_ids: int [B, ...], ground-truth entity id of every pixel, in
        [0, num_true_ids); 0 is the background.
      pred_ids: int [B, ...] (same shape), predicted cluster (slot) of every
        pixel, in [0, num_pred_ids).
      num_true_ids: static number of possible ground-truth ids.
      num_pred_ids: static number of possible predicted ids (slots).
      ignore_background: if True, pixels whose true id is 0 are ignored
        (FG-ARI).

    Returns:
      float32 [B]: ARI per image; NaN for an image with no counted pixel.
    """
    batch_size = true_ids.shape[0]
    true_ids = true_ids.reshape(batch_size, -1)  # [B, N]
    pred_ids = pred_ids.reshape(batch_size, -1)  # [B, N]
    true_onehot = jax.nn.one_hot(true_ids, num_true_ids)  # [B, N, T]
    if ignore_background:
        true_onehot = true_onehot[..., 1:]  # background pixels become all-zero rows
    pred_onehot = jax.nn.one_hot(pred_ids, num_pred_ids)  # [B, N, P]

    contingency = jnp.einsum("bnt,bnp->btp", true_onehot, pred_onehot)  # [B, T, P]
    true_sizes = contingency.sum(axis=2)  # [B, T]
    pred_sizes = contingency.sum(axis=1)  # [B, P]
    num_pixels = true_sizes.sum(axis=1)  # [B]

    # Ordered pairs of distinct pixels in the same cluster, in both / each labelling.
    pairs_together_in_both = jnp.sum(contingency * (contingency - 1), axis=(1, 2))
    pairs_together_in_true = jnp.sum(true_sizes * (true_sizes - 1), axis=1)
    pairs_together_in_pred = jnp.sum(pred_sizes * (pred_sizes - 1), axis=1)
    num_pairs = num_pixels * (num_pixels - 1)

    expected_index = pairs_together_in_true * pairs_together_in_pred / jnp.maximum(num_pairs, 1)
    max_index = (pairs_together_in_true + pairs_together_in_pred) / 2
    denominator = max_index - expected_index
    # Every pair treated alike by both labellings; the only case where the
    # denominator can be 0 (sklearn returns 1.0 there).
    full_agreement = (pairs_together_in_both == pairs_together_in_true) & (
        pairs_together_in_both == pairs_together_in_pred
    )
    ari_values = (pairs_together_in_both - expected_index) / jnp.where(full_agreement, 1.0, denominator)
    ari_values = jnp.where(full_agreement, 1.0, ari_values)
    return jnp.where(num_pixels > 0, ari_values, jnp.nan)


def ari(true_ids: jax.Array, pred_ids: jax.Array, num_true_ids: int, num_pred_ids: int) -> jax.Array:
    """ARI over all pixels, per image [B] (see `adjusted_rand_index`)."""
    return adjusted_rand_index(true_ids, pred_ids, num_true_ids, num_pred_ids)


def fg_ari(true_ids: jax.Array, pred_ids: jax.Array, num_true_ids: int, num_pred_ids: int) -> jax.Array:
    """Foreground ARI (true id 0 ignored), per image [B]; NaN without foreground."""
    return adjusted_rand_index(true_ids, pred_ids, num_true_ids, num_pred_ids, ignore_background=True)


def masks_to_ids(masks: jax.Array) -> jax.Array:
    """Slot masks [B, K, H, W, 1] -> int [B, H, W], the argmax slot per pixel."""
    return jnp.argmax(masks[..., 0], axis=1)


def ari_from_masks(segmentation: jax.Array, masks: jax.Array, num_entities: int) -> jax.Array:
    """ARI per image [B] of the model masks against the ground truth.

    Args:
      segmentation: int [B, H, W], entity id per pixel in [0, num_entities).
      masks: [B, K, H, W, 1], per-slot masks (softmax over slots).
      num_entities: static number of ground-truth ids, background included.
    """
    return ari(segmentation, masks_to_ids(masks), num_entities, masks.shape[1])


def fg_ari_from_masks(segmentation: jax.Array, masks: jax.Array, num_entities: int) -> jax.Array:
    """FG-ARI per image [B] of the model masks; arguments as `ari_from_masks`."""
    return fg_ari(segmentation, masks_to_ids(masks), num_entities, masks.shape[1])


# ---------------------------------------------------------------------------
# Mean best overlap.
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("num_true_ids", "num_pred_ids"))
def mean_best_overlap(true_ids: jax.Array, pred_ids: jax.Array, num_true_ids: int, num_pred_ids: int) -> jax.Array:
    """Mean best overlap (mBO) per image, as OCL's `UnsupervisedMaskIoUMetric(matching="best_overlap",
    ignore_background=True)`: each ground-truth object takes its best IoU over the predicted clusters (a cluster
    may serve several objects), averaged over the objects present.

    The background (true id 0) is no target, but its pixels stay in the predicted clusters, so a slot that
    spills onto the background loses IoU.  Ids absent from an image are no objects; IoU is 0 where the union is
    empty.

    Args:
      true_ids: int [B, ...], ground-truth entity id of every pixel, in [0, num_true_ids); 0 is the background.
      pred_ids: int [B, ...] (same shape), predicted cluster (slot) of every pixel, in [0, num_pred_ids).
      num_true_ids: static number of possible ground-truth ids, background included.
      num_pred_ids: static number of possible predicted ids (slots).

    Returns:
      float32 [B]: mBO per image; NaN for an image without objects.
    """
    batch_size = true_ids.shape[0]
    object_onehot = jax.nn.one_hot(true_ids.reshape(batch_size, -1), num_true_ids)[..., 1:]  # [B, N, T-1]
    pred_onehot = jax.nn.one_hot(pred_ids.reshape(batch_size, -1), num_pred_ids)  # [B, N, P]

    intersection = jnp.einsum("bnt,bnp->btp", object_onehot, pred_onehot)  # [B, T-1, P]
    object_sizes = object_onehot.sum(axis=1)  # [B, T-1]
    pred_sizes = pred_onehot.sum(axis=1)  # [B, P]
    union = object_sizes[:, :, None] + pred_sizes[:, None, :] - intersection  # [B, T-1, P]
    iou = jnp.where(union > 0, intersection / jnp.maximum(union, 1), 0.0)
    best_overlap = iou.max(axis=2)  # [B, T-1]

    is_object = object_sizes > 0  # [B, T-1]
    num_objects = is_object.sum(axis=1)  # [B]
    total = jnp.where(is_object, best_overlap, 0.0).sum(axis=1)
    return jnp.where(num_objects > 0, total / jnp.maximum(num_objects, 1), jnp.nan)


def mbo_from_masks(segmentation: jax.Array, masks: jax.Array, num_entities: int) -> jax.Array:
    """mBO per image [B] of the model masks (argmax over slots); arguments as `ari_from_masks`; NaN for an image
    without objects."""
    return mean_best_overlap(segmentation, masks_to_ids(masks), num_entities, masks.shape[1])


# ---------------------------------------------------------------------------
# Set prediction: average precision at a distance threshold.
# ---------------------------------------------------------------------------

# Distance thresholds in scene units; None means no threshold.
AP_THRESHOLDS = (None, 1.0, 0.5, 0.25, 0.125)


def ap_metric_name(distance_threshold: float | None) -> str:
    """Metric name for a threshold: None -> 'ap_inf', 0.5 -> 'ap_0.5'."""
    return "ap_inf" if distance_threshold is None else f"ap_{distance_threshold:g}"


def official_ranking(scores: np.ndarray) -> np.ndarray:
    """Indices of the flattened (image-major) scores, highest first, with ties ranked as the official evaluation
    ranks them: `np.argsort(scores)[::-1]`, NumPy's default (quick/introsort) order reversed.

    Tied confidences are common (saturated sigmoids), and which of two tied
    predictions claims a target first changes the AP, so a stable descending
    sort would give other numbers than the paper's code. The scores are sorted
    in the dtype given (the official code sorts the model's float32 outputs).
    """
    return np.argsort(np.asarray(scores).reshape(-1))[::-1]


def _nearest_matching_targets(
    predictions: np.ndarray, targets: np.ndarray, order: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ranks all predictions in `order` and finds each one's nearest same-attribute target.

    Returns, for the predictions in `order` (`official_ranking` of the present
    scores), three arrays of length B*K: image index; index of the nearest
    real target of that image with equal attributes (-1 if none; first index
    wins distance ties); its distance in scene units (inf if none).
    """
    batch_size, num_slots, _ = predictions.shape
    # Pairwise [B, K, M] attribute agreement and distance.
    same_attributes = np.all(
        encoding.decode_attributes(predictions)[:, :, None] == encoding.decode_attributes(targets)[:, None],
        axis=-1,
    )
    is_real_target = encoding.is_present(targets)[:, None, :]  # [B, 1, M]
    offsets = targets[:, None, :, encoding.COORDINATES] - predictions[:, :, None, encoding.COORDINATES]
    distances = np.linalg.norm(offsets * encoding.COORDINATE_SCALE, axis=-1)  # [B, K, M]
    distances = np.where(same_attributes & is_real_target, distances, np.inf)

    nearest = distances.argmin(axis=-1)  # [B, K]
    nearest_distance = np.take_along_axis(distances, nearest[..., None], -1)[..., 0]
    nearest = np.where(np.isfinite(nearest_distance), nearest, -1)

    image_index = np.repeat(np.arange(batch_size), num_slots)
    return (
        image_index[order],
        nearest.reshape(-1)[order],
        nearest_distance.reshape(-1)[order],
    )


def _voc_average_precision(is_true_positive: np.ndarray, num_targets: int) -> float:
    """All-point interpolated AP of a ranked list of TP (True) / FP (False)."""
    cumulative_tp = np.cumsum(is_true_positive)
    cumulative_fp = np.cumsum(~is_true_positive)
    recall = np.concatenate([[0.0], cumulative_tp / num_targets, [1.0]])
    precision = np.concatenate([[0.0], cumulative_tp / (cumulative_tp + cumulative_fp), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # monotone from the right
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def _true_positives(
    image_index: np.ndarray,
    nearest: np.ndarray,
    nearest_distance: np.ndarray,
    distance_threshold: float | None,
) -> np.ndarray:
    """bool [B*K], ranked: which predictions are true positives at a threshold.

    A prediction is a candidate if it has a nearest matching target within
    the threshold; it is a true positive if no higher-ranked candidate has
    already claimed that same target.
    """
    threshold = np.inf if distance_threshold is None else distance_threshold
    candidate_ranks = np.flatnonzero((nearest >= 0) & (nearest_distance < threshold))
    claimed_targets = np.stack([image_index, nearest], axis=1)[candidate_ranks]
    _, first_claims = np.unique(claimed_targets, axis=0, return_index=True)
    is_true_positive = np.zeros(len(nearest), dtype=bool)
    is_true_positive[candidate_ranks[first_claims]] = True
    return is_true_positive


def average_precision(predictions: np.ndarray, targets: np.ndarray, distance_threshold: float | None) -> float:
    """CLEVR set-prediction average precision at one distance threshold.

    Args:
      predictions: [B, K, 19] predicted objects (`slotjax.data.encoding`);
        index 18 is the confidence used for ranking (`official_ranking`: ties
        ranked as the official evaluation ranks them).
      targets: [B, M, 19] target objects; rows with target[..., 18] == 0 are
        padding.
      distance_threshold: maximum distance in scene units (exclusive), or None
        for no distance constraint.

    Returns:
      AP in [0, 1]; NaN if there is no real target.

    Raises:
      ValueError: arrays that are not [B, *, 19] with the same B; TypeError: a threshold that is no number.
    """
    return average_precision_at_thresholds(predictions, targets, (distance_threshold,))[
        ap_metric_name(distance_threshold)
    ]


def average_precision_at_thresholds(
    predictions: np.ndarray,
    targets: np.ndarray,
    distance_thresholds=AP_THRESHOLDS,
) -> dict[str, float]:
    """AP at several thresholds: {'ap_inf': ..., 'ap_1': ..., ...}.

    Arrays as in `average_precision`; the matching is computed once.
    """
    predictions, targets = np.asarray(predictions), np.asarray(targets, dtype=np.float64)
    size = encoding.OBJECT_SIZE
    for name, array in (("predictions", predictions), ("targets", targets)):
        if array.ndim != 3 or array.shape[-1] != size:
            raise ValueError(f"{name} have shape {array.shape}; expected [batch, objects, {size}].")
    order = official_ranking(predictions[..., encoding.PRESENT])  # before the cast: ties are ranked in the given dtype
    predictions = predictions.astype(np.float64)
    if predictions.shape[0] != targets.shape[0]:
        raise ValueError(f"predictions have {predictions.shape[0]} images but targets {targets.shape[0]}.")
    for threshold in distance_thresholds:
        is_number = isinstance(threshold, (int, float, np.integer, np.floating)) and not isinstance(threshold, bool)
        if threshold is not None and not is_number:
            raise TypeError(f"distance threshold {threshold!r} is not a number or None.")
    num_targets = int(np.sum(encoding.is_present(targets)))
    if num_targets == 0:
        return {ap_metric_name(threshold): float("nan") for threshold in distance_thresholds}
    ranked_matches = _nearest_matching_targets(predictions, targets, order)
    results = {}
    for threshold in distance_thresholds:
        is_true_positive = _true_positives(*ranked_matches, threshold)
        results[ap_metric_name(threshold)] = _voc_average_precision(is_true_positive, num_targets)
    return results
