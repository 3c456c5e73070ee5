"""Tests for slotjax.visualize: the attention-over-iterations picture."""

import numpy as np
import pytest

from slotjax import visualize

PADDING = 2  # tile's default gap


def _tile_origins(grid, num_rows, num_columns, tile_height, tile_width):
    """(top, left) of every tile of a labelled grid, the row-label margin being what is left of the width."""
    left_margin = grid.shape[1] - (num_columns * (tile_width + PADDING) + PADDING)
    tops = [visualize.LABEL_HEIGHT + PADDING + i * (tile_height + PADDING) for i in range(num_rows)]
    lefts = [left_margin + PADDING + j * (tile_width + PADDING) for j in range(num_columns)]
    return tops, lefts, left_margin


def test_attention_grid_shape_and_labels():
    rng = np.random.default_rng(0)
    batch_size, num_iterations, num_slots, size = 3, 3, 4, 16
    images = rng.uniform(-1, 1, (batch_size, size, size, 3))
    attention = rng.dirichlet(np.ones(num_slots), (batch_size, num_iterations, 16)).transpose(0, 1, 3, 2)  # 4x4 grid
    grid = visualize.attention_grid(images, attention, max_examples=2)

    tile_size = visualize.MIN_TILE_SIZE  # 16-pixel images are enlarged 6 times
    num_rows, num_columns = 2 * num_iterations, 1 + num_slots
    tops, lefts, left_margin = _tile_origins(grid, num_rows, num_columns, tile_size, tile_size)
    assert grid.dtype == np.uint8 and grid.shape[2] == 3
    assert grid.shape[0] == visualize.LABEL_HEIGHT + num_rows * (tile_size + PADDING) + PADDING
    assert left_margin >= 30  # room for "iteration 1"
    for j, left in enumerate(lefts):  # dark label text above every column ("input", "slot 1", ...)
        assert (grid[: visualize.LABEL_HEIGHT, left : left + tile_size] < 128).any(), j
    for i, top in enumerate(tops):  # and left of every row ("iteration t")
        assert (grid[top : top + tile_size, :left_margin] < 128).any(), i
    assert (grid[: visualize.LABEL_HEIGHT, :left_margin] == 255).all()  # the corner stays blank


@pytest.mark.parametrize("height, width, grid_height, grid_width", [(16, 16, 4, 4), (8, 12, 2, 3), (6, 6, 6, 6)])
def test_attention_grid_puts_a_known_map_in_its_place(height, width, grid_height, grid_width):
    """One token of example 1, iteration 2, slot 3 gets all the attention: its pixels are white in that tile only,
    every other map is black, and the input shows in the first row of each example."""
    rng = np.random.default_rng(1)
    batch_size, num_iterations, num_slots = 2, 3, 4
    images = rng.uniform(-1, 1, (batch_size, height, width, 3))
    attention = np.zeros((batch_size, num_iterations, num_slots, grid_height * grid_width))
    token_row, token_column = grid_height - 1, grid_width // 2
    attention[1, 1, 2, token_row * grid_width + token_column] = 1.0
    grid = visualize.attention_grid(images, attention)

    scale = -(-visualize.MIN_TILE_SIZE // width)
    tile_height, tile_width = height * scale, width * scale
    tops, lefts, _ = _tile_origins(grid, batch_size * num_iterations, 1 + num_slots, tile_height, tile_width)

    def tile_at(row, column):
        return grid[tops[row] : tops[row] + tile_height, lefts[column] : lefts[column] + tile_width]

    token_map = np.zeros((grid_height, grid_width))
    token_map[token_row, token_column] = 255
    pixel_map = np.kron(token_map, np.ones((height // grid_height, width // grid_width)))  # [H, W]
    expected = np.kron(pixel_map, np.ones((scale, scale)))[..., None].repeat(3, axis=-1)
    for b in range(batch_size):
        for t in range(num_iterations):
            row = b * num_iterations + t
            first = visualize.to_uint8(images[b]).repeat(scale, 0).repeat(scale, 1)
            np.testing.assert_array_equal(tile_at(row, 0), first if t == 0 else 255)
            for k in range(num_slots):
                np.testing.assert_array_equal(tile_at(row, 1 + k), expected if (b, t, k) == (1, 1, 2) else 0)


def test_attention_grid_refuses_maps_that_fit_no_grid():
    with pytest.raises(ValueError, match="10 tokens"):
        visualize.attention_grid(np.zeros((1, 8, 8, 3)), np.zeros((1, 2, 3, 10)))
    with pytest.raises(ValueError, match="batch size"):
        visualize.attention_grid(np.zeros((2, 8, 8, 3)), np.zeros((1, 2, 3, 16)))
