"""Geometry: the single source of truth for shapes, voxel order and voxel positions."""

from __future__ import annotations

import numpy as np
import pytest

from hpc_calo.errors import UserError
from hpc_calo.geometry import DS2, DS3, R_MAX_MM, get_geometry, infer_geometry


@pytest.mark.parametrize(("geo", "n_alpha", "n_r", "n_voxels"), [(DS2, 16, 9, 6480), (DS3, 50, 18, 40500)])
def test_shapes_and_edges(geo, n_alpha, n_r, n_voxels):
    assert (geo.n_alpha, geo.n_r, geo.n_layers) == (n_alpha, n_r, 45)
    assert geo.voxels_per_layer == n_alpha * n_r and geo.n_voxels == n_voxels
    np.testing.assert_allclose(geo.r_edges, np.linspace(0, R_MAX_MM, n_r + 1))
    np.testing.assert_allclose(np.diff(geo.r_edges), 41.85 / n_r)
    assert geo.r_edges[1] == pytest.approx(4.65 if geo is DS2 else 2.325)
    np.testing.assert_allclose(geo.alpha_centres, -np.pi + (np.arange(n_alpha) + 0.5) * 2 * np.pi / n_alpha)
    # The voxel areas tile the disc of radius 41.85 mm.
    assert geo.voxel_area.sum() == pytest.approx(np.pi * R_MAX_MM**2)


@pytest.mark.parametrize("geo", [DS2, DS3])
def test_single_voxel_lands_at_layer_alpha_r(geo):
    layer, a, r = 3, 5, 2
    flat = layer * geo.voxels_per_layer + a * geo.n_r + r  # radial fastest, then angle, then layer
    showers = np.zeros((2, geo.n_voxels), dtype=np.float32)
    showers[1, flat] = 7.0
    grid = geo.grid(showers)
    assert grid.shape == (2, 45, geo.n_alpha, geo.n_r)
    assert grid[1, layer, a, r] == 7.0 and grid.sum() == 7.0
    assert np.shares_memory(grid, showers)  # a view, not a copy
    layers = geo.layers(showers)
    assert layers.shape == (2, 45, geo.voxels_per_layer)
    v = a * geo.n_r + r
    assert layers[1, layer, v] == 7.0
    r_mid, alpha_mid = geo.r_centres[r], geo.alpha_centres[a]
    assert geo.voxel_r[v] == pytest.approx(r_mid)
    assert geo.voxel_alpha[v] == pytest.approx(alpha_mid)
    assert geo.voxel_eta[v] == pytest.approx(r_mid * np.cos(alpha_mid))
    assert geo.voxel_phi[v] == pytest.approx(r_mid * np.sin(alpha_mid))
    # Energy-weighted centre of that shower is exactly the voxel centre.
    e = layers[1, layer]
    assert (e * geo.voxel_eta).sum() / e.sum() == pytest.approx(r_mid * np.cos(alpha_mid))


def test_ds2_voxel_centre_values():
    # alpha bin 0 is centred at -pi + pi/16; r bin 0 at 2.325 mm.
    assert DS2.voxel_r[0] == pytest.approx(2.325)
    assert DS2.voxel_alpha[0] == pytest.approx(-np.pi + np.pi / 16)
    assert DS2.voxel_r[DS2.n_r - 1] == pytest.approx(41.85 - 2.325)
    assert DS2.voxel_alpha[DS2.n_r] == pytest.approx(-np.pi + 3 * np.pi / 16)


def test_lookup_and_inference():
    assert get_geometry("DS2") is DS2 and get_geometry("ds3") is DS3
    assert infer_geometry(6480) is DS2 and infer_geometry(40500) is DS3
    with pytest.raises(UserError, match="unknown dataset"):
        get_geometry("ds1")
    with pytest.raises(UserError, match="matches no dataset"):
        infer_geometry(368)
