"""MaskedAutoencoderViT against an independent transcription of fb/mae, timm, and itself."""
import json
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from usfmae_fast.models import (PRESETS, MaskedAutoencoderViT, mae_vit, mae_vit_base_patch16,
                                sincos_2d, timm_kwargs, to_timm_state_dict)

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
            decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4)
SHAPES = [dict(), dict(in_chans=1), dict(img_size=(32, 48), in_chans=1), dict(img_size=(40, 24))]


def tiny(**overrides):
    torch.manual_seed(0)
    return MaskedAutoencoderViT(**{**TINY, **overrides}).eval()


def images(model, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, model.in_chans, *model.patch_embed.img_size, generator=g)


# ---------------------------------------------------------------- independent fb/mae semantics
def np_sincos_1d(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def np_sincos_2d(embed_dim, grid_h_size, grid_w_size, cls_token=False):
    """fb/mae util/pos_embed.py get_2d_sincos_pos_embed, with grid_h_size rows, grid_w_size cols."""
    grid_h = np.arange(grid_h_size, dtype=np.float32)
    grid_w = np.arange(grid_w_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_h_size, grid_w_size])
    emb = np.concatenate([np_sincos_1d(embed_dim // 2, grid[0]),
                          np_sincos_1d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


def ref_patchify(imgs, p):
    n, c, h, w = imgs.shape
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def ref_block(x, sd, prefix, heads):
    def ln(t, name):
        return F.layer_norm(t, t.shape[-1:], sd[f"{prefix}{name}.weight"],
                            sd[f"{prefix}{name}.bias"], eps=1e-6)

    def linear(t, name):
        return t @ sd[f"{prefix}{name}.weight"].T + sd[f"{prefix}{name}.bias"]

    b, n, c = x.shape
    qkv = linear(ln(x, "norm1"), "attn.qkv").reshape(b, n, 3, heads, c // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
    x = x + linear((attn @ v).transpose(1, 2).reshape(b, n, c), "attn.proj")
    h = linear(ln(x, "norm2"), "mlp.fc1")
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return x + linear(h, "mlp.fc2")


def ref_forward(sd, cfg, imgs, mask_ratio, noise):
    """fb/mae MaskedAutoencoderViT.forward written out with plain tensor ops."""
    p, c = cfg["patch_size"], cfg["in_chans"]
    sd = {k: v.detach() for k, v in sd.items()}
    lin = lambda t, name: t @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]  # noqa: E731
    ln = lambda t, name: F.layer_norm(t, t.shape[-1:], sd[f"{name}.weight"],  # noqa: E731
                                      sd[f"{name}.bias"], eps=1e-6)
    # patch embedding as a linear map on (C, p, p)-ordered patch pixels
    n, _, h, w = imgs.shape
    patches = imgs.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(n, (h // p) * (w // p), c * p * p)
    x = patches @ sd["patch_embed.proj.weight"].reshape(-1, c * p * p).T
    x = x + sd["patch_embed.proj.bias"] + sd["pos_embed"][:, 1:, :]
    length, dim = x.shape[1:]
    keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, dim))
    mask = torch.ones(n, length)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    cls = (sd["cls_token"] + sd["pos_embed"][:, :1, :]).expand(n, -1, -1)
    x = torch.cat([cls, x], dim=1)
    for i in range(cfg["depth"]):
        x = ref_block(x, sd, f"blocks.{i}.", cfg["num_heads"])
    x = lin(ln(x, "norm"), "decoder_embed")
    mask_tokens = sd["mask_token"].repeat(n, length + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1) + sd["decoder_pos_embed"]
    for i in range(cfg["decoder_depth"]):
        x = ref_block(x, sd, f"decoder_blocks.{i}.", cfg["decoder_num_heads"])
    pred = lin(ln(x, "decoder_norm"), "decoder_pred")[:, 1:, :]
    target = ref_patchify(imgs, p)
    if cfg["norm_pix_loss"]:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum(), pred, mask


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("norm_pix_loss", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_fbmae_reference(shape, norm_pix_loss):
    model = tiny(norm_pix_loss=norm_pix_loss, **shape)
    imgs = images(model)
    noise = torch.rand(imgs.shape[0], model.patch_embed.num_patches,
                       generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        loss, pred, mask = model(imgs, mask_ratio=0.6, noise=noise)
        ref_loss, ref_pred, ref_mask = ref_forward(model.state_dict(), model.config, imgs, 0.6,
                                                   noise)
    torch.testing.assert_close(mask, ref_mask, rtol=0, atol=0)
    torch.testing.assert_close(pred, ref_pred, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert mask.sum(1).eq(model.patch_embed.num_patches - int(mask.shape[1] * 0.4)).all()


def test_forward_shapes_and_random_masking():
    model = tiny()
    loss, pred, mask = model(images(model, n=4))  # noise drawn inside
    assert loss.dim() == 0 and pred.shape == (4, 16, 8 * 8 * 3) and mask.shape == (4, 16)
    assert pred.is_contiguous() and mask.sum(1).eq(12).all()
    latent, _, ids_restore = model.forward_encoder(images(model, n=4), mask_ratio=0.5)
    assert latent.shape == (4, 1 + 8, 64) and ids_restore.dtype == torch.int64


def test_channels_last_input_gives_same_result():
    model = tiny()
    imgs = images(model)
    noise = torch.rand(3, 16)
    with torch.no_grad():
        expected = model(imgs, noise=noise)
        got = model(imgs.to(memory_format=torch.channels_last), noise=noise)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_features_equals_timm(shape):
    model = tiny(**shape)
    vit = timm.models.VisionTransformer(**timm_kwargs(model.config)).eval()
    vit.load_state_dict(to_timm_state_dict(model), strict=True)
    imgs = images(model)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(imgs), vit.forward_features(imgs),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (7, 2)])
def test_sincos_matches_fbmae_numpy(grid):
    expected = torch.from_numpy(np_sincos_2d(64, *grid, cls_token=True)).float()
    torch.testing.assert_close(sincos_2d(64, grid, cls_token=True), expected,
                               rtol=1e-6, atol=1e-6)
    model = tiny(img_size=(grid[0] * 8, grid[1] * 8))
    torch.testing.assert_close(model.pos_embed[0], expected)
    torch.testing.assert_close(model.decoder_pos_embed[0],
                               torch.from_numpy(np_sincos_2d(32, *grid, cls_token=True)).float())


def test_sincos_first_half_encodes_column():
    emb = sincos_2d(8, (2, 3))  # no cls
    assert torch.equal(emb[0, :4], emb[3, :4])  # same column, other row
    assert torch.equal(emb[0, 4:], emb[1, 4:])  # same row, other column
    assert not torch.equal(emb[0, :4], emb[1, :4])


def test_init_follows_fbmae():
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(img_size=64, patch_size=8, embed_dim=256, depth=2, num_heads=4,
                                 decoder_embed_dim=256, decoder_depth=1, decoder_num_heads=4)
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert model.pos_embed[0, 0].abs().max() == 0  # cls position
    for name, token in (("cls_token", model.cls_token), ("mask_token", model.mask_token)):
        assert abs(token.std().item() - 0.02) < 0.004, name
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            fan_out, fan_in = module.weight.shape
            bound = math.sqrt(6 / (fan_in + fan_out))
            assert module.weight.abs().max() <= bound, name
            assert abs(module.weight.std().item() / (bound / math.sqrt(3)) - 1) < 0.1, name
            assert module.bias.abs().max() == 0, name
        elif isinstance(module, torch.nn.LayerNorm):
            assert module.eps == 1e-6 and module.weight.eq(1).all() and module.bias.eq(0).all()
    w = model.patch_embed.proj.weight
    bound = math.sqrt(6 / (w.shape[0] + w[0].numel()))  # xavier on the [D, C*p*p] view
    assert w.abs().max() <= bound and abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.1
    # the conv bias keeps PyTorch's default init, as in fb/mae
    assert 0 < model.patch_embed.proj.bias.abs().max() <= 1 / math.sqrt(w[0].numel())


def test_gradients_reach_encoder_and_decoder_not_pos_embed():
    model = tiny(norm_pix_loss=True).train()
    loss, _, _ = model(images(model), mask_ratio=0.75)
    loss.backward()
    assert model.pos_embed.grad is None and model.decoder_pos_embed.grad is None
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
            assert param.grad.abs().sum() > 0, name


def test_drop_path_is_active_in_training_only():
    model = tiny(drop_path_rate=0.5)
    assert type(model.blocks[1].drop_path).__name__ == "DropPath"
    imgs = images(model)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(imgs), model.forward_features(imgs))
        model.train()
        assert not torch.allclose(model.forward_features(imgs), model.eval().forward_features(imgs))


def test_presets_match_timm_vit_sizes():
    for size in PRESETS:
        with torch.device("meta"):
            model = mae_vit(size)
            vit = timm.models.VisionTransformer(**timm_kwargs(model.config), weight_init="skip")
        assert model.config["decoder_embed_dim"] == 512 and model.config["decoder_depth"] == 8
        assert model.config["decoder_num_heads"] == 16 and model.config["img_size"] == 224
        encoder = to_timm_state_dict(model)
        assert {k: v.shape for k, v in encoder.items()} == \
               {k: v.shape for k, v in vit.state_dict().items()}, size
    with torch.device("meta"):
        model = mae_vit_base_patch16(img_size=(224, 320), in_chans=1)
    assert model.config["img_size"] == [224, 320] and model.grid_size == (14, 20)


def test_config_rebuilds_the_same_model():
    model = tiny(img_size=(32, 48), in_chans=1, norm_pix_loss=True)
    clone = MaskedAutoencoderViT(**json.loads(json.dumps(model.config)))
    assert clone.config == model.config
    assert {k: v.shape for k, v in clone.state_dict().items()} == \
           {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("bad, exc, word", [
    ("not a tensor", TypeError, "imgs"),
    (torch.zeros(2, 3, 32, 32, dtype=torch.int64), TypeError, "imgs"),
    (torch.zeros(3, 32, 32), ValueError, "imgs"),
    (torch.zeros(2, 1, 32, 32), ValueError, "imgs"),
    (torch.zeros(2, 3, 32, 40), ValueError, "imgs"),
])
def test_bad_images_are_named(bad, exc, word):
    model = tiny()
    for fn in (model, model.forward_features, model.forward_encoder):
        with pytest.raises(exc, match=word):
            fn(bad)


def test_bad_masking_arguments_are_named():
    model = tiny()
    imgs = images(model)
    for ratio in (0.0, 1.0, -0.5, "0.5"):
        with pytest.raises(ValueError, match="mask_ratio"):
            model(imgs, mask_ratio=ratio)
    with pytest.raises(ValueError, match="noise"):
        model(imgs, noise=torch.rand(3, 15))


@pytest.mark.parametrize("kwargs, word", [
    (dict(img_size=30), "img_size"), (dict(img_size=(32, 0)), "img_size"),
    (dict(img_size="32"), "img_size"), (dict(patch_size=0), "patch_size"),
    (dict(in_chans=0), "in_chans"), (dict(num_heads=5), "num_heads"),
    (dict(decoder_num_heads=5), "decoder_num_heads"),
    (dict(embed_dim=66, num_heads=6), "embed_dim"),
    (dict(depth=1.5), "depth"),
])
def test_bad_constructor_arguments_are_named(kwargs, word):
    with pytest.raises((ValueError, TypeError), match=word):
        MaskedAutoencoderViT(**{**TINY, **kwargs})


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="size"):
        mae_vit("gigantic")


def test_torch_compile_matches_eager():
    model = tiny(img_size=(32, 48), in_chans=1, norm_pix_loss=True)
    imgs = images(model, n=2)
    noise = torch.rand(2, model.patch_embed.num_patches)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        expected = model(imgs, noise=noise)
        got = compiled(imgs, noise=noise)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
