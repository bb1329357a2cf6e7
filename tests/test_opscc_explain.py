"""SMuRF integrated gradients: input-shaped attributions that add up to the log-hazard difference, the CT
overlay back on the CT grid inside the regions' boxes, and the slide heatmap PNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from oncofusion.data.slide_grids import plan_fragment_grids
from oncofusion.io.slides import open_slide
from oncofusion.models.opscc_smurf.explain import (
    attribution_volume,
    ct_overlay,
    grid_heatmap_png,
    integrated_gradients,
    log_hazard_function,
    region_scores,
    slide_heatmap_png,
    subvolume_starts,
    to_grid,
    top_fraction_mask,
)
from oncofusion.models.opscc_smurf.network import SmurfNet
from oncofusion.models.opscc_smurf.subvolumes import subvolume_transforms

try:
    from sample_data.slides import write_pyramid
except ImportError:
    from tests.slides import write_pyramid

CT_SHAPE, GRID = (16, 16, 4), 8


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def network(seed: int = 0, modalities=("ct_tumor", "ct_nodes", "wsi")) -> SmurfNet:
    torch.manual_seed(seed)
    return SmurfNet(modalities=modalities).eval()


def case(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    wsi = torch.randn(1, 2, 192, GRID, GRID, generator=g)
    wsi[:, :, :, :2] = 0.0  # padding cells
    return torch.rand(1, 4, *CT_SHAPE, generator=g), torch.rand(1, 4, *CT_SHAPE, generator=g), wsi


# -- integrated gradients ----------------------------------------------------------------------------------
def test_attributions_have_the_input_shapes_and_add_up_to_the_log_hazard_difference():
    inputs = case()
    f = log_hazard_function([network(0), network(1)])
    attributions, delta, output, baseline = integrated_gradients(f, inputs, n_steps=32)
    assert [a.shape for a in attributions] == [x.shape for x in inputs]
    with torch.no_grad():
        assert output == pytest.approx(float(f(*inputs)[0]), abs=1e-5)
        assert baseline == pytest.approx(float(f(*(torch.zeros_like(x) for x in inputs))[0]), abs=1e-5)
    total = sum(float(a.sum()) for a in attributions)
    assert total - (output - baseline) == pytest.approx(delta, abs=1e-4)  # captum's delta is what it says
    assert abs(delta) < 0.05 * abs(output - baseline) + 1e-3  # completeness
    # an input equal to the baseline gets nothing: the padding cells of the slide grid
    assert float(attributions[2][:, :, :, :2].abs().max()) == 0.0


def test_ensemble_attributions_are_the_mean_of_the_members():
    inputs = case(1)
    members = [network(0, ("ct_tumor", "ct_nodes")), network(1, ("ct_tumor", "ct_nodes"))]
    both, *_ = integrated_gradients(log_hazard_function(members), inputs[:2], n_steps=4)
    each = [integrated_gradients(log_hazard_function([m]), inputs[:2], n_steps=4)[0] for m in members]
    for i in range(2):
        assert torch.allclose(both[i], (each[0][i] + each[1][i]) / 2, atol=1e-6)


def test_bad_calls_are_refused():
    f = log_hazard_function([network(0, ("ct_tumor", "ct_nodes"))])
    with pytest.raises(ValueError, match="n_steps"):
        integrated_gradients(f, case()[:2], n_steps=0)
    with pytest.raises(ValueError, match="one case"):
        integrated_gradients(f, [torch.rand(2, 4, *CT_SHAPE)] * 2)
    with pytest.raises(ValueError, match="no model"):
        log_hazard_function([])


# -- CT overlay --------------------------------------------------------------------------------------------
def meta(array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> MetaTensor:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return MetaTensor(torch.as_tensor(array[None]), affine=torch.as_tensor(affine))


def test_footprints_are_where_the_sub_volumes_were_cut():
    """Sub-volumes of a CT that holds each voxel's own index, put back at their footprints, land on the
    voxels they came from."""
    shape = (30, 30, 24)
    index = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    tumor = np.zeros(shape, np.uint8)
    tumor[10:15, 8:13, 5:19] = 1
    data = {"image": meta(index), "tumor_mask": meta(tumor), "node_mask": None}
    out = subvolume_transforms(False, roi_size=(6, 6), ring_mm=1.0, window_hu=(0, 1e9), crop_first=False,
                               keep_inputs=True)(data)
    box = out["tumor_mask_box"]
    cut = out["ct_tumor"].numpy() * 1e9  # undo the window
    for channel, start in zip(cut, subvolume_starts(box, cut.shape[1:]), strict=True):
        expected = index[tuple(slice(s, s + n) for s, n in zip(start, channel.shape, strict=True))]
        np.testing.assert_allclose(channel, expected, rtol=1e-5)


def test_attribution_volume_is_zero_outside_the_boxes_and_sums_overlaps():
    shape = (20, 20, 20)
    box = np.array([[5, 5, 2], [12, 12, 17]])  # quartile centres z 4, 7, 11, 15: slices 2-5, 5-8, 9-12, 13-16
    values = np.ones((4, 6, 6, 4), np.float32)
    volume = attribution_volume({"ct_tumor": -values, "ct_nodes": values}, {"ct_tumor": box, "ct_nodes": None}, shape)
    assert volume.min() == 0.0  # magnitudes; the absent nodes are not drawn
    assert volume.sum() == pytest.approx(values.size)  # every footprint lies inside this box
    assert volume[9, 9, 5] == 2.0 and volume[9, 9, 4] == 1.0  # slice 5 is in the first two sub-volumes
    clipped = attribution_volume({"ct_tumor": values}, {"ct_tumor": np.array([[5, 5, 4], [12, 12, 15]])}, shape)
    inside = np.zeros(shape, bool)
    inside[5:13, 5:13, 4:16] = True
    assert clipped[~inside].max() == 0.0 and clipped.sum() == values.size - 36  # slice 3 lies outside the box


def test_top_fraction_keeps_the_largest_values():
    volume = np.zeros((10, 10, 10), np.float32)
    volume[:5] = np.arange(500, dtype=np.float32).reshape(5, 10, 10) + 1
    top = top_fraction_mask(volume, 0.1)
    assert top.sum() == 50 and volume[top].min() == 451
    assert not top_fraction_mask(np.zeros((3, 3, 3)), 0.5).any()
    with pytest.raises(ValueError, match="top_fraction"):
        top_fraction_mask(volume, 0.0)


def test_overlay_lands_inside_the_boxes_on_a_shifted_ct_grid():
    """1 mm CT, 1 mm grid starting at CT voxel (3, 2, 1): the label is the top voxels shifted, value 1 only."""
    rng = np.random.default_rng(0)
    grid_shape, ct_shape = (24, 24, 24), (30, 30, 30)
    grid_affine = np.eye(4)
    grid_affine[:3, 3] = (3.0, 2.0, 1.0)
    boxes = {"ct_tumor": np.array([[4, 4, 3], [11, 13, 14]]), "ct_nodes": np.array([[14, 12, 10], [20, 21, 20]])}
    attributions = {k: rng.normal(size=(4, 6, 6, 4)).astype(np.float32) for k in boxes}
    label, info = ct_overlay(attributions, boxes, grid_shape, grid_affine, ct_shape, np.eye(4), top_fraction=0.2)
    assert label.dtype == np.uint8 and set(np.unique(label)) == {0, 1}
    in_boxes = np.zeros(ct_shape, bool)
    for lo, hi in boxes.values():
        in_boxes[tuple(slice(a + o, b + o + 1) for a, b, o in zip(lo, hi, (3, 2, 1), strict=True))] = True
    assert label[~in_boxes].max() == 0
    volume = attribution_volume(attributions, boxes, grid_shape)
    top = top_fraction_mask(volume, 0.2)
    np.testing.assert_array_equal(label[3:27, 2:26, 1:25], top.astype(np.uint8))
    assert info["voxels_1mm"] == info["voxels_ct"] == int(top.sum()) > 0


def test_coarse_ct_slices_lose_no_marked_voxel_and_fine_ones_get_no_holes():
    mask = np.zeros((12, 12, 12), bool)
    mask[4, 4, 4] = True  # one voxel between two 3 mm slices' centres
    coarse = to_grid(mask, np.eye(4), (12, 12, 4), np.diag([1.0, 1.0, 3.0, 1.0]))
    assert coarse.sum() == 1 and coarse[4, 4, 1] == 1
    half = np.diag([0.5, 0.5, 0.5, 1.0])
    half[:3, 3] = 0.25  # 0.5 mm voxels centred at 3.75 and 4.25 mm fall in the 1 mm voxel at 4 mm
    fine = to_grid(mask, np.eye(4), (24, 24, 24), half)
    assert fine.sum() == 8 and fine[7:9, 7:9, 7:9].all()


# -- slide ---------------------------------------------------------------------------------------------------
def test_region_scores_sum_the_features():
    attribution = torch.randn(1, 2, 192, 4, 4)
    np.testing.assert_allclose(region_scores(attribution), attribution[0].sum(1).numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="slide attribution"):
        region_scores(np.zeros((192, 4, 4)))


def test_slide_heatmap_colours_each_region_over_the_thumbnail(tmp_path):
    import skimage.data as ski_data

    base = np.full((256, 512, 3), 255, np.uint8)
    base[64:192, 64:448] = ski_data.immunohistochemistry()[:128, :384]
    path = write_pyramid(tmp_path / "slide.tiff", base, levels=2, mpp=0.5)
    with open_slide(path) as slide:
        plan = plan_fragment_grids(slide, region_size=64, target_mpp=0.5, grid_size=8, thumbnail_size=256)
        assert plan.placed
        scores = np.zeros((plan.n_fragments, 8, 8), np.float32)
        first, last = plan.placed[0], plan.placed[-1]
        scores[first.fragment, first.row, first.col] = 2.0
        scores[last.fragment, last.row, last.col] = -1.0
        written = slide_heatmap_png(scores, slide, plan, tmp_path / "out" / "heat.png", thumbnail_size=256)
        thumb = slide.thumbnail(256)
    image = np.asarray(Image.open(written).convert("RGB")).astype(int)
    assert image.shape == thumb.shape
    scale = thumb.shape[1] / 512

    def centre(p):
        half = p.region.size * 0.5
        return int((p.region.y + half) * scale), int((p.region.x + half) * scale)

    red, blue = image[centre(first)], image[centre(last)]
    assert red[0] > red[2] + 60 and blue[2] > blue[0] + 20  # positive red, negative blue (half strength)
    untouched = image[2, 2] - thumb[2, 2]
    assert np.abs(untouched).max() <= 1  # glass outside every region keeps its colour


def test_grid_heatmap_is_a_readable_png(tmp_path):
    scores = np.zeros((2, 4, 4), np.float32)
    scores[1, 0, 0] = 1.0
    written = grid_heatmap_png(scores, tmp_path / "grid.png", cell=4)
    image = np.asarray(Image.open(written).convert("RGB"))
    assert image.shape == (16, 2 * 16 + 2, 3)
    assert tuple(image[0, 18]) == (255, 0, 0) and tuple(image[0, 0]) == (255, 255, 255)
