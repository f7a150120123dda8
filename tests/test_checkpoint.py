"""Checkpoint formats, safety, conversions and the timm export."""
import argparse
import json
import os

import pytest
import safetensors
import timm
import torch
import torch.nn.functional as F

from usfmae_fast.models import (MaskedAutoencoderViT, export_timm, gray_patch_embed,
                                interpolate_pos_embed, load_checkpoint, load_model,
                                load_state_dict, read_checkpoint, save_safetensors, timm_kwargs,
                                to_grayscale)
from usfmae_fast.models.checkpoint import IMAGENET_MEAN, IMAGENET_STD

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
            decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4)


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return MaskedAutoencoderViT(**{**TINY, **overrides}).eval()


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def fbmae_training_checkpoint(model):
    """What fb/mae util/misc.py save_model writes."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    args = argparse.Namespace(model="mae_vit_tiny_patch16", input_size=32, norm_pix_loss=True,
                              mask_ratio=0.75, output_dir="./out")
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3,
            "scaler": torch.amp.GradScaler("cpu").state_dict(), "args": args}


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ---------------------------------------------------------------- reading
def test_fbmae_training_checkpoint_with_namespace_loads(tmp_path):
    source = tiny(seed=1, norm_pix_loss=True)
    path = tmp_path / "checkpoint-3.pth"
    torch.save(fbmae_training_checkpoint(source), path)
    state_dict, config = read_checkpoint(path)
    assert config == {"norm_pix_loss": True} and state_dict.keys() == source.state_dict().keys()
    assert_same_weights(load_checkpoint(tiny(), path), source)
    rebuilt = load_model(path, num_heads=4, decoder_num_heads=4)  # heads are not in weights
    assert_same_weights(rebuilt, source)
    assert rebuilt.config == source.config


def test_raw_state_dict_with_ddp_prefix_loads(tmp_path):
    source = tiny(seed=2)
    path = tmp_path / "usf_mae.pt"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    assert_same_weights(load_checkpoint(tiny(), path), source)
    compiled_ddp = {f"_orig_mod.module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": compiled_ddp}, path)
    assert_same_weights(load_checkpoint(tiny(), path), source)


def test_malicious_pickle_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": tiny().state_dict(), "payload": Exploit(marker)}, path)
    for load in (read_checkpoint, lambda p: load_checkpoint(tiny(), p), load_model):
        with pytest.raises(ValueError, match="untrusted") as info:
            load(path)
        assert "evil.pth" in str(info.value)
    assert not marker.exists()


def test_file_without_state_dict_is_named(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"epoch": 3, "notes": "no weights"}, path)
    with pytest.raises(ValueError, match="odd.pt.*no state dict"):
        read_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        read_checkpoint(tmp_path / "missing.pth")


# ---------------------------------------------------------------- strict loading
def test_key_problems_are_all_listed():
    model = tiny()
    state_dict = dict(model.state_dict())
    del state_dict["norm.weight"]
    state_dict["head.weight"] = torch.zeros(2, 64)
    state_dict["pos_embed"] = torch.zeros(1, 5, 64)
    with pytest.raises(ValueError) as info:
        load_state_dict(model, state_dict)
    message = str(info.value)
    assert "missing keys (1): norm.weight" in message
    assert "unexpected keys (1): head.weight" in message
    assert "pos_embed: checkpoint (1, 5, 64) vs model (1, 17, 64)" in message


def test_encoder_only_checkpoint_needs_the_flag(tmp_path):
    source = tiny(seed=3)
    encoder = {k: v for k, v in source.state_dict().items()
               if not k.startswith(("decoder_", "mask_token"))}
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": encoder}, path)
    target = tiny(seed=4)
    decoder_before = target.decoder_pred.weight.clone()
    with pytest.raises(ValueError, match="encoder_only=True"):
        load_checkpoint(target, path)
    load_checkpoint(target, path, encoder_only=True)
    for k, v in encoder.items():
        assert torch.equal(target.state_dict()[k], v), k
    assert torch.equal(target.decoder_pred.weight, decoder_before)
    with pytest.raises(ValueError, match="missing keys"):  # encoder keys stay required
        load_state_dict(tiny(), {k: v for k, v in encoder.items() if k != "norm.bias"},
                        encoder_only=True)
    images = torch.randn(2, 3, 32, 32)
    rebuilt = load_model(path, encoder_only=True, num_heads=4)
    torch.testing.assert_close(rebuilt.forward_features(images), source.forward_features(images))


# ---------------------------------------------------------------- safetensors
def test_safetensors_round_trip_is_exact(tmp_path):
    source = tiny(seed=5, img_size=(32, 48), in_chans=1, norm_pix_loss=True)
    path = save_safetensors(source, tmp_path / "run" / "model.safetensors", {"epoch": "7"})
    assert sorted(os.listdir(path.parent)) == ["model.safetensors"]  # no temp file left
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["epoch"] == "7" and json.loads(metadata["usfmae_config"]) == source.config
    rebuilt = load_model(path)
    assert rebuilt.config == source.config
    assert_same_weights(rebuilt, source)
    assert_same_weights(load_checkpoint(tiny(img_size=(32, 48), in_chans=1), path), source)


def test_safetensors_config_from_json_beside_it(tmp_path):
    source = tiny(seed=6, img_size=(24, 40))
    path = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in source.state_dict().items()},
                                str(path))
    path.with_suffix(".json").write_text(json.dumps(source.config))
    assert_same_weights(load_model(path), source)


def test_failed_save_leaves_old_file(tmp_path, monkeypatch):
    path = save_safetensors(tiny(), tmp_path / "m.safetensors")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_safetensors(tiny(seed=9), path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.safetensors"]


# ---------------------------------------------------------------- conversions
def fbmae_interpolate(pos_embed, new_size):
    """fb/mae util/pos_embed.py interpolate_pos_embed, on a tensor."""
    extra, pos_tokens = pos_embed[:, :1], pos_embed[:, 1:]
    orig = int(pos_tokens.shape[1] ** 0.5)
    pos_tokens = pos_tokens.reshape(-1, orig, orig, pos_embed.shape[-1]).permute(0, 3, 1, 2)
    pos_tokens = F.interpolate(pos_tokens, size=(new_size, new_size), mode="bicubic",
                               align_corners=False)
    return torch.cat((extra, pos_tokens.permute(0, 2, 3, 1).flatten(1, 2)), dim=1)


def test_pos_embed_interpolation(tmp_path):
    state_dict = tiny().state_dict()
    same = interpolate_pos_embed(state_dict, (4, 4))
    assert same["pos_embed"] is state_dict["pos_embed"]
    bigger = interpolate_pos_embed(state_dict, (6, 6))
    torch.testing.assert_close(bigger["pos_embed"], fbmae_interpolate(state_dict["pos_embed"], 6))
    assert bigger["decoder_pos_embed"].shape == (1, 37, 32)
    assert torch.equal(bigger["pos_embed"][:, 0], state_dict["pos_embed"][:, 0])  # cls kept
    rect = interpolate_pos_embed(state_dict, (3, 5))
    assert rect["pos_embed"].shape == (1, 16, 64)
    back = interpolate_pos_embed(rect, (4, 4), old_grid=(3, 5))
    assert back["pos_embed"].shape == (1, 17, 64)
    with pytest.raises(ValueError, match="old_grid"):
        interpolate_pos_embed(rect, (4, 4))
    # a checkpoint for 32 px loads into a 48 px model, resampled; load_model can do the same
    path = save_safetensors(tiny(seed=7), tmp_path / "m.safetensors")
    model = load_checkpoint(tiny(img_size=48), path)
    torch.testing.assert_close(model.pos_embed, bigger["pos_embed"])
    assert load_model(path, img_size=(40, 24)).pos_embed.shape == (1, 16, 64)


@pytest.mark.parametrize("gray_mean, gray_std", [(0.0, 1.0), (0.3, 0.2)])
def test_gray_patch_embed_is_exact(gray_mean, gray_std):
    torch.manual_seed(0)
    conv3 = torch.nn.Conv2d(3, 64, 8, 8).double()
    gray = torch.rand(2, 1, 32, 48, dtype=torch.float64)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    expected = conv3((gray.expand(-1, 3, -1, -1) - mean) / std)
    weight, bias = gray_patch_embed(conv3.weight, conv3.bias, IMAGENET_MEAN, IMAGENET_STD,
                                    gray_mean, gray_std)
    assert weight.shape == (64, 1, 8, 8)
    got = F.conv2d((gray - gray_mean) / gray_std, weight, bias, stride=8)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="len\\(mean\\)"):
        gray_patch_embed(conv3.weight, conv3.bias, (0.5,), (0.5,))


def test_to_grayscale_model_features_and_prediction_are_exact():
    source = tiny(seed=8).double()
    gray_model = MaskedAutoencoderViT(**{**source.config, "in_chans": 1}).double().eval()
    load_state_dict(gray_model, to_grayscale(source.state_dict(), gray_mean=0.5, gray_std=0.25))
    gray = torch.rand(2, 1, 32, 32, dtype=torch.float64)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    rgb = (gray.expand(-1, 3, -1, -1) - mean) / std
    gray_in = (gray - 0.5) / 0.25
    with torch.no_grad():
        torch.testing.assert_close(gray_model.forward_features(gray_in),
                                   source.forward_features(rgb))
        noise = torch.rand(2, 16, dtype=torch.float64)
        _, pred3, _ = source(rgb, noise=noise)
        _, pred1, _ = gray_model(gray_in, noise=noise)
    # the gray prediction is the 3 channel prediction de-normalised, averaged, re-normalised
    pixels = pred3.view(2, 16, 64, 3) * std.view(3) + mean.view(3)
    torch.testing.assert_close(pred1, (pixels.mean(-1) - 0.5) / 0.25)


# ---------------------------------------------------------------- timm
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_create_model_from_export_gives_identical_features(tmp_path, suffix):
    model = tiny(seed=10, img_size=(32, 48), in_chans=1)
    path = export_timm(model, tmp_path / f"encoder{suffix}")
    kwargs = {k: v for k, v in timm_kwargs(model.config).items() if k != "fc_norm"}
    vit = timm.create_model("usfmae_vit_tiny_patch16_224", checkpoint_path=str(path),
                            **kwargs).eval()
    images = torch.randn(2, 1, 32, 48)
    with torch.no_grad():
        expected = model.forward_features(images)
        torch.testing.assert_close(vit.forward_features(images), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vit(images), expected[:, 0], rtol=1e-5, atol=1e-5)
        avg = timm.create_model("usfmae_vit_tiny_patch16_224", checkpoint_path=str(path),
                                global_pool="avg", **kwargs).eval()
        torch.testing.assert_close(avg(images), expected[:, 1:].mean(1), rtol=1e-5, atol=1e-5)
        head = timm.create_model("usfmae_vit_tiny_patch16_224", pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(path)),
                                 **{**kwargs, "num_classes": 2}).eval()
        assert head(images).shape == (2, 2)
        torch.testing.assert_close(head.forward_features(images), expected, rtol=1e-5, atol=1e-5)


def test_registered_timm_names_build():
    names = timm.list_models("usfmae_vit_*")
    assert set(names) >= {"usfmae_vit_tiny_patch16_224", "usfmae_vit_small_patch16_224",
                          "usfmae_vit_base_patch16_224", "usfmae_vit_large_patch16_224",
                          "usfmae_vit_huge_patch14_224"}
    vit = timm.create_model("usfmae_vit_tiny_patch16_224")
    assert vit.num_classes == 0 and vit.embed_dim == 192 and vit.patch_embed.proj.stride == (16, 16)
    assert vit.norm.eps == 1e-6
