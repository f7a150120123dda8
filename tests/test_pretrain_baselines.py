"""The held-out trivial baselines of a pretraining run (pretrain/baselines.py): scored with the
run's own loss (ops.reference.mae_loss, computed here directly) on the same seeded mask draws
as the model; with norm_pix_loss "zero" is "patch_mean"; a model that predicts each patch's
mean scores exactly the patch_mean baseline; a tiny plain-pixel run writes them to summary.json
and draws them on the loss curve."""
import json

import pytest
import torch

from usfmae_fast.models.mae import MaskedAutoencoderViT
from usfmae_fast.ops import reference
from usfmae_fast.pretrain import baselines as bl
from usfmae_fast.pretrain.figures import plot_loss_curve, reconstruct

P = 4


def images(channels=1, n=3, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    # per-image offsets and per-channel scales: the trivial predictors differ
    base = torch.randn(n, channels, size, size, generator=g)
    return base * torch.linspace(0.5, 2.0, channels).view(1, -1, 1, 1) + \
        torch.randn(n, 1, 1, 1, generator=g)


def direct(imgs, norm_pix, mask_ratio, seed, draws):
    """The baselines by hand: loops over images, patches and channels, reference.mae_loss."""
    n, c, h, w = imgs.shape
    length = (h // P) * (w // P)
    g = torch.Generator().manual_seed(seed)
    out = {name: [] for name in bl.BASELINES}
    for _ in range(draws):
        noise = torch.rand(n, length, generator=g)
        _, mask, _ = reference.random_masking(torch.zeros(n, length, 1), mask_ratio, noise)
        target = reference.patchify(imgs, P)
        if norm_pix:
            mu, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mu) / (var + 1e-6) ** 0.5
        preds = {name: torch.zeros_like(target) for name in bl.BASELINES}
        for i in range(n):
            for ch in range(c):
                values = target[i, :, ch::c]                      # [L, p*p]
                visible = values[mask[i] == 0]
                preds["visible_mean"][i, :, ch::c] = visible.mean()
                for j in range(length):
                    preds["patch_mean"][i, j, ch::c] = values[j].mean()
        for name, pred in preds.items():
            out[name].append(float(reference.mae_loss(imgs, pred, mask, P, norm_pix)))
    return out


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("norm_pix", [False, True])
def test_baselines_are_the_runs_loss_of_the_trivial_predictions(channels, norm_pix):
    imgs = images(channels)
    got = bl.baseline_losses(imgs, P, norm_pix, 0.75, seed=5, draws=3)
    want = direct(imgs, norm_pix, 0.75, seed=5, draws=3)
    for name in bl.BASELINES:
        assert got[name] == pytest.approx(want[name], abs=1e-6, rel=1e-6), name
    if not norm_pix:  # the draws differ (not one mask three times)
        assert len(set(got["zero"])) == 3
    for k in range(3):  # the oracle is the best constant per patch and channel
        assert got["patch_mean"][k] <= min(got["zero"][k], got["visible_mean"][k]) + 1e-7
    if norm_pix and channels == 1:
        assert got["zero"] == pytest.approx(got["patch_mean"], abs=1e-6)
        assert got["zero"] == pytest.approx(got["visible_mean"], abs=1e-6)
        d = P * P  # (D - 1) / D * var / (var + eps), var ~ 1
        assert bl.mean(got["zero"]) == pytest.approx((d - 1) / d, abs=1e-3)
    if not norm_pix:
        assert len({round(bl.mean(v), 6) for v in got.values()}) == 3


class PatchMeanMAE(MaskedAutoencoderViT):
    """Predicts every patch as its own mean (per channel, in the loss's target space), through
    the real masking and loss of the model."""

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        _, mask, _ = self.forward_encoder(imgs, mask_ratio, noise)
        target = bl.loss_target(imgs, self.patch_embed.patch_size, self.norm_pix_loss)
        c = imgs.shape[1]
        pred = torch.zeros_like(target)
        for ch in range(c):
            pred[..., ch::c] = target[..., ch::c].mean(-1, keepdim=True)
        return self.forward_loss(imgs, pred, mask), pred, mask


@pytest.mark.parametrize("norm_pix", [False, True])
def test_a_model_predicting_the_patch_mean_scores_the_patch_mean_baseline(norm_pix):
    model = PatchMeanMAE(img_size=16, patch_size=P, in_chans=1, embed_dim=16, depth=1,
                         num_heads=1, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=1,
                         norm_pix_loss=norm_pix)
    imgs = images(1)
    model_loss = bl.model_losses(model, imgs, 0.75, seed=3, draws=4)
    base = bl.baseline_losses(imgs, P, norm_pix, 0.75, seed=3, draws=4)
    assert model_loss == pytest.approx(base["patch_mean"], abs=1e-6)
    # draw 0 is the mask of the reconstruction figure
    assert reconstruct(model, imgs, 0.75, seed=3)["loss"] == pytest.approx(model_loss[0],
                                                                           abs=1e-7)


def test_the_loss_curve_draws_baselines_and_heldout_points(tmp_path):
    history = [{"step": s, "loss": 1.0 / s, "lr": 1e-3} for s in range(1, 11)]
    path = plot_loss_curve(history, tmp_path / "curve.png", heldout={0: 1.2, 10: 0.4},
                           baselines={"zero": 1.0, "patch_mean": 0.3, "visible_mean": 0.9})
    assert path.stat().st_size > 0


def test_a_tiny_plain_pixel_run_reports_baselines(tmp_path):
    pytest.importorskip("pydicom.data")
    from usfmae_fast.pretrain.config import build_config
    from usfmae_fast.pretrain.engine import pretrain

    overrides = {"model.img_size": 32, "model.patch_size": 8, "model.embed_dim": 16,
                 "model.depth": 1, "model.num_heads": 1, "model.decoder_embed_dim": 16,
                 "model.decoder_depth": 1, "model.decoder_num_heads": 1,
                 "model.norm_pix_loss": False, "data.source": "demo",
                 "data.max_frames_per_file": 4, "data.heldout": 2, "optim.steps": 3,
                 "optim.batch_size": 4, "optim.warmup_steps": 1, "system.num_threads": 1,
                 "output.save_every": 10, "output.progress": False, "output.tensorboard": False,
                 "output.heldout_draws": 3, "output.out_dir": str(tmp_path)}
    summary = pretrain(build_config("demo", overrides=overrides))
    saved = json.loads((tmp_path / "summary.json").read_text())
    base = saved["heldout_baselines"]
    assert set(base) == set(bl.BASELINES) and saved["heldout_draws"] == 3
    assert "oracle" in saved["baseline_method"] and "3 fixed mask draws" in \
        saved["baseline_method"]
    per_draw = saved["heldout_per_draw"]
    assert all(len(per_draw[k]) == 3 for k in ("init", "end", *bl.BASELINES))
    assert saved["heldout_loss_end"] == pytest.approx(sum(per_draw["end"]) / 3)
    assert base["patch_mean"] < min(base["zero"], base["visible_mean"])
    assert (tmp_path / "loss_curve.png").stat().st_size > 0
    assert summary["heldout_baselines"] == base
