"""The analytic MAE FLOP count against torch's FlopCounterMode on the executed model, hand-computed
ViT-B numbers, GPU peaks and MFU."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import requires_cuda
from usfmae_fast.models import mae_vit
from usfmae_fast.pretrain import flops

# odd on purpose: a rectangular grid of 4 x 6 = 24 patches, K = int(24 * 0.4) = 9 kept,
# mlp_ratio 3, different encoder / decoder widths and head counts
TINY = dict(img_size=(32, 48), patch_size=8, in_chans=3, embed_dim=64, depth=2, num_heads=4,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, mlp_ratio=3.0,
            norm_pix_loss=True)


def measured_flops(model, imgs, mask_ratio, backward: bool) -> int:
    with FlopCounterMode(display=False) as counter:
        loss = model(imgs, mask_ratio)[0]
        if backward:
            loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("mask_ratio", [0.6, 0.75, 0.9])
def test_matches_flop_counter(backend, mask_ratio):
    # SDPA's math backend decomposes attention into the two bmm's the analytic count has; the
    # fused CPU kernel is invisible to FlopCounterMode (it has no formula for it)
    backend("torch")
    torch.manual_seed(0)
    model = mae_vit("tiny", **TINY)
    imgs = torch.randn(3, 3, 32, 48)
    with sdpa_kernel(SDPBackend.MATH):
        forward = measured_flops(model, imgs, mask_ratio, backward=False)
        step = measured_flops(model, imgs, mask_ratio, backward=True)
    assert forward == 3 * flops.forward_flops_per_image(model, mask_ratio)
    assert step == 3 * flops.train_flops_per_image(model, mask_ratio)
    # backward = 2x forward, but only 1x for the patch embedding (the image needs no gradient)
    assert step == 3 * forward - 3 * flops.forward_flops_breakdown(model, mask_ratio)["patch_embed"]


@requires_cuda
def test_fused_attention_backward_counts_recompute(backend):
    """FlopCounterMode gives a fused SDPA backward 5 matmuls (it recomputes q k^T) where the model
    count has 4: it counts what the kernel executes, the model count what the model needs."""
    backend("torch")
    model = mae_vit("tiny", **TINY).cuda()
    imgs = torch.randn(3, 3, 32, 48, device="cuda")
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        step = measured_flops(model, imgs, 0.75, backward=True)
    kept = flops.num_kept(24, 0.75)
    scores = (TINY["depth"] * 2 * (kept + 1) ** 2 * TINY["embed_dim"]
              + TINY["decoder_depth"] * 2 * 25 ** 2 * TINY["decoder_embed_dim"])  # q k^T FLOPs
    assert step == 3 * (flops.train_flops_per_image(model, 0.75) + scores)


def test_vit_base_by_hand():
    config = mae_vit("base").config
    # the ViT-B/16 encoder on all 196 patches + cls: 17.56 GMACs, the "17.6 GFLOPs" (really MACs)
    # that timm / fvcore list for vit_base_patch16_224 (which adds a 768 x 1000 head)
    embed = 196 * (16 * 16 * 3) * 768
    encoder_197 = 12 * (197 * (4 * 768 ** 2 + 2 * 768 * 3072) + 2 * 197 ** 2 * 768)
    full = flops.forward_flops_breakdown(config, 0.0)
    assert full["patch_embed"] + full["encoder"] == 2 * (embed + encoder_197)
    assert (embed + encoder_197 + 768 * 1000) / 1e9 == pytest.approx(17.6, abs=0.05)

    # MAE ViT-B/16, 75 % masked: encoder on 49 + 1 tokens, 512 x 8 decoder on 196 + 1
    encoder_50 = 12 * (50 * 12 * 768 ** 2 + 2 * 50 ** 2 * 768)
    decoder = 8 * (197 * 12 * 512 ** 2 + 2 * 197 ** 2 * 512)
    macs = embed + encoder_50 + 50 * 768 * 512 + decoder + 196 * 512 * 768
    assert flops.forward_flops_per_image(config, 0.75) == 2 * macs
    assert flops.train_flops_per_image(config, 0.75) == 6 * macs - 2 * embed
    assert flops.train_flops_per_image(config, 0.75) / 1e9 == pytest.approx(58.45, abs=0.01)


def test_mask_ratio_and_model_checks():
    config = mae_vit("tiny", **TINY).config
    assert flops.num_kept(196, 0.75) == 49 and flops.num_kept(24, 0.6) == 9
    assert flops.forward_flops_per_image(config, 0.9) < flops.forward_flops_per_image(config, 0.5)
    for ratio in (1.0, -0.1):
        with pytest.raises(ValueError, match="mask_ratio"):
            flops.train_flops_per_image(config, ratio)
    with pytest.raises(TypeError, match="MaskedAutoencoderViT"):
        flops.train_flops_per_image(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name, dtype, tf32, expected", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, None, 989e12),
    ("NVIDIA H100 80GB HBM3", torch.float16, None, 989e12),
    ("NVIDIA H100 80GB HBM3", torch.float32, True, 495e12),
    ("NVIDIA H100 80GB HBM3", torch.float32, False, 67e12),
    ("NVIDIA H100 PCIe", torch.bfloat16, None, 756e12),
    ("NVIDIA H100 NVL", torch.bfloat16, None, 835e12),
    ("NVIDIA H200", torch.bfloat16, None, 989e12),
    ("NVIDIA H200 NVL", torch.bfloat16, None, 835e12),
    ("NVIDIA GH200 480GB", torch.bfloat16, None, 989e12),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, None, 312e12),
    ("NVIDIA A100 80GB PCIe", torch.float32, True, 156e12),
    ("NVIDIA A100-PCIE-40GB", torch.float32, False, 19.5e12),
    ("NVIDIA A100-SXM4-40GB", torch.int8, None, None),
    ("Tesla T4", torch.float16, None, None),
])
def test_peak_flops_by_name(name, dtype, tf32, expected):
    assert flops.peak_flops(name, dtype, tf32=tf32) == expected


def test_peak_flops_devices(monkeypatch):
    assert flops.peak_flops("cpu", torch.float32) is None
    assert flops.peak_flops(torch.device("cpu"), torch.bfloat16) is None
    name = "NVIDIA H100 80GB HBM3"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert flops.peak_flops("cuda", torch.bfloat16) == 989e12
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert flops.peak_flops("cuda:0", torch.float32) == 495e12
        torch.set_float32_matmul_precision("highest")
        assert flops.peak_flops(torch.device("cuda", 0), torch.float32) == 67e12
    finally:
        torch.set_float32_matmul_precision(previous)


def test_mfu():
    # 3000 images/s of MAE ViT-B (58.45 GFLOPs each) on an H100 SXM: 17.5 % of 989 TFLOP/s
    per_image = flops.train_flops_per_image(mae_vit("base").config, 0.75)
    assert flops.mfu(3000, per_image, 989e12) == pytest.approx(3000 * per_image / 989e12)
    assert flops.mfu(3000, per_image, 989e12) == pytest.approx(0.1773, abs=1e-4)
    assert flops.mfu(3000, per_image, None) is None
    with pytest.raises(ValueError, match="peak"):
        flops.mfu(1.0, 1.0, 0.0)
