"""Localisation baselines (centre pointer, uniform map), all-zero maps, the scaled pointing-game
tolerance, and deletion / insertion areas on a toy model whose right answer is known."""
import numpy as np
import pytest
import torch
from torch import nn

from usfmae_fast.explain import (centre_pointer, deletion_insertion, energy_in_mask, localise,
                                 pointing_game, random_maps, scaled_tolerance,
                                 uniform_pointing_game, zero_maps)
from usfmae_fast.explain.localization import summarise

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------- localisation
def test_all_zero_map_fails_both_scores_and_is_counted():
    """An all-zero map's argmax is pixel (0, 0): inside this mask, yet it must be a miss, and
    its energy 0 rather than left out of the mean."""
    mask = np.zeros((8, 8), dtype=bool)
    mask[0:3, 0:3] = True
    zero, good = np.zeros((8, 8)), np.zeros((8, 8))
    good[1, 1] = 1.0
    assert pointing_game(zero, mask) is False and energy_in_mask(zero, mask) == 0.0
    assert pointing_game(zero, mask, tolerance=100.0) is False
    assert zero_maps(np.stack([zero, good])).tolist() == [True, False]
    summary = summarise([localise(zero, mask, 0.0), localise(good, mask, 0.0)])
    assert summary["zero_maps"] == 1
    assert summary["pointing_game"] == 0.5 and summary["energy_in_mask"] == 0.5


def test_centre_pointer_and_uniform_map_on_hand_made_masks():
    centre = np.zeros((8, 8), dtype=bool)
    centre[3:5, 3:5] = True  # 4 pixels around the centre pixel (4, 4)
    corner = np.zeros((8, 8), dtype=bool)
    corner[0:2, 0:2] = True  # 4 pixels; nearest (1, 1) is sqrt(18) = 4.24 px from (4, 4)
    assert centre_pointer((8, 8))[4, 4] == 1 and centre_pointer((8, 8)).sum() == 1
    one = localise(np.ones((8, 8)), centre, 0.0)
    assert one["centre_pointer"] == {"pointing_game": True, "energy_in_mask": 1.0}
    assert one["uniform_map"] == {"pointing_game": 4 / 64, "energy_in_mask": 4 / 64}
    far = localise(np.ones((8, 8)), corner, 1.0)
    assert far["centre_pointer"] == {"pointing_game": False, "energy_in_mask": 0.0}
    # within 1 px of a 2 x 2 corner square: the square, 2 below and 2 to its right
    assert far["uniform_map"]["pointing_game"] == 8 / 64
    assert uniform_pointing_game(centre, 1.0) == 12 / 64  # the square and 2 on each side
    assert localise(np.ones((8, 8)), corner, 4.3)["centre_pointer"]["pointing_game"] is True
    assert localise(np.ones((8, 8)), corner, 4.2)["centre_pointer"]["pointing_game"] is False
    summary = summarise([one, localise(np.ones((8, 8)), corner, 0.0)])
    assert summary["pointing_game_centre_pointer"] == 0.5
    assert summary["energy_in_mask_uniform_map"] == 4 / 64
    assert summary["pointing_game_uniform_map"] == 4 / 64


def test_tolerance_scales_15_px_at_224():
    assert scaled_tolerance((224, 224)) == 15.0
    assert scaled_tolerance((32, 32)) == pytest.approx(15 * 32 / 224)
    assert scaled_tolerance((112, 448)) == pytest.approx(15.0)
    with pytest.raises(ValueError, match="tolerance"):
        uniform_pointing_game(np.ones((4, 4)), -1.0)


# ------------------------------------------------------------------------- faithfulness
class RegionMean(nn.Module):
    """Class 0's probability is the mean of channel 0 over ``region`` (clamped to (0, 1)), or
    with ``contrast`` the mean of ``4 (x - 0.5)^2`` there (what a blur takes away)."""

    def __init__(self, region: torch.Tensor, contrast: bool = False):
        super().__init__()
        self.region, self.contrast = region, contrast

    def forward(self, x):
        x = x[:, 0][:, self.region]
        m = (4 * (x - 0.5) ** 2 if self.contrast else x).mean(dim=1).clamp(1e-6, 1 - 1e-6)
        return torch.stack([m.log(), (1 - m).log()], dim=1)


def region_case(size=8, side=4, contrast=False):
    """The model, an image that scores 1 (the region 1, else 0; with ``contrast`` a 0 / 1
    checkerboard on the region, 0.5 elsewhere) and the region."""
    region = torch.zeros(size, size, dtype=torch.bool)
    region[:side, :side] = True
    if contrast:
        rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        image = torch.where(region, ((rows + cols) % 2).float(), 0.5)
    else:
        image = region.float()
    return RegionMean(region, contrast), image[None, None], region


def test_deletion_insertion_exact_on_region_model():
    """Image = 1 on the region, 0 elsewhere (mean 0.25); with the mean baseline and 4 steps of
    16 px, a map on the region removes it all in the first step."""
    model, image, region = region_case()
    out = deletion_insertion(model, image, region.float()[None], [0], steps=4, baseline="mean")
    torch.testing.assert_close(out.fractions, torch.tensor([0, .25, .5, .75, 1]))
    torch.testing.assert_close(out.deletion[0], torch.tensor([1, .25, .25, .25, .25]), atol=1e-5,
                               rtol=0)
    torch.testing.assert_close(out.insertion[0], torch.tensor([.25, 1, 1, 1, 1]), atol=1e-5,
                               rtol=0)
    assert out.deletion_auc.item() == pytest.approx(0.34375, abs=1e-5)
    assert out.insertion_auc.item() == pytest.approx(0.90625, abs=1e-5)
    away = deletion_insertion(model, image, (~region).float()[None], [0], steps=4,
                              baseline="mean")  # the region goes last
    assert away.deletion_auc.item() == pytest.approx(0.90625, abs=1e-5)
    assert away.insertion_auc.item() == pytest.approx(0.34375, abs=1e-5)


@pytest.mark.parametrize("baseline", ["mean", "blur"])
def test_map_on_the_region_beats_random_maps(baseline):
    model, image, region = region_case(size=32, side=10, contrast=baseline == "blur")
    assert model(image)[0].softmax(0)[0] > 0.99
    images = image.expand(6, 1, 32, 32)
    good = deletion_insertion(model, images, region.float().expand(6, 32, 32), [0] * 6,
                              baseline=baseline)
    rand = deletion_insertion(model, images, random_maps(6, (32, 32), seed=3), [0] * 6,
                              baseline=baseline)
    assert (good.deletion_auc < rand.deletion_auc - 0.1).all()
    assert (good.insertion_auc > rand.insertion_auc + 0.1).all()
    assert good.deletion.shape == (6, 21)  # 20 steps of 5 %


def test_deletion_insertion_batches_agree_and_errors_name_the_argument():
    model, image, region = region_case(size=16, side=6)
    images, maps = image.expand(3, 1, 16, 16), random_maps(1, (16, 16), seed=1).expand(3, -1, -1)
    whole = deletion_insertion(model, images, maps, [0, 1, 0], steps=5, batch_size=64)
    parts = deletion_insertion(model, images, maps, [0, 1, 0], steps=5, batch_size=2)
    torch.testing.assert_close(whole.deletion, parts.deletion)
    torch.testing.assert_close(whole.insertion, parts.insertion)
    torch.testing.assert_close(whole.deletion[1], 1 - whole.deletion[0])  # class 1: 1 - class 0
    assert not torch.equal(whole.deletion[0], whole.insertion[0])
    with pytest.raises(ValueError, match="maps: expected shape"):
        deletion_insertion(model, images, maps[:2], [0] * 3)
    with pytest.raises(ValueError, match="steps"):
        deletion_insertion(model, images, maps, [0] * 3, steps=0)
    with pytest.raises(ValueError, match="baseline"):
        deletion_insertion(model, images, maps, [0] * 3, baseline="zero")
