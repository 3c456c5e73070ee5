"""Slot Attention's variants (docs/variants.md): their neutral settings are Algorithm 1 bit for bit, and each
variant computes what its paper says (values, gradients, bad settings refused)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import slotjax
from slotjax import kernels
from slotjax.nn.invariant_slot_attention import InvariantSlotAttention, RelativePositionEmbed, position_grid
from slotjax.nn.slot_attention import attend_heads, query_noise_schedule

SIZES = dict(input_size=8, mlp_hidden_size=16)  # slot_size 16, 4 slots, 3 iterations


def make(seed: int = 0, num_slots: int = 4, **variants) -> slotjax.SlotAttention:
    return slotjax.SlotAttention(num_slots, 16, **SIZES, **variants, rngs=nnx.Rngs(seed))


def copy_weights(source: nnx.Module, target: nnx.Module) -> nnx.Module:
    """Every parameter the two modules share, by path, from `source` into `target`."""
    source_params = dict(nnx.to_flat_state(nnx.state(source, nnx.Param)))
    for path, param in nnx.to_flat_state(nnx.state(target, nnx.Param)):
        if path in source_params:
            param[...] = source_params[path][...]
    return target


def inputs_and_slots(seed: int, batch: int = 2, num_slots: int = 4):
    keys = jax.random.split(jax.random.key(seed), 3)
    inputs = jax.random.normal(keys[0], (batch, 12, 8))
    initial_slots = jax.random.normal(keys[1], (batch, num_slots, 16))
    cotangent = jax.random.normal(keys[2], (batch, num_slots, 16))
    return inputs, initial_slots, cotangent


def textbook_algorithm_1(module, inputs, slots, num_iterations):
    """Algorithm 1 written out on the module's layers (reference kernel forms): slots, attention [B, T, K, N]."""
    inputs = module.norm_inputs(inputs)
    k, v = module.project_k(inputs), module.project_v(inputs)
    maps = []
    for _ in range(num_iterations):
        slots_prev = slots
        q = module.project_q(module.norm_slots(slots)) * module.slot_size**-0.5
        attention = jax.nn.softmax(jnp.einsum("bnd,bkd->bkn", k, q), axis=1)
        weights = attention + module.attention_epsilon
        weights = weights / jnp.sum(weights, axis=2, keepdims=True)
        slots = module.gru(jnp.einsum("bkn,bnd->bkd", weights, v), slots_prev)
        slots = slots + module.mlp(module.norm_mlp(slots))
        maps.append(attention)
    return slots, jnp.stack(maps, axis=1)


def parameter_grads(function, module, *arguments) -> dict:
    """{path: gradient} of `function(module, *arguments)` w.r.t. the module's parameters."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    grads = jax.grad(lambda p: function(nnx.merge(graphdef, p, rest, copy=True), *arguments))(params)
    return {path: np.asarray(value[...]) for path, value in nnx.to_flat_state(grads)}


def assert_bitwise(got, expected):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_default_and_neutral_settings_are_algorithm_1_bit_for_bit():
    default = make(0)
    neutral = copy_weights(
        default,
        make(1, implicit_gradients=False, learned_queries=False, num_heads=1, attention_normalisation="mean"),
    )
    inputs, initial_slots, cotangent = inputs_and_slots(0)

    def loss(module, function):
        return jnp.sum(function(module)[0] * cotangent)

    def of_module(module):
        return module(inputs, initial_slots=initial_slots, return_attention=True)

    def of_textbook(module):
        slots, attention = textbook_algorithm_1(module, inputs, initial_slots, 3)
        return slots, {"attention": attention}

    with kernels.use_forms("reference"):
        expected_slots, expected_aux = of_textbook(default)
        expected_grads = parameter_grads(loss, default, of_textbook)
        for module in (default, neutral):
            slots, aux = of_module(module)
            assert_bitwise(slots, expected_slots)
            assert_bitwise(aux["attention"], expected_aux["attention"])
            grads = parameter_grads(loss, module, of_module)
            assert grads.keys() == expected_grads.keys()
            for path in grads:
                assert_bitwise(grads[path], expected_grads[path])


def test_implicit_gradients_value_is_one_more_iteration_and_gradient_the_last_one_alone():
    paper = make(0)
    implicit = copy_weights(paper, make(1, implicit_gradients=True))
    inputs, _, cotangent = inputs_and_slots(1)
    key = jax.random.key(2)

    slots, aux = implicit(inputs, key=key, return_attention=True)
    expected_slots, expected_aux = paper(inputs, key=key, num_iterations=4, return_attention=True)
    assert aux["attention"].shape == (2, 4, 4, 12)  # T + 1 maps
    assert_bitwise(slots, expected_slots)
    assert_bitwise(aux["attention"], expected_aux["attention"])

    # the gradient is that of one iteration from the slots after T, held fixed; none reaches mu and log_sigma
    fixed_point = paper(inputs, key=key)
    grads = parameter_grads(lambda m: jnp.sum(m(inputs, key=key) * cotangent), implicit)
    last_step = parameter_grads(
        lambda m: jnp.sum(m(inputs, initial_slots=fixed_point, num_iterations=1) * cotangent), paper
    )
    paper_grads = parameter_grads(lambda m: jnp.sum(m(inputs, key=key, num_iterations=4) * cotangent), paper)
    for name in ("slots_mu", "slots_log_sigma"):
        assert not np.any(grads[(name,)]) and np.any(paper_grads[(name,)])
    for path in last_step:
        np.testing.assert_allclose(grads[path], last_step[path], rtol=1e-5, atol=1e-6 * np.abs(last_step[path]).max())
    assert not np.allclose(grads[("project_q", "kernel")], paper_grads[("project_q", "kernel")], rtol=1e-2)


def test_learned_queries_value_and_straight_through_gradient():
    module = make(0, learned_queries=True)
    paper = copy_weights(module, make(1))
    limit = np.sqrt(6 / (4 + 16))  # glorot-uniform over [K, D]
    queries = np.asarray(module.slots_queries[...])
    assert queries.shape == (1, 4, 16) and 0.8 * limit < np.abs(queries).max() <= limit
    assert not hasattr(module, "slots_mu")
    inputs, _, cotangent = inputs_and_slots(3)
    initial = jnp.broadcast_to(module.slots_queries[...], (2, 4, 16))

    slots, aux = module(inputs, return_attention=True)
    assert_bitwise(aux["initial_slots"], initial)
    assert_bitwise(slots, paper(inputs, initial_slots=initial))

    # the queries get the gradient of the last iteration's input slots, summed over the batch
    before_last = paper(inputs, initial_slots=initial, num_iterations=2)
    grads = parameter_grads(lambda m: jnp.sum(m(inputs) * cotangent), module)
    slots_grad = jax.grad(lambda s: jnp.sum(paper(inputs, initial_slots=s, num_iterations=1) * cotangent))(before_last)
    np.testing.assert_allclose(grads[("slots_queries",)], slots_grad.sum(0, keepdims=True), rtol=1e-5, atol=1e-7)


def test_learned_queries_noise_and_fixed_number_of_slots():
    module = make(0, learned_queries=True)
    inputs = jnp.zeros((4000, 3, 8))
    queries = np.asarray(module.slots_queries[...])[0]
    _, aux = module(inputs, key=jax.random.key(1), query_noise=0.5, num_iterations=1, return_attention=True)
    initial = np.asarray(aux["initial_slots"])  # Q + 0.5 * eps * Q
    np.testing.assert_allclose(initial.mean(0), queries, atol=0.05 * np.abs(queries).max())
    np.testing.assert_allclose(initial.std(0), 0.5 * np.abs(queries), rtol=0.1, atol=1e-3)
    # the noise's scale is held fixed: d/dQ of sum(S0 * c) is sum_b c, whatever the noise
    cotangent = jax.random.normal(jax.random.key(2), (3, 4, 16))
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def initial_slots(params, query_noise):
        return nnx.merge(graphdef, params, rest, copy=True).sample_initial_slots(3, 4, jax.random.key(3), query_noise)

    query_grad = jax.grad(lambda p: jnp.sum(initial_slots(p, 0.7) * cotangent))(params)["slots_queries"][...]
    np.testing.assert_allclose(query_grad[0], cotangent.sum(0), rtol=1e-6)
    assert not np.allclose(initial_slots(params, 0.7), initial_slots(params, 0.0))
    # a traced noise scale (annealed by the trainer) compiles once
    traced = nnx.jit(lambda m, noise: m(jnp.ones((2, 3, 8)), key=jax.random.key(4), query_noise=noise))
    assert traced(module, jnp.float32(0.3)).shape == (2, 4, 16)

    assert module(inputs[:2], num_slots=4).shape == (2, 4, 16)
    with pytest.raises(ValueError, match="num_slots=5 but this module learns 4 queries"):
        module(inputs[:2], num_slots=5)
    with pytest.raises(ValueError, match="query_noise perturbs learned queries"):
        make(0)(inputs[:2], query_noise=0.1)


def test_query_noise_schedule():
    values = [float(query_noise_schedule(step, 100)) for step in (0, 25, 50, 100, 250)]
    np.testing.assert_allclose(values, [1.0, 0.5 + 0.5 * np.cos(np.pi / 4), 0.5, 0.0, 0.0], atol=1e-6)
    assert float(query_noise_schedule(0, 0)) == 0.0
    assert float(jax.jit(query_noise_schedule, static_argnums=1)(jnp.int32(50), 100)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="anneal_steps must be an integer >= 0"):
        query_noise_schedule(0, -1)


def test_heads_attend_each_head_apart():
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, shape) for key, shape in zip(keys, [(2, 3, 12), (2, 7, 12), (2, 7, 12)]))
    attend = slotjax.SlotAttention.attend
    attention, updates = attend_heads(attend, q, k, v, 1e-8, 3)
    per_head = [attend(*(x[..., 4 * head : 4 * head + 4] for x in (q, k, v)), 1e-8) for head in range(3)]
    np.testing.assert_allclose(attention, np.mean([a for a, _ in per_head], axis=0), rtol=1e-6)
    np.testing.assert_allclose(updates, np.concatenate([u for _, u in per_head], axis=-1), rtol=1e-6)


@pytest.mark.parametrize(
    "variants",
    [dict(num_heads=4), dict(attention_normalisation="scaled_sum"), dict(num_heads=2, implicit_gradients=True)],
)
def test_variants_give_the_same_slots_in_both_kernel_forms(variants):
    module = make(0, **variants)
    inputs = jax.random.normal(jax.random.key(0), (2, 10, 8))
    with kernels.use_forms("cpu"):
        cpu_slots, cpu_aux = module(inputs, key=jax.random.key(1), return_attention=True)
    with kernels.use_forms("reference"):
        slots, aux = module(inputs, key=jax.random.key(1), return_attention=True)
    np.testing.assert_allclose(cpu_slots, slots, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(aux["attention"].sum(axis=2), 1.0, rtol=1e-5)  # softmax over the slots
    assert not np.allclose(slots, make(0)(inputs, key=jax.random.key(1)), atol=1e-4)  # the variant changes them


def test_bad_variant_settings_are_refused():
    with pytest.raises(ValueError, match="slot_size 16 does not split into num_heads=3 heads"):
        make(num_heads=3)
    with pytest.raises(ValueError, match="num_heads must be an integer >= 1, got 0"):
        make(num_heads=0)
    with pytest.raises(ValueError, match="attention_normalisation='sum' is unknown; use one of 'mean', 'scaled_sum'"):
        make(attention_normalisation="sum")


def test_models_pass_the_variants_through():
    options = dict(resolution=16, num_slots=3, slot_size=8, encoder_features=8, decoder_features=8, mlp_hidden_size=8)
    variants = dict(implicit_gradients=True, learned_queries=True, num_heads=2, attention_normalisation="scaled_sum")
    model = slotjax.SlotAutoencoder(**options, **variants, rngs=nnx.Rngs(0))
    slot_attention = model.encoder.slot_attention
    assert {name: getattr(slot_attention, name) for name in variants} == variants
    outputs = model(jnp.zeros((1, 16, 16, 3)))
    assert outputs["attention"].shape == (1, 4, 3, 256)
    predictor = slotjax.SetPredictor(
        resolution=16, num_slots=3, slot_size=8, encoder_features=8, num_heads=4, rngs=nnx.Rngs(0)
    )
    assert predictor.encoder.slot_attention.num_heads == 4


ADAPTIVE = dict(resolution=16, num_slots=4, slot_size=8, encoder_features=8, decoder_features=8, mlp_hidden_size=8)


def test_adaptive_slots_keep_and_drop():
    model = slotjax.SlotAutoencoder(**ADAPTIVE, adaptive_slots=True, rngs=nnx.Rngs(0))
    images = jax.random.uniform(jax.random.key(0), (3, 16, 16, 3), minval=-1, maxval=1)
    # noise forcing the decisions: slots 0 and 2 kept, 1 and 3 dropped, in every image
    forced = jnp.asarray([[0.0, 100.0], [100.0, 0.0], [0.0, 100.0], [100.0, 0.0]])
    outputs = model(images, key=jax.random.key(1), gumbel_noise=jnp.broadcast_to(forced, (3, 4, 2)))
    assert_bitwise(outputs["keep"], jnp.broadcast_to(jnp.asarray([1.0, 0.0, 1.0, 0.0]), (3, 4)))
    masks = np.asarray(outputs["masks"])[..., 0]  # [B, K, H, W]
    assert not masks[:, [1, 3]].any()  # a dropped slot never wins a pixel
    assert set(np.unique(masks.argmax(axis=1))) <= {0, 2}
    np.testing.assert_allclose(masks.sum(axis=1), 1.0, atol=1e-4)  # renormalised over the kept slots
    np.testing.assert_allclose(
        outputs["reconstruction"], jnp.sum(outputs["slot_reconstructions"] * outputs["masks"], axis=1), rtol=1e-6
    )
    # all kept: the paper's masks, up to the 1e-5 of the renormalisation
    plain = copy_weights(model, slotjax.SlotAutoencoder(**ADAPTIVE, rngs=nnx.Rngs(1)))
    kept = model(images, key=jax.random.key(1), gumbel_noise=jnp.broadcast_to(forced[0], (3, 4, 2)))
    np.testing.assert_allclose(kept["masks"], plain(images, key=jax.random.key(1))["masks"], rtol=2e-5, atol=1e-7)

    # evaluation: the more likely choice, no noise; training: Gumbel samples, the same for the same key
    logits = model.keep_predictor.mlp(model.keep_predictor.norm(outputs["slots"]))
    assert_bitwise(model(images, key=jax.random.key(1), deterministic=True)["keep"], logits[..., 1] > logits[..., 0])
    assert_bitwise(model(images, key=jax.random.key(2))["keep"], model(images, key=jax.random.key(2))["keep"])
    with pytest.raises(ValueError, match="gumbel_noise samples the adaptive slots' keep decisions"):
        plain(images, gumbel_noise=jnp.zeros((3, 4, 2)))
    assert "keep" not in plain(images)


def test_adaptive_slots_gradient_is_straight_through():
    """d keep / d logits is that of the soft Gumbel sample; the deterministic decision has none."""
    model = slotjax.SlotAutoencoder(**ADAPTIVE, adaptive_slots=True, rngs=nnx.Rngs(0))
    slots = jax.random.normal(jax.random.key(0), (2, 4, 8))
    noise = jax.random.gumbel(jax.random.key(1), (2, 4, 2))
    predictor = model.keep_predictor

    def output_bias_grad(gumbel_noise):  # the bias of the (drop, keep) logits
        grads = parameter_grads(lambda m: jnp.sum(m(slots, gumbel_noise)), predictor)
        return grads[("mlp", "output", "bias")]

    logits = predictor.mlp(predictor.norm(slots)) + noise
    soft = jax.nn.softmax(logits, axis=-1)[..., 1]
    expected = jnp.sum(soft * (1 - soft))  # d soft_keep / d (logit_keep - logit_drop), summed
    np.testing.assert_allclose(output_bias_grad(noise), [-expected, expected], rtol=1e-5)
    assert not np.any(output_bias_grad(None))


def test_invariant_slot_attention_positions_and_scales():
    isa = InvariantSlotAttention(3, 8, (4, 5), input_size=6, mlp_hidden_size=8, grid_hidden_size=8, rngs=nnx.Rngs(0))
    inputs = jax.random.normal(jax.random.key(0), (2, 20, 6))
    slots, aux = isa(inputs, key=jax.random.key(1), return_attention=True)
    assert slots.shape == (2, 3, 8) and aux["attention"].shape == (2, 4, 3, 20)
    np.testing.assert_allclose(aux["attention"].sum(axis=2), 1.0, rtol=1e-5)  # softmax over the slots
    # the last round's position and scale: mean and spread of the grid under the slot's normalised attention
    grid = position_grid((4, 5))
    weights = aux["attention"][:, -1] / (aux["attention"][:, -1].sum(axis=2, keepdims=True) + 1e-8)
    np.testing.assert_allclose(aux["positions"], weights @ grid, rtol=1e-5, atol=1e-6)
    spread = jnp.einsum("bkn,bknc->bkc", weights + 1e-8, (grid - aux["positions"][:, :, None]) ** 2)
    np.testing.assert_allclose(aux["scales"], jnp.clip(jnp.sqrt(spread), 1e-3, 2.0), rtol=1e-5)
    # initial positions ~ U[-1, 1], scales ~ N(0.1, 0.1) per axis
    _, aux = isa(jnp.zeros((1000, 20, 6)), key=jax.random.key(2), num_iterations=1, return_attention=True)
    positions, scales = np.asarray(aux["initial_positions"]), np.asarray(aux["initial_scales"])
    assert positions.min() >= -1 and positions.max() <= 1 and abs(positions.std() - 1 / np.sqrt(3)) < 0.01
    assert abs(scales.mean() - 0.1) < 0.005 and abs(scales.std() - 0.1) < 0.005

    with pytest.raises(ValueError, match="num_slots=4 but invariant Slot Attention learns 3 initial slots"):
        isa(inputs, num_slots=4)
    with pytest.raises(ValueError, match="inputs hold 12 cells but this module's grid is 4x5"):
        isa(inputs[:, :12])


def test_decoder_sees_the_grid_from_each_slot():
    """A slot at a grid cell with scale s sees that cell at 0 and its neighbour one cell (2 / (W - 1)) away at
    2 / (W - 1) / (5 s)."""
    embed = RelativePositionEmbed(4, (3, 3), rngs=nnx.Rngs(0))
    positions = jnp.asarray([[[0.0, 0.0], [-1.0, 1.0]]])  # the centre cell, the top-right cell: [1, 2, 2]
    scales = jnp.asarray([[[0.2, 0.2], [0.1, 0.4]]])
    embedded = embed(jnp.zeros((2, 3, 3, 4)), positions, scales)  # [B * K, H, W, 4]
    kernel, bias = embed.dense.kernel[...], embed.dense.bias[...]
    np.testing.assert_allclose(embedded[0, 1, 1], bias, atol=1e-6)
    np.testing.assert_allclose(embedded[0, 1, 2], bias + jnp.asarray([0.0, 1.0]) @ kernel, rtol=1e-5)
    np.testing.assert_allclose(embedded[1, 0, 2], bias, atol=1e-6)
    np.testing.assert_allclose(embedded[1, 1, 2], bias + jnp.asarray([2.0, 0.0]) @ kernel, rtol=1e-5)


def test_invariant_slots_in_the_autoencoder():
    model = slotjax.SlotAutoencoder(**ADAPTIVE, invariant_slots=True, rngs=nnx.Rngs(0))
    assert model.encoder.encoder_pos is None  # no absolute positions
    outputs = model(jnp.zeros((2, 16, 16, 3)), key=jax.random.key(0))
    assert outputs["positions"].shape == outputs["scales"].shape == (2, 4, 2)
    assert outputs["attention"].shape == (2, 4, 4, 256)
    with pytest.raises(ValueError, match="Invariant Slot Attention, which has no learned_queries, num_heads"):
        slotjax.SlotAutoencoder(**ADAPTIVE, invariant_slots=True, num_heads=2, learned_queries=True, rngs=nnx.Rngs(0))
