"""The SC picture rendered from a heat map mapped straight onto the picture's grid (what the result
writer does, to render once at the output size) matches the one rendered from the full-size map."""

from __future__ import annotations

import numpy as np
import pytest

from pacs_ai.infer.preprocess import Geometry, cam_to_original
from pacs_ai.write.overlay import Caption, picture_size, render_result_image


def _cam(size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return np.exp(-((x - 0.3 * size) ** 2 + (y - 0.6 * size) ** 2) / (2 * (0.12 * size) ** 2)).astype(np.float32)


def test_picture_size_caps_the_long_side_and_keeps_the_aspect_ratio() -> None:
    assert picture_size(2140, 1760) == (2048, round(1760 * 2048 / 2140))
    assert picture_size(1760, 2140) == (round(1760 * 2048 / 2140), 2048)
    assert picture_size(535, 440) == (535, 440)


def test_cam_to_original_with_out_size_equals_the_original_size_map_resized() -> None:
    geom = Geometry.for_image(1070, 880, 192)
    cam = _cam(192)
    full = cam_to_original(cam, geom)
    assert full.shape == (1070, 880)
    assert np.array_equal(cam_to_original(cam, geom, (1070, 880)), full)
    half = cam_to_original(cam, geom, (535, 440))
    assert half.shape == (535, 440)
    # sampled at the same relative positions, the two maps agree (the map is smooth)
    assert np.abs(half - full[::2, ::2]).max() < 0.03


@pytest.mark.parametrize("shape", [(2140, 1760), (600, 500)])
def test_render_from_a_heat_map_on_the_picture_grid_matches_the_full_size_render(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, size=shape, dtype=np.uint8)
    geom = Geometry.for_image(shape[0], shape[1], 192)
    cam = _cam(192)
    caption = Caption(True, 0.8, 0.5, "m 1")
    reference = render_result_image(grey, cam_to_original(cam, geom), caption, roi=(100, 200, 300, 400))
    direct = render_result_image(grey, cam_to_original(cam, geom, picture_size(*shape)), caption, roi=(100, 200, 300, 400))
    assert direct.shape == reference.shape == (*picture_size(*shape), 3)
    diff = np.abs(direct.astype(np.int16) - reference.astype(np.int16))
    assert diff.mean() < 0.5 and np.percentile(diff, 99.9) <= 6


def test_blend_matches_the_textbook_alpha_blend_and_leaves_cold_areas_exactly_grey() -> None:
    """Against the float formula written out here: out = (1 - a) * grey + a * turbo(h),
    a = 0.55 * clip((h - 0.15) / 0.85, 0, 1)."""
    import cv2

    from pacs_ai.write.overlay import blend_heatmap

    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, size=(300, 240), dtype=np.uint8)
    y, x = np.mgrid[0:300, 0:240].astype(np.float32)
    heat = np.exp(-((x - 90) ** 2 + (y - 140) ** 2) / (2 * 40.0**2)).astype(np.float32)
    out = blend_heatmap(grey, heat)
    levels = np.clip(np.rint(heat * 255), 0, 255).astype(np.uint8)
    turbo = cv2.applyColorMap(levels, cv2.COLORMAP_TURBO)[..., ::-1].astype(np.float32)
    a = 0.55 * np.clip((levels / 255.0 - 0.15) / 0.85, 0, 1)[..., None]
    expected = (1 - a) * grey[..., None].astype(np.float32) + a * turbo
    assert out.shape == (300, 240, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(np.float32) - expected).max() <= 2.0
    cold = heat < 0.14
    assert cold.any() and np.array_equal(out[cold], np.repeat(grey[cold][:, None], 3, axis=1))
    assert np.array_equal(blend_heatmap(grey, np.zeros_like(heat)), np.repeat(grey[..., None], 3, axis=2))
