"""Token pictures: patch positions land where PatchEmbed put them; the figures are written."""

import numpy as np
import pytest

from ponder import errors
from ponder.analysis import token_maps


def test_patch_grid_puts_token_t_at_patch_t_minus_1_row_major():
  grid = token_maps.patch_grid(np.array([9.0, 1.0, 2.0, 6.0]), np.array([0, 1, 2, 6]), (2, 3))
  expected = np.array([[1.0, 2.0, np.nan], [np.nan, np.nan, 6.0]])  # Class token left out.
  np.testing.assert_array_equal(grid, expected)
  with pytest.raises(errors.ShapeError):
    token_maps.patch_grid(np.ones(2), np.array([0, 7]), (2, 3))


def test_figures_are_written(tmp_path):
  images = np.random.default_rng(0).uniform(size=(2, 8, 8, 1))
  kept = [np.array([[0, 1, 3, 4], [0, 2, 3, 4]]), np.array([[0, 3], [0, 4]])]
  importance = [np.full((2, 5), 0.9), np.full((2, 4), 0.5)]
  positions = [np.broadcast_to(np.arange(5), (2, 5)), kept[0]]
  token_maps.kept_tokens_figure(images, kept, 4, str(tmp_path / "kept.png"))
  token_maps.importance_figure(images, importance, positions, 4, str(tmp_path / "imp.png"))
  token_maps.tradeoff_figure({"sweep": [(0.5, 80.0), (0.9, 85.0)], "base": [(1.0, 86.0)]},
                             str(tmp_path / "t.png"), xlabel="x", ylabel="y",
                             annotations={"sweep": ["0.5", "0.9"]})
  for name in ("kept.png", "imp.png", "t.png"):
    assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
