"""End-to-end MAE pretraining step (forward + backward + AdamW step) in images/s, model TFLOP/s,
MFU and peak memory: fb/mae's model as published against ours with each backend, side by side
in one run.

    .venv/bin/python -m pytest benchmarks/bench_pretrain.py --benchmark-json=out.json

Workload: MAE ViT-B/16 (768 x 12, 12 heads) with the 512 x 8 decoder (16 heads), 3 x 224 x 224
images, mask ratio 0.75, norm_pix_loss; batch 256 on CUDA, 2 on CPU (the same per-image work at
the real token counts, 50 and 197; the CPU run takes 1-3 minutes on an idle 2-core machine). One
random batch stays on the device: data loading is not part of the step (bench_data.py times it).

Variants (every one the same model size, parameter names and loss, checked by
``test_baseline_matches_ours``):
  fbmae-eager          fb/mae ``models_mae.py`` on timm blocks, attention written out as
                       ``softmax(q k^T) v`` (benchmarks/baselines.py); fp16 autocast + GradScaler
                       as fb/mae's ``main_pretrain.py`` (fp32 on CPU)
  fbmae-sdpa-compile   the same with timm's SDPA attention, under ``torch.compile``
  ours-<backend>       ``MaskedAutoencoderViT(**MODEL)`` (``mae_vit("base", norm_pix_loss=True)``)
                       with ``ops.set_backend(backend)``, bf16 autocast (fp32 on CPU), eager
                       and ``-compile``
AdamW (betas 0.9 / 0.95, weight decay 0.05, ``fused=True`` on CUDA) for all. Compiled variants
skip on CPU unless BENCH_PRETRAIN_CPU_COMPILE=1: the first compiled step (ours-cpu) took 110 s
on the 2-core development machine. ``extra_info`` holds images_per_s, flops_per_image (model FLOPs,
``usfmae_fast.pretrain.flops``), tflop_s, mfu (against the GPU's datasheet dense peak; None on a
CPU), and peak_memory_bytes: ``torch.cuda.max_memory_allocated`` over the timed steps on CUDA;
on CPU the growth of the process's peak RSS over its RSS before the model was built.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from baselines import FbMaskedAutoencoderViT
from conftest import DEVICES, DTYPES, usable_backends
from usfmae_fast.models import MaskedAutoencoderViT
from usfmae_fast.pretrain import flops

MODEL = dict(img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
             decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
             norm_pix_loss=True)
MASK_RATIO = 0.75
BATCH = {"cuda": 256, "cpu": 2}
WARMUP_STEPS = {"cuda": 3, "cpu": 2}  # before the timed fixture's own warm-up call
MODEL_OPS = ("random_masking", "attention_packed", "mae_loss")
CPU_COMPILE = os.environ.get("BENCH_PRETRAIN_CPU_COMPILE") == "1"


def _model_backends(device: str) -> list[str]:
    """Backends that run all of the model's ops on ``device``."""
    return [b for b in usable_backends(MODEL_OPS[0], device)
            if all(b in usable_backends(op, device) for op in MODEL_OPS[1:])]


def _cases():
    skip_cpu_compile = pytest.mark.skipif(
        not CPU_COMPILE, reason="compiling the training step takes ~2 min per variant on a "
                                "small CPU; BENCH_PRETRAIN_CPU_COMPILE=1 runs it")
    for device in DEVICES:
        variants = [("fbmae-eager", False), ("fbmae-sdpa-compile", True)]
        variants += [(f"ours-{b}{suffix}", compiled) for b in _model_backends(device)
                     for suffix, compiled in (("", False), ("-compile", True))]
        for variant, compiled in variants:
            marks = []
            if device == "cpu":
                marks.append(pytest.mark.benchmark(min_rounds=3))  # a step takes seconds there
                if compiled:
                    marks.append(skip_cpu_compile)
            yield pytest.param(device, variant, compiled, marks=marks, id=f"{device}-{variant}")


def _build(variant: str, device: str, set_backend):
    """``(model, autocast dtype or None, GradScaler or None)`` for a variant."""
    if variant.startswith("fbmae"):
        model = FbMaskedAutoencoderViT(**MODEL, fused_attn="sdpa" in variant)
        amp = torch.float16 if device == "cuda" else None
    else:
        set_backend(variant.removeprefix("ours-").removesuffix("-compile"))
        model = MaskedAutoencoderViT(**MODEL)
        amp = DTYPES[device] if device == "cuda" else None
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    return model.to(device), amp, scaler


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class PeakMemory:
    """CUDA: ``max_memory_allocated`` since ``reset``. CPU: peak RSS since ``reset`` (Linux
    resets it through /proc/self/clear_refs) minus the RSS at construction; None elsewhere."""

    def __init__(self, device: str):
        self.device = device
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            return
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back before the baseline
        try:
            self.base = _proc_status_bytes("VmRSS")
        except (OSError, KeyError):
            self.base = None

    def reset(self) -> None:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.base = None

    def peak(self) -> int | None:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated()
        return None if self.base is None else _proc_status_bytes("VmHWM") - self.base


@pytest.mark.parametrize("device, variant, compiled", list(_cases()))
def test_pretrain_step(timed, benchmark, backend, device, variant, compiled):
    memory = PeakMemory(device)
    model, amp, scaler = _build(variant, device, backend)
    forward = model
    if compiled:
        torch._dynamo.reset()
        forward = torch.compile(model)
    batch = BATCH[device]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1.5e-4 * batch / 256, betas=(0.9, 0.95),
                                  weight_decay=0.05, fused=device == "cuda")
    imgs = torch.randn(batch, MODEL["in_chans"], MODEL["img_size"], MODEL["img_size"],
                       device=device)

    losses = []

    def step():
        with torch.autocast(device, dtype=amp) if amp else contextlib.nullcontext():
            loss = forward(imgs, MASK_RATIO)[0]
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        losses[:] = [loss]
        return loss

    for _ in range(WARMUP_STEPS[device]):
        step()
    memory.reset()
    per_image = flops.train_flops_per_image(MODEL, MASK_RATIO)
    timed(step, device, flops=per_image * batch, variant=variant, compiled=compiled,
          model=MODEL, mask_ratio=MASK_RATIO, batch=batch, img_size=MODEL["img_size"],
          dtype=str(amp or torch.float32).removeprefix("torch."),
          grad_scaler=scaler is not None, num_params=sum(p.numel() for p in params),
          optimizer="AdamW" + (" fused" if device == "cuda" else ""))
    loss = losses[0].item()
    assert math.isfinite(loss), f"{variant}: loss {loss}"
    images_per_s = batch / benchmark.extra_info["median_s_per_call"]
    peak = flops.peak_flops(device, amp or torch.float32)
    benchmark.extra_info.update(
        images_per_s=images_per_s, flops_per_image=per_image, peak_flops=peak,
        mfu=flops.mfu(images_per_s, per_image, peak), peak_memory_bytes=memory.peak(),
        peak_memory_kind="cuda_max_allocated" if device == "cuda" else "cpu_rss_growth",
        loss=loss)


@pytest.mark.parametrize("fused_attn", [False, True])
def test_baseline_matches_ours(backend, fused_attn):
    """The fb/mae baseline and our model are the same model: our state dict loads into it, the
    loss (same seed, so the same masking noise) and the masks agree, and FlopCounterMode counts
    the same matmul FLOPs (the baseline also projects the cls token it then drops)."""
    config = dict(MODEL, img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                  decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2)
    imgs = torch.randn(3, 3, 32, 32)
    for name in _model_backends("cpu"):
        backend(name)
        ours = MaskedAutoencoderViT(**config)
        baseline = FbMaskedAutoencoderViT(**config, fused_attn=fused_attn)
        baseline.load_state_dict(ours.state_dict())
        torch.manual_seed(0)
        loss, pred, mask = ours(imgs, MASK_RATIO)
        torch.manual_seed(0)
        base_loss, base_pred, base_mask = baseline(imgs, MASK_RATIO)
        torch.testing.assert_close(base_loss, loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(base_pred, pred, rtol=1e-4, atol=1e-5)
        assert torch.equal(base_mask, mask)
    if not fused_attn:  # the written-out attention is visible to FlopCounterMode, SDPA on CPU not
        with FlopCounterMode(display=False) as counter:
            baseline(imgs, MASK_RATIO)[0].backward()
        cls_row = 3 * 2 * config["decoder_embed_dim"] * config["patch_size"] ** 2 * 3
        assert counter.get_total_flops() == 3 * (flops.train_flops_per_image(config, MASK_RATIO)
                                                 + cls_row)
