"""usfmae_fast.accelerate: timm ViTs and an fb/mae-style MAE give the original model's outputs
and gradients through our ops, and fall back to the original forward where ours cannot serve."""
import copy
import pickle
import sys
import warnings

import pytest
import timm
import torch
from timm.models.vision_transformer import Attention, VisionTransformer
from torch import nn

import usfmae_fast.models  # registers the usfmae_vit_* names with timm
from conftest import ROOT, usable_backends
from usfmae_fast import accelerate, ops
from usfmae_fast.ops.triton import _utils as triton_utils

sys.path.insert(0, str(ROOT / "benchmarks"))
from baselines import FbMaskedAutoencoderViT  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-4)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of ops.attention_packed (what the accelerated attention must run)."""
    counter = {"attention_packed": 0}
    original = ops.attention_packed

    def spy(*args, **kwargs):
        counter["attention_packed"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(ops, "attention_packed", spy)
    return counter


def small_vit(**kwargs):
    # 8 x 8 patches + cls = 65 tokens (odd), head dim 32
    return VisionTransformer(img_size=64, patch_size=8, embed_dim=96, depth=2, num_heads=3,
                             num_classes=5, **kwargs)


def _forward_backward(model, x, seed=0, run=None):
    """Output and named parameter gradients of one forward (through ``run``, default ``model``)
    and backward from RNG state ``seed``."""
    torch.manual_seed(seed)
    out = (model if run is None else run)(x)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _accelerated_copy(model):
    """(accelerated deep copy, original); checks the copy keeps its parameters and state_dict."""
    fast = copy.deepcopy(model)
    params = list(fast.parameters())
    assert accelerate(fast) is fast
    assert [id(p) for p in fast.parameters()] == [id(p) for p in params]
    expected, got = model.state_dict(), fast.state_dict()
    assert list(got) == list(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    return fast, model


def _assert_grads_close(grads, ref_grads):
    # A gradient sums over every token and layer: fp32 rounding puts the original itself ~1e-6
    # of a gradient's largest entry off its fp64 value (deit_tiny cls_token: 7e-5 at 58), more
    # than an elementwise rtol allows on its small entries. So the error is bounded normwise.
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        err = (grads[name] - ref).abs().max().item()
        assert err <= 1e-5 * ref.abs().max().item() + 1e-5, f"{name}: max error {err:.3g}"


def _assert_same_training_step(fast, model, x, seed=0, run=None):
    fast.train(), model.train()
    out, grads = _forward_backward(fast, x, seed, run)
    ref_out, ref_grads = _forward_backward(model, x, seed)
    torch.testing.assert_close(out, ref_out, **TOL)
    _assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("backend_name", usable_backends("attention_packed"))
def test_small_vit_matches_original_on_every_backend(backend, backend_name, calls):
    backend(backend_name)
    # dropout and drop path draw random numbers: equal results need the same RNG use as timm
    fast, model = _accelerated_copy(small_vit(proj_drop_rate=0.1, drop_path_rate=0.1))
    assert fast._usfmae_accelerated == {"attention": 2, "random_masking": False,
                                        "forward_loss": False}
    assert type(fast.blocks[0].attn).__name__ == "FastAttention"
    assert isinstance(fast.blocks[0].attn, Attention)
    x = torch.randn(2, 3, 64, 64)
    _assert_same_training_step(fast, model, x, seed=1)
    assert calls["attention_packed"] == 2
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(x), model.eval()(x), **TOL)
    assert calls["attention_packed"] == 4


# 197 and 50 tokens; batch 1 keeps vit_base at a CPU-friendly cost
@pytest.mark.parametrize("name, img_size", [("deit_tiny_patch16_224", 224),
                                            ("usfmae_vit_tiny_patch16_224", 112),
                                            ("vit_base_patch16_224", 224)])
def test_timm_models_match_original(name, img_size, calls):
    torch.manual_seed(0)
    fast, model = _accelerated_copy(timm.create_model(name, pretrained=False, img_size=img_size))
    depth = len(model.blocks)
    assert fast._usfmae_accelerated["attention"] == depth
    x = torch.randn(1, 3, img_size, img_size)
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(x), model.eval()(x), **TOL)
    assert calls["attention_packed"] == depth
    _assert_same_training_step(fast, model, x)
    assert calls["attention_packed"] == 2 * depth


def test_attention_mask_causal_and_qk_norm_run_the_original(calls):
    fast, model = _accelerated_copy(small_vit().eval())
    x = torch.randn(2, 3, 64, 64)
    attn_mask = torch.rand(2, 1, 65, 65) > 0.3
    attn_mask[..., 0] = True  # every query sees the cls token
    with torch.no_grad():
        torch.testing.assert_close(fast.forward_features(x, attn_mask=attn_mask),
                                   model.forward_features(x, attn_mask=attn_mask), **TOL)
        tokens = torch.randn(2, 65, 96)
        torch.testing.assert_close(fast.blocks[0].attn(tokens, is_causal=True),
                                   model.blocks[0].attn(tokens, is_causal=True), **TOL)
    assert calls["attention_packed"] == 0
    fast, model = _accelerated_copy(small_vit(qk_norm=True))
    _assert_same_training_step(fast, model, x)
    assert calls["attention_packed"] == 0


def test_attention_dropout_runs_the_original_while_training(calls):
    fast, model = _accelerated_copy(small_vit(attn_drop_rate=0.2))
    x = torch.randn(2, 3, 64, 64)
    _assert_same_training_step(fast, model, x)
    assert calls["attention_packed"] == 0
    with torch.no_grad():  # no dropout in eval mode: ours again
        torch.testing.assert_close(fast.eval()(x), model.eval()(x), **TOL)
    assert calls["attention_packed"] == 2


def test_scale_norm_and_gate_stay_on_our_op(calls):
    torch.manual_seed(0)
    attn = Attention(64, num_heads=2, qkv_bias=True, scale_norm=True, gated=True,
                     norm_layer=nn.LayerNorm)
    nn.init.normal_(attn.norm.weight)
    fast, model = _accelerated_copy(attn)
    x = torch.randn(3, 17, 64, requires_grad=True)
    torch.testing.assert_close(fast(x), model(x), **TOL)
    assert calls["attention_packed"] == 1


@pytest.mark.skipif("triton" not in usable_backends("attention_packed"),
                    reason=f"triton backend unusable: {triton_utils.unavailable()}")
@pytest.mark.parametrize("dtype, head_dim", [(torch.float64, 32), (torch.float32, 288)])
def test_what_the_backend_cannot_take_runs_the_original(backend, calls, dtype, head_dim):
    backend("triton")  # takes fp32/fp16/bf16 and head_dim <= 256
    attn = Attention(64, num_heads=2, attn_head_dim=head_dim, qkv_bias=True).to(dtype)
    fast, model = _accelerated_copy(attn)
    x = torch.randn(2, 9, 64, dtype=dtype)
    torch.testing.assert_close(fast(x), model(x))
    assert calls["attention_packed"] == 0
    backend("torch")
    torch.testing.assert_close(fast(x), model(x))
    assert calls["attention_packed"] == 1


class OldTimmAttention(nn.Module):
    """The timm 0.3 attention that fb/mae builds on: manual softmax, forward(x) only."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        weights = self.attn_drop((q @ k.transpose(-2, -1) * self.scale).softmax(-1))
        return self.proj_drop(self.proj((weights @ v).transpose(1, 2).reshape(b, n, c)))


class RelativeBiasAttention(OldTimmAttention):
    """Same layout plus a bias of its own: not the math of our op, must be left alone."""

    def __init__(self, dim, num_heads):
        super().__init__(dim, num_heads)
        self.bias = nn.Parameter(torch.randn(num_heads, 1, 1))


def test_old_timm_style_attention_is_recognised(calls):
    fast, model = _accelerated_copy(nn.Sequential(OldTimmAttention(64, 2), nn.LayerNorm(64)))
    assert fast._usfmae_accelerated["attention"] == 1
    x = torch.randn(2, 11, 64)
    torch.testing.assert_close(fast(x), model(x), **TOL)
    assert calls["attention_packed"] == 1
    with pytest.warns(UserWarning, match="nothing to accelerate"):
        accelerate(RelativeBiasAttention(64, 2))


def fb_mae(norm_pix_loss: bool):
    """A small fb/mae MAE: the benchmarks' baseline (fb/mae's models_mae.py written out)."""
    return FbMaskedAutoencoderViT(img_size=40, patch_size=8, in_chans=3, embed_dim=64, depth=1,
                                  num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                                  decoder_num_heads=1, norm_pix_loss=norm_pix_loss)


def _mae_step(model, imgs):
    """fb/mae's forward, step by step, to see ids_restore too."""
    latent, mask, ids_restore = model.forward_encoder(imgs, 0.75)
    pred = model.forward_decoder(latent, ids_restore)
    return model.forward_loss(imgs, pred, mask), pred, mask, ids_restore


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_fb_mae_masking_and_loss_match_original(norm_pix_loss, calls):
    torch.manual_seed(0)
    fast, model = _accelerated_copy(fb_mae(norm_pix_loss))
    assert fast._usfmae_accelerated == {"attention": 2, "random_masking": True,
                                        "forward_loss": True}
    imgs = torch.randn(3, 3, 40, 40)  # 25 patches, 6 kept
    results = []
    for m in (fast, model):
        torch.manual_seed(7)
        loss, pred, mask, ids_restore = _mae_step(m, imgs)
        loss.backward()
        results.append((loss, pred, mask, ids_restore,
                        {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (loss, pred, mask, ids, grads), (ref_loss, ref_pred, ref_mask, ref_ids, ref_grads) = results
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)
    assert mask.dtype == ref_mask.dtype
    torch.testing.assert_close(pred, ref_pred, **TOL)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    _assert_grads_close(grads, ref_grads)
    assert calls["attention_packed"] == 2
    # mask_ratio 0 keeps every patch in fb/mae; ours refuses it, so the original runs
    x = torch.randn(2, 25, 64)
    torch.manual_seed(3)
    got = fast.random_masking(x, 0.0)
    torch.manual_seed(3)
    for g, e in zip(got, model.random_masking(x, 0.0)):
        assert torch.equal(g, e)
    restored = pickle.loads(pickle.dumps(fast))  # keeps the acceleration
    assert restored._usfmae_accelerated == fast._usfmae_accelerated
    assert restored.random_masking.func is fast.random_masking.func
    assert restored.random_masking.args[0] is restored


@pytest.mark.slow
def test_torch_compile_of_accelerated_vit_matches_original(calls):
    fast, model = _accelerated_copy(small_vit())
    compiled = torch.compile(fast, backend="aot_eager")
    x = torch.randn(2, 3, 64, 64)
    _assert_same_training_step(fast, model, x, run=compiled)
    assert calls["attention_packed"] == 2  # traced once, through our op


def test_accelerate_is_idempotent_and_pickles():
    model = accelerate(small_vit())
    classes = [type(m) for m in model.modules()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an accelerated model has something: no warning
        assert accelerate(model) is model
    assert [type(m) for m in model.modules()] == classes
    assert model._usfmae_accelerated["attention"] == 2
    restored = pickle.loads(pickle.dumps(model))
    assert type(restored.blocks[1].attn) is type(model.blocks[1].attn)


def test_switches_and_bad_input():
    with pytest.raises(TypeError, match="model"):
        accelerate("vit_base_patch16_224")
    with pytest.warns(UserWarning, match="nothing to accelerate"):
        accelerate(nn.Sequential(nn.Linear(4, 4)))
    with pytest.warns(UserWarning, match="nothing to accelerate"):  # ours runs our ops already
        accelerate(usfmae_fast.models.mae_vit("tiny", depth=1, decoder_depth=1))
    model = accelerate(fb_mae(False), attention=False, loss=False)
    assert model._usfmae_accelerated == {"attention": 0, "random_masking": True,
                                         "forward_loss": False}
