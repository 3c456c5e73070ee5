"""Tests for slotjax.train.metrics: ARI / FG-ARI against scikit-learn, mBO against a loop version of OCL's
definition (docs/metrics.md), AP as docs/average_precision.md defines it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from slotjax.train import metrics

# ---------------------------------------------------------------------------
# ARI / FG-ARI.
# ---------------------------------------------------------------------------


def _sklearn_ari_per_image(true_ids, pred_ids, ignore_background):
    """Reference: sklearn on each image; NaN where no pixel is counted."""
    scores = []
    for true_row, pred_row in zip(true_ids, pred_ids):
        keep = true_row != 0 if ignore_background else np.ones_like(true_row, bool)
        if keep.any():
            scores.append(adjusted_rand_score(true_row[keep], pred_row[keep]))
        else:
            scores.append(np.nan)
    return np.array(scores)


def _noisy_labelling(rng, true_ids, num_pred_ids, noise):
    """Predicted ids: a random relabelling of true_ids, with a fraction resampled."""
    relabel = rng.integers(0, num_pred_ids, size=true_ids.max() + 1)
    pred_ids = relabel[true_ids]
    resample = rng.random(true_ids.shape) < noise
    return np.where(resample, rng.integers(0, num_pred_ids, true_ids.shape), pred_ids)


@pytest.mark.parametrize("ignore_background", [False, True])
@pytest.mark.parametrize(
    "seed, num_pixels, num_true_ids, num_pred_ids",
    [(0, 10, 2, 3), (1, 64, 5, 7), (2, 300, 11, 7), (3, 1024, 4, 11)],
)
def test_ari_matches_sklearn_on_random_labellings(seed, num_pixels, num_true_ids, num_pred_ids, ignore_background):
    rng = np.random.default_rng(seed)
    batch_size = 6
    true_ids = rng.integers(0, num_true_ids, (batch_size, num_pixels))
    noise_levels = np.linspace(0.0, 1.0, batch_size)[:, None]
    pred_ids = np.concatenate(
        [_noisy_labelling(rng, row[None], num_pred_ids, noise) for row, noise in zip(true_ids, noise_levels)]
    )
    ours = metrics.adjusted_rand_index(
        jnp.asarray(true_ids), jnp.asarray(pred_ids), num_true_ids, num_pred_ids, ignore_background
    )
    expected = _sklearn_ari_per_image(true_ids, pred_ids, ignore_background)
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5)


@pytest.mark.parametrize(
    "true_row, pred_row",
    [
        ([0, 0, 0, 0], [2, 2, 2, 2]),  # both a single cluster
        ([1, 1, 1, 1], [0, 1, 2, 3]),  # one cluster vs all singletons
        ([0, 1, 2, 3], [3, 2, 1, 0]),  # all singletons in both
        ([0, 0, 1, 1, 2], [4, 4, 0, 0, 6]),  # identical up to permuted ids
        ([0, 0, 1, 1], [0, 1, 0, 1]),  # negative ARI
        ([3], [5]),  # a single pixel
    ],
)
def test_ari_edge_cases_match_sklearn(true_row, pred_row):
    ours = metrics.ari(jnp.array([true_row]), jnp.array([pred_row]), 4, 7)
    np.testing.assert_allclose(ours, [adjusted_rand_score(true_row, pred_row)], atol=1e-6)


def test_fg_ari_edge_cases():
    true_ids = jnp.array(
        [
            [0, 0, 0, 0, 0, 0],  # no foreground pixel: undefined
            [0, 0, 0, 0, 0, 2],  # a single foreground pixel
            [1, 1, 2, 2, 0, 0],  # permuted ids, background ignored
            [3, 3, 3, 0, 0, 0],  # one object, split over slots
        ]
    )
    pred_ids = jnp.array([[0, 1, 2, 3, 4, 5], [1, 1, 1, 1, 1, 1], [6, 6, 2, 2, 6, 0], [0, 0, 1, 0, 0, 0]])
    scores = np.asarray(metrics.fg_ari(true_ids, pred_ids, 4, 7))
    assert np.isnan(scores[0])
    np.testing.assert_allclose(scores[1:], [1.0, 1.0, 0.0], atol=1e-6)


def test_fg_ari_from_masks_with_more_slots_than_objects_under_jit():
    rng = np.random.default_rng(0)
    batch_size, num_slots, height, width, num_entities = 3, 11, 8, 9, 4
    segmentation = rng.integers(0, num_entities, (batch_size, height, width))
    # Slot 2 + entity id owns each pixel: a perfect segmentation with permuted ids.
    logits = 10.0 * np.eye(num_slots)[segmentation + 2]  # [B, H, W, K]
    logits += rng.normal(size=logits.shape)
    masks = jax.nn.softmax(jnp.asarray(logits).transpose(0, 3, 1, 2)[..., None], axis=1)

    fg_ari_fn = jax.jit(metrics.fg_ari_from_masks, static_argnames="num_entities")
    np.testing.assert_allclose(fg_ari_fn(segmentation, masks, num_entities=num_entities), 1.0)
    np.testing.assert_allclose(metrics.ari_from_masks(segmentation, masks, num_entities), 1.0)

    shuffled_masks = masks[:, :, ::-1]  # flip each mask horizontally
    pred_ids = np.argmax(np.asarray(shuffled_masks)[..., 0], axis=1).reshape(batch_size, -1)
    expected = _sklearn_ari_per_image(segmentation.reshape(batch_size, -1), pred_ids, True)
    np.testing.assert_allclose(
        metrics.fg_ari_from_masks(segmentation, shuffled_masks, num_entities), expected, atol=1e-5
    )


# ---------------------------------------------------------------------------
# Mean best overlap.
# ---------------------------------------------------------------------------


def _masks_from_ids(pred_ids, num_slots, rng):
    """Softmax slot masks [B, K, H, W, 1] whose argmax over slots is pred_ids [B, H, W]."""
    logits = 5.0 * np.eye(num_slots)[pred_ids] + rng.uniform(0, 1, pred_ids.shape + (num_slots,))  # [B, H, W, K]
    return jax.nn.softmax(jnp.asarray(logits).transpose(0, 3, 1, 2)[..., None], axis=1)


def _loop_mbo_per_image(segmentation, pred_ids, num_slots):
    """Reference: for each image, each non-empty object mask (id > 0) takes its best IoU over all slot masks
    (background pixels included), IoU 0 for an empty union; the mean over objects; NaN without objects."""
    scores = []
    for true_image, pred_image in zip(segmentation, pred_ids):
        best_overlaps = []
        for object_id in range(1, int(true_image.max()) + 1):
            object_mask = true_image == object_id
            if not object_mask.any():
                continue
            ious = []
            for slot in range(num_slots):
                slot_mask = pred_image == slot
                union = np.sum(object_mask | slot_mask)
                ious.append(np.sum(object_mask & slot_mask) / union if union else 0.0)
            best_overlaps.append(max(ious))
        scores.append(np.mean(best_overlaps) if best_overlaps else np.nan)
    return np.array(scores)


@pytest.mark.parametrize(
    "seed, height, width, num_entities, num_slots",
    [(0, 4, 5, 3, 2), (1, 8, 8, 6, 7), (2, 12, 9, 11, 4), (3, 16, 16, 4, 11)],
)
def test_mbo_matches_a_loop_version_on_random_segmentations(seed, height, width, num_entities, num_slots):
    rng = np.random.default_rng(seed)
    batch_size = 6
    segmentation = rng.integers(0, num_entities, (batch_size, height, width))
    segmentation[0] = 0  # an image without objects
    segmentation[1] = np.where(segmentation[1] == 1, 2, segmentation[1])  # an id absent between present ones
    noise_levels = np.linspace(0.0, 1.0, batch_size)
    pred_ids = np.stack(
        [_noisy_labelling(rng, image, num_slots, noise) for image, noise in zip(segmentation, noise_levels)]
    )
    masks = _masks_from_ids(pred_ids, num_slots, rng)

    mbo_fn = jax.jit(metrics.mbo_from_masks, static_argnames="num_entities")
    scores = np.asarray(mbo_fn(jnp.asarray(segmentation), masks, num_entities=num_entities))
    expected = _loop_mbo_per_image(segmentation, pred_ids, num_slots)
    assert scores.shape == (batch_size,) and np.isnan(scores[0])
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    # The mean over a data set skips the images without objects.
    np.testing.assert_allclose(np.nanmean(scores), np.mean(expected[1:]), atol=1e-6)


def test_mbo_edge_cases():
    segmentation = np.array(
        [
            [[0, 0, 0], [0, 1, 1], [0, 0, 0]],  # one object, found exactly
            [[1, 1, 0], [2, 2, 0], [0, 0, 0]],  # two objects, one slot covering everything
            [[1, 1, 0], [2, 2, 0], [0, 0, 0]],  # slot 0 holds both objects and nothing else; slot 2 empty
            [[0, 0, 0], [0, 0, 0], [0, 0, 0]],  # no object
            [[3, 3, 3], [3, 3, 3], [3, 3, 3]],  # an object covering the whole image, split over two slots
        ]
    )
    pred_ids = np.array(
        [
            [[0, 0, 0], [0, 1, 1], [0, 0, 0]],
            [[1, 1, 1], [1, 1, 1], [1, 1, 1]],
            [[0, 0, 1], [0, 0, 1], [1, 1, 1]],
            [[0, 1, 2], [0, 1, 2], [0, 1, 2]],
            [[0, 0, 0], [0, 0, 0], [1, 1, 1]],
        ]
    )
    num_slots = 3
    scores = np.asarray(
        metrics.mbo_from_masks(
            jnp.asarray(segmentation), _masks_from_ids(pred_ids, num_slots, np.random.default_rng(0)), 4
        )
    )
    expected = [1.0, 2 / 9, 0.5, np.nan, 6 / 9]
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    np.testing.assert_allclose(scores, _loop_mbo_per_image(segmentation, pred_ids, num_slots), atol=1e-6)
    # An empty slot changes nothing: the same ids with two more slots that never win a pixel.
    more_slots = metrics.mbo_from_masks(
        jnp.asarray(segmentation), _masks_from_ids(pred_ids, num_slots + 2, np.random.default_rng(1)), 4
    )
    np.testing.assert_allclose(more_slots, expected, atol=1e-6)


def test_metrics_worked_example():
    """The 4x4 example worked through in docs/metrics.md: two objects, three slots."""
    segmentation = np.array([[[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 2, 2], [0, 0, 2, 0]]])
    pred_ids = np.array([[[0, 0, 2, 2], [0, 1, 2, 2], [2, 2, 1, 1], [2, 2, 1, 1]]])  # slots 1, 2, 3 of the docs
    masks = _masks_from_ids(pred_ids, 3, np.random.default_rng(0))
    np.testing.assert_allclose(metrics.mbo_from_masks(jnp.asarray(segmentation), masks, 3), [0.675], atol=1e-6)
    np.testing.assert_allclose(metrics.fg_ari_from_masks(jnp.asarray(segmentation), masks, 3), [5 / 12], atol=1e-6)
    np.testing.assert_allclose(metrics.ari_from_masks(jnp.asarray(segmentation), masks, 3), [0.674208], atol=1e-6)


# ---------------------------------------------------------------------------
# Average precision.
# ---------------------------------------------------------------------------


def _encode_object(coords, size, material, shape, colour, present=1.0):
    """The 19-value encoding (docs/target_encoding.md) from scene coordinates and class indices."""
    return np.concatenate(
        [
            (np.asarray(coords, float) + 3.0) / 6.0,
            np.eye(2)[size],
            np.eye(2)[material],
            np.eye(3)[shape],
            np.eye(8)[colour],
            [present],
        ]
    )


def test_average_precision_worked_example():
    """The example worked through in docs/average_precision.md."""
    object_a = ((0.0, 0.0, 0.35), 0, 0, 0, 0)
    object_b = ((1.0, -1.0, 0.7), 1, 1, 1, 1)
    object_c = ((2.0, 2.0, 0.35), 0, 1, 2, 7)
    padding = np.zeros(19)
    targets = np.stack(
        [
            [_encode_object(*object_a), _encode_object(*object_b), padding],
            [_encode_object(*object_c), padding, padding],
        ]
    )

    def shifted(obj, offset, score):
        coords, *attributes = obj
        return _encode_object(np.add(coords, offset), *attributes, present=score)

    predictions = np.stack(
        [
            [
                shifted(object_a, (0.1, 0, 0), 0.9),
                shifted(object_a, (0.3, 0, 0), 0.8),
                shifted(object_b, (0.6, 0, 0), 0.4),
            ],
            [
                shifted(object_c, (0, 0.2, 0), 0.7),
                _encode_object(object_c[0], 1, 0, 0, 0, present=0.6),  # wrong attributes
                shifted(object_c, (0, 0, 0), 0.1),
            ],
        ]
    )
    expected = {
        "ap_inf": 0.755556,
        "ap_1": 0.755556,
        "ap_0.5": 0.555556,
        "ap_0.25": 0.555556,
        "ap_0.125": 0.444444,
    }
    results = metrics.average_precision_at_thresholds(predictions, targets)
    assert list(results) == list(expected)
    for name, value in expected.items():
        assert results[name] == pytest.approx(value, abs=1e-6), name
    for threshold in metrics.AP_THRESHOLDS:
        name = metrics.ap_metric_name(threshold)
        assert metrics.average_precision(predictions, targets, threshold) == results[name]


def _brute_force_average_precision(predictions, targets, distance_threshold, stable_ranking=False):
    """Loop version of the AP of docs/average_precision.md: pooled predictions ranked by np.argsort(scores)[::-1]
    (or, to show that the ranking matters, by a stable descending sort), greedy claiming, then VOC all-point area."""
    num_images, num_slots, _ = predictions.shape
    attribute_bounds = [(3, 5), (5, 7), (7, 10), (10, 18)]

    def attributes(obj):
        return [int(np.argmax(obj[lo:hi])) for lo, hi in attribute_bounds]

    scores = predictions[:, :, 18].reshape(-1)
    order = np.argsort(-scores, kind="stable") if stable_ranking else np.argsort(scores)[::-1]
    ranked = [divmod(int(index), num_slots) for index in order]  # (image, slot)
    claimed = set()
    outcomes = []
    for image, slot in ranked:
        prediction = predictions[image, slot]
        best_target, best_distance = None, None
        for index, target in enumerate(targets[image]):
            if target[18] != 1 or attributes(target) != attributes(prediction):
                continue
            distance = 6.0 * np.sqrt(np.sum((target[:3] - prediction[:3]) ** 2))
            if best_distance is None or distance < best_distance:
                best_target, best_distance = index, distance
        within = best_target is not None and (distance_threshold is None or best_distance < distance_threshold)
        is_hit = within and (image, best_target) not in claimed
        if is_hit:
            claimed.add((image, best_target))
        outcomes.append(is_hit)

    num_targets = int(targets[..., 18].sum())
    recalls, precisions, hits = [0.0], [0.0], 0
    for rank, is_hit in enumerate(outcomes, start=1):
        hits += is_hit
        recalls.append(hits / num_targets)
        precisions.append(hits / rank)
    recalls.append(1.0)
    precisions.append(0.0)
    area = 0.0
    for i in range(len(recalls) - 2, -1, -1):
        precisions[i] = max(precisions[i], precisions[i + 1])
    for i in range(len(recalls) - 1):
        area += (recalls[i + 1] - recalls[i]) * precisions[i + 1]
    return area


def _random_scene_sets(rng, num_images, num_slots, max_objects):
    """Targets with few attribute classes and predictions near them, tied scores."""
    targets = np.zeros((num_images, max_objects, 19))
    predictions = np.zeros((num_images, num_slots, 19))
    for image in range(num_images):
        num_objects = rng.integers(0 if image else 1, max_objects + 1)
        objects = [
            _encode_object(rng.uniform(-3, 3, 3), rng.integers(2), rng.integers(2), rng.integers(2), rng.integers(2))
            for _ in range(num_objects)
        ]
        targets[image, :num_objects] = np.reshape(objects, (num_objects, 19))
        for slot in range(num_slots):
            if objects and rng.random() < 0.7:
                guess = objects[rng.integers(num_objects)].copy()
                guess[:3] += rng.normal(scale=rng.choice([0.01, 0.05, 0.15]), size=3)
                if rng.random() < 0.2:
                    guess[3:18] = rng.random(15)  # scramble the attributes
            else:
                guess = rng.random(19)
            guess[18] = rng.choice([0.2, 0.5, 0.9])  # few distinct scores: many ties
            predictions[image, slot] = guess
    return predictions, targets


@pytest.mark.parametrize("seed", range(6))
def test_average_precision_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    predictions, targets = _random_scene_sets(
        rng, num_images=int(rng.integers(1, 6)), num_slots=int(rng.integers(2, 8)), max_objects=4
    )
    results = metrics.average_precision_at_thresholds(predictions, targets)
    for threshold in metrics.AP_THRESHOLDS:
        expected = _brute_force_average_precision(predictions, targets, threshold)
        assert results[metrics.ap_metric_name(threshold)] == pytest.approx(expected, abs=1e-12)


def test_average_precision_ranks_tied_scores_as_the_official_evaluation():
    """Equal confidences (saturated sigmoids): the official np.argsort(scores)[::-1] does not rank them in slot order
    (a sort leaves equal keys where they are, and the reversal puts the last first), and which tied prediction
    claims a target first changes the AP."""
    target = ((0.0, 0.0, 0.35), 0, 1, 2, 3)
    other = ((-2.0, 1.0, 0.7), 1, 0, 1, 5)
    targets = np.stack([[_encode_object(*target), np.zeros(19)], [_encode_object(*other), np.zeros(19)]])
    predictions = np.stack(
        [
            [_encode_object((0.1, 0.0, 0.35), 0, 1, 2, 3), _encode_object((0.4, 0.0, 0.35), 0, 1, 2, 3)],  # near, far
            [
                _encode_object((-2.0, 1.2, 0.7), 1, 0, 1, 5),
                _encode_object((-2.0, 1.0, 0.7), 0, 0, 1, 5),
            ],  # hit, wrong size
        ]
    ).astype(np.float32)  # all confidences 1; float32 as the model's outputs, which the official code sorts
    results = metrics.average_precision_at_thresholds(predictions, targets)
    for threshold in metrics.AP_THRESHOLDS:
        expected = _brute_force_average_precision(predictions, targets, threshold)
        assert results[metrics.ap_metric_name(threshold)] == pytest.approx(expected, abs=1e-12), threshold
    stable = _brute_force_average_precision(predictions, targets, 0.25, stable_ranking=True)
    assert results["ap_0.25"] != pytest.approx(stable)  # the example tells the two rankings apart


def test_average_precision_without_targets_is_nan():
    predictions = np.random.default_rng(0).random((2, 3, 19))
    assert np.isnan(metrics.average_precision(predictions, np.zeros((2, 4, 19)), None))
