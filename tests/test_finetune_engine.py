"""Fine-tuning models and one fold of training: MAE / fb-mae checkpoints become timm
classifiers (weights, gray conversion, position embeddings, pooling), the linear probe's
folded head, layer-wise lr decay through the schedule, imbalance handling, early stopping, and
a fold's best-epoch checkpoint loading in the Score-CAM loader with the same predictions."""
import csv
import json

import numpy as np
import pytest
import safetensors
import timm
import torch

from _finetune_data import TINY_MAE, make_labelled_set, tiny_mae_checkpoint
from usfmae_fast.finetune.engine import (Preprocess, TrainConfig, _better, balanced_indices,
                                         build_finetune_optimizer, predict_probs, soft_target_loss,
                                         train_fold)
from usfmae_fast.finetune.labels import read_labels
from usfmae_fast.finetune.models import (ModelSpec, ProbeHead, build_classifier,
                                         classifier_state_dict, load_finetuned, model_spec,
                                         pretraining_stats, save_classifier)
from usfmae_fast.finetune.splits import kfold_splits
from usfmae_fast.models import MaskedAutoencoderViT
from usfmae_fast.models.checkpoint import IMAGENET_MEAN, IMAGENET_STD
from usfmae_fast.runtime.optim import WarmupCosineLR



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mae_ckpt(tmp_path_factory):
    return tiny_mae_checkpoint(tmp_path_factory.mktemp("mae"))


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return read_labels(make_labelled_set(tmp_path_factory.mktemp("data"), per_class=6))


def quick_train(**overrides) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 6, "img_size": 32, "warmup_epochs": 1,
                          "progress": False, "workers": 1, "drop_path": 0.0, "blr": 2e-3,
                          **overrides})


# ------------------------------------------------------------------------------- models
def test_mae_encoder_becomes_timm_classifier(mae_ckpt):
    spec = model_spec("usfmae", str(mae_ckpt))
    built = build_classifier(spec, 3, img_size=48, in_chans=1)  # 4x4 grid -> 6x6
    source = MaskedAutoencoderViT(in_chans=1, **TINY_MAE)
    source.load_state_dict(safetensors.torch.load_file(mae_ckpt))
    model, state = built.model, source.state_dict()
    assert built.arch == "usfmae_vit_tiny_patch16_224" and model.num_classes == 3
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight, state["blocks.1.mlp.fc2.weight"])
    assert model.pos_embed.shape == (1, 37, 32) and "resampled" in " ".join(built.notes)
    # fb/mae fine-tuning: avg pooling with a fresh fc_norm instead of the final norm
    assert isinstance(model.norm, torch.nn.Identity) and model.fc_norm.weight.eq(1).all()
    token = build_classifier(spec, 3, img_size=32, global_pool="token").model
    torch.testing.assert_close(token.norm.weight, state["norm.weight"])
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(token.eval().forward_features(x), source.forward_features(x))
    assert built.mean == [0.15] and built.std == [0.2]  # no pretraining stats recorded


def test_three_channel_checkpoint_folded_to_gray_exactly(tmp_path):
    torch.manual_seed(1)  # an fb/mae-style .pth for ImageNet inputs, no config: the head count
    # is guessed from the width (embed_dim / 64 off the fb/mae presets)
    rgb = MaskedAutoencoderViT(in_chans=3, **{**TINY_MAE, "embed_dim": 64, "num_heads": 1})
    path = tmp_path / "mae_pretrain.pth"
    torch.save({"model": rgb.state_dict()}, path)
    gray = build_classifier(model_spec("usfmae", str(path)), 2, img_size=32, in_chans=1,
                            global_pool="token", mean=0.2, std=0.25)
    assert "to_grayscale" in " ".join(gray.notes)
    pixels = torch.rand(2, 1, 32, 32)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    expected = rgb.forward_features((pixels.expand(-1, 3, -1, -1) - mean) / std)
    got = gray.model.eval().forward_features((pixels - 0.2) / 0.25)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_pretraining_stats_from_the_run_summary(tmp_path, mae_ckpt):
    run = tmp_path / "run"
    run.mkdir()
    ckpt = run / "checkpoint.safetensors"
    ckpt.write_bytes(mae_ckpt.read_bytes())
    assert pretraining_stats(ckpt) is None
    (run / "summary.json").write_text(json.dumps({"data_mean": 0.31, "data_std": 0.27}))
    assert pretraining_stats(ckpt) == ([0.31], [0.27])
    built = build_classifier(model_spec("vit_scratch", str(ckpt)), 2, img_size=32)
    assert (built.mean, built.std) == ([0.31], [0.27])  # the scratch twin is fed alike
    assert built.model.embed_dim == 32 and len(built.model.blocks) == 2


def test_model_names_and_errors(tmp_path, mae_ckpt):
    assert model_spec("densenet169").arch == "densenet169"
    probe = model_spec("usfmae_linprobe", str(mae_ckpt))
    assert probe.linear_probe and probe.init == str(mae_ckpt) and probe.pretrained
    with pytest.raises(ValueError, match="init: model 'usfmae' starts from a pretrained"):
        model_spec("usfmae")
    with pytest.raises(FileNotFoundError, match="init: .*nope.pth"):
        model_spec("usfmae", str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="models: 'densenet_169' is neither"):
        model_spec("densenet_169")
    with pytest.raises(FileNotFoundError, match="weights: .*missing"):
        model_spec("resnet50", weights={"resnet50": str(tmp_path / "missing.pth")})
    bad = tmp_path / "not_a_vit.pt"
    torch.save({"conv.weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(ValueError, match="init: .* is not a ViT / MAE encoder"):
        build_classifier(model_spec("usfmae", str(bad)), 2, img_size=32)


def test_baseline_with_local_weights_file(tmp_path):
    source = timm.create_model("test_resnet", num_classes=10)
    weights = tmp_path / "test_resnet.pth"
    torch.save(source.state_dict(), weights)
    spec = model_spec("test_resnet", weights={"test_resnet": str(weights)})
    built = build_classifier(spec, 2, img_size=32, in_chans=1)
    # gray: timm sums the RGB filters of the first conv; the old 10-class head is dropped
    torch.testing.assert_close(built.model.conv1[0].weight,
                               source.conv1[0].weight.sum(dim=1, keepdim=True))
    assert built.model.fc.out_features == 2
    assert built.mean == [pytest.approx(np.mean(source.pretrained_cfg["mean"]))]


def test_linear_probe_freezes_encoder_and_saves_a_plain_head(tmp_path, mae_ckpt):
    built = build_classifier(model_spec("usfmae_linprobe", str(mae_ckpt)), 3, img_size=32)
    model = built.model
    assert isinstance(model.head, ProbeHead) and not model.head[0].affine
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.1.weight",
                                                                          "head.1.bias"}
    assert model.norm.weight.requires_grad is False and model.fc_norm.__class__.__name__ == \
        "Identity"  # the pretrained final norm stays (a frozen fc_norm could not learn)
    model.train()
    for _ in range(3):  # batch-norm statistics move away from (0, 1)
        model(torch.randn(8, 1, 32, 32) * 2 + 1)
    assert "head.weight" in classifier_state_dict(model)
    path = save_classifier(built, tmp_path / "probe.safetensors", ["a", "b", "c"], {"fold": 0})
    loaded = load_finetuned(path)
    x = torch.randn(4, 1, 32, 32)
    torch.testing.assert_close(loaded.model(x), model.eval()(x), atol=1e-5, rtol=1e-5)
    assert loaded.classes == ["a", "b", "c"] and loaded.info == {"fold": 0}
    assert (loaded.in_chans, loaded.img_size, loaded.mean) == (1, 32, [0.15])


# ------------------------------------------------------------------------------- training
def test_layer_decay_only_for_pretrained_vits(mae_ckpt):
    cfg = quick_train(layer_decay=0.5)
    pretrained = build_classifier(model_spec("usfmae", str(mae_ckpt)), 2, img_size=32)
    opt = build_finetune_optimizer(pretrained, model_spec("usfmae", str(mae_ckpt)), cfg, lr=1e-3)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert scales == pytest.approx([0.5 ** 3, 0.5 ** 2, 0.5, 1.0])  # embed, 2 blocks, head
    sched = WarmupCosineLR(opt, 1e-3, 0.0, warmup_steps=2, total_steps=10)
    for group in opt.param_groups:  # the schedule keeps each layer's scale
        assert group["lr"] == pytest.approx(sched.lr * group["lr_scale"])
    scratch_spec = model_spec("vit_scratch", str(mae_ckpt))
    scratch = build_classifier(scratch_spec, 2, img_size=32)
    assert all("lr_scale" not in g for g in build_finetune_optimizer(scratch, scratch_spec, cfg,
                                                            1e-3).param_groups)


def test_balanced_sampling_and_weighted_losses():
    labels = np.array([0] * 7 + [1] * 2 + [2] * 3)
    picked = balanced_indices(labels, seed=0)
    assert np.bincount(labels[picked]).tolist() == [7, 7, 7]
    assert set(picked.tolist()) == set(range(12))
    logits, target = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    weight = torch.tensor([0.5, 2.0, 1.0])
    onehot = torch.nn.functional.one_hot(target, 3).float()
    torch.testing.assert_close(soft_target_loss(logits, onehot, weight),
                               torch.nn.functional.cross_entropy(logits, target, weight=weight))
    torch.testing.assert_close(soft_target_loss(logits, onehot),
                               torch.nn.functional.cross_entropy(logits, target))


def test_selection_prefers_auc_then_loss():
    assert _better({"auc": 0.8, "loss": 0.9}, {"auc": 0.7, "loss": 0.1})
    assert _better({"auc": 0.8, "loss": 0.4}, {"auc": 0.8, "loss": 0.5})
    assert not _better({"auc": None, "loss": 0.6}, {"auc": 0.9, "loss": 0.5})


def test_fold_checkpoint_reloads_with_identical_predictions(tmp_path, labelled, mae_ckpt):
    train_idx, val_idx = kfold_splits(labelled.labels, labelled.groups, k=3, seed=0)[0]
    train, val = labelled.subset(train_idx), labelled.subset(val_idx)
    result = train_fold(model_spec("usfmae", str(mae_ckpt)), train, val,
                        quick_train(epochs=3, patience=1), tmp_path / "fold0", seed=5,
                        info={"fold": 0})
    with (tmp_path / "fold0" / "history.csv").open() as f:
        history = list(csv.DictReader(f))
    assert len(history) == len(result.history) <= result.best_epoch + 2  # patience 1
    aucs = [h["select_auc"] for h in result.history]
    assert result.history[result.best_epoch]["select_auc"] == max(aucs)
    with (tmp_path / "fold0" / "select_predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == [val.classes[i] for i in val.labels]
    np.testing.assert_allclose([[float(r[f"prob_{c}"]) for c in val.classes] for r in rows],
                               result.select_probs, atol=1e-6)

    from usfmae_fast.explain.run import load_classifier  # what usfmae-fast scorecam loads
    model = load_classifier(result.checkpoint)
    assert model.pretrained_cfg["mean"] == [0.15] and model.pretrained_cfg["input_size"] == [
        1, 32, 32]
    prep = Preprocess(32, 1, [0.15], [0.2])
    reloaded = predict_probs(model, val.to_image_list(), prep, quick_train())
    np.testing.assert_allclose(reloaded, result.select_probs, atol=1e-5)
    meta = load_finetuned(result.checkpoint).info
    assert meta["fold"] == 0 and meta["seed"] == 5 and meta["epoch"] == result.best_epoch


@pytest.mark.parametrize("options", [dict(imbalance="sampler", mixup=0.8, cutmix=1.0),
                                     dict(imbalance="weights", smoothing=0.0, clip_grad=1.0)])
def test_cnn_baseline_trains_with_imbalance_options(tmp_path, labelled, options):
    keep = np.flatnonzero((labelled.labels != 0) | (np.arange(len(labelled)) % 3 == 0))
    data = labelled.subset(keep)  # class 0 is now a third of the others
    train_idx, val_idx = kfold_splits(data.labels, data.groups, k=2, seed=0)[0]
    result = train_fold(ModelSpec("test_resnet", "test_resnet"), data.subset(train_idx),
                        data.subset(val_idx), quick_train(epochs=1, **options),
                        tmp_path, seed=0)
    assert np.isfinite(result.history[0]["train_loss"])
    assert result.select_probs.shape == (len(val_idx), 3)
    np.testing.assert_allclose(result.select_probs.sum(axis=1), 1.0, atol=1e-5)


def test_fixed_epochs_keep_the_last_and_select_nothing(tmp_path, labelled):
    """Without a selection set every epoch runs (patience unused) and the last one is kept:
    the saved model predicts what the model of the final epoch predicts."""
    result = train_fold(ModelSpec("test_resnet", "test_resnet"), labelled, None,
                        quick_train(epochs=3, patience=1), tmp_path, seed=0)
    assert result.best_epoch == 2 and len(result.history) == 3
    assert result.select_probs is None and all(h["select_auc"] is None for h in result.history)
    assert not (tmp_path / "select_predictions.csv").exists()
    assert load_finetuned(result.checkpoint).info["selection"] == "fixed epochs"


def test_bad_hyper_parameters_name_the_field():
    with pytest.raises(ValueError, match="layer_decay: 1.5 is out of range"):
        TrainConfig(layer_decay=1.5).validate()
    with pytest.raises(ValueError, match="imbalance: 'oversample'"):
        TrainConfig(imbalance="oversample").validate()
    with pytest.raises(ValueError, match="std"):
        TrainConfig(mean=0.2).validate()


def test_densenet_without_drop_path_still_builds():
    """DenseNet's blocks have no stochastic depth: the baseline trains without it, noted."""
    built = build_classifier(model_spec("densenet169"), 3, img_size=32, in_chans=1,
                             drop_path=0.1)
    assert any("no drop path" in note for note in built.notes)
    assert built.model.eval()(torch.zeros(1, 1, 32, 32)).shape == (1, 3)
