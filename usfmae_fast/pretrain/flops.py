"""Model FLOPs of MAE pretraining, peak FLOP/s of known GPUs, and model FLOPs utilisation (MFU).

What is counted (the MFU convention of PaLM / Megatron-LM): the matrix multiplications of the
model -- the patch embedding (a strided convolution, i.e. a matmul of each patch with the
weight), every ``nn.Linear``, and the two attention products ``q k^T`` and ``P v`` -- at 2 FLOPs
per multiply-accumulate. LayerNorm, softmax, GELU, bias adds, residual adds, masking and the loss
are not counted (together well under 1 % of a ViT-B step), nor is the recomputation of
``q k^T`` inside a FlashAttention backward: these are *model* FLOPs, the same for every
implementation of the same model, so images/s x FLOPs/image compares implementations fairly.

A training step is forward + backward. The backward of a matmul computes the gradients of both
operands, 2x its forward; the patch embedding's input is the image, which needs no gradient, so
its backward is only the weight gradient, 1x its forward. This is exactly what
``torch.utils.flop_counter.FlopCounterMode`` counts for the executed model (tests/test_flops.py).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..ops.reference import num_kept


def _config(model) -> Mapping:
    """A MaskedAutoencoderViT's (or any object's with the same ``config``) constructor kwargs;
    a config mapping is taken as it is."""
    config = model if isinstance(model, Mapping) else getattr(model, "config", None)
    if not isinstance(config, Mapping):
        raise TypeError("expected a MaskedAutoencoderViT (or its .config dict), got "
                        f"{type(model).__name__}")
    return config


def _num_patches(config: Mapping) -> int:
    size = config.get("img_size", 224)
    height, width = (size, size) if isinstance(size, int) else size
    return (height // config["patch_size"]) * (width // config["patch_size"])


def block_macs(tokens: int, dim: int, mlp_ratio: float = 4.0) -> int:
    """Multiply-accumulates of one pre-norm transformer block on ``tokens`` tokens: qkv (3 D^2)
    and output projection (D^2), MLP (2 D * hidden), and ``q k^T`` + ``P v`` (2 N^2 D over all
    heads together; the head count does not change it)."""
    hidden = int(dim * mlp_ratio)
    return tokens * (4 * dim * dim + 2 * dim * hidden) + 2 * tokens * tokens * dim


def forward_flops_breakdown(model, mask_ratio: float = 0.75) -> dict[str, float]:
    """Forward FLOPs per image of each part of an MAE: ``patch_embed`` (all L patches),
    ``encoder`` (K + 1 tokens), ``decoder_embed`` (K + 1 tokens), ``decoder`` (L + 1 tokens),
    ``decoder_pred`` (L tokens, the cls token dropped first)."""
    c = _config(model)
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    patches = _num_patches(c)
    kept = num_kept(patches, mask_ratio)
    pixels = c["patch_size"] ** 2 * c.get("in_chans", 3)
    dim, dec_dim, ratio = c["embed_dim"], c["decoder_embed_dim"], c.get("mlp_ratio", 4.0)
    macs = {
        "patch_embed": patches * pixels * dim,
        "encoder": c["depth"] * block_macs(kept + 1, dim, ratio),
        "decoder_embed": (kept + 1) * dim * dec_dim,
        "decoder": c["decoder_depth"] * block_macs(patches + 1, dec_dim, ratio),
        "decoder_pred": patches * dec_dim * pixels,
    }
    return {part: 2.0 * m for part, m in macs.items()}


def forward_flops_per_image(model, mask_ratio: float = 0.75) -> float:
    """Model FLOPs of one MAE forward pass per image (see the module docstring)."""
    return sum(forward_flops_breakdown(model, mask_ratio).values())


def train_flops_per_image(model, mask_ratio: float = 0.75) -> float:
    """Model FLOPs of one MAE training step (forward + backward) per image: 3x the forward,
    except the patch embedding at 2x (no gradient for the image). The optimizer step is
    elementwise and not counted."""
    parts = forward_flops_breakdown(model, mask_ratio)
    return 3.0 * sum(parts.values()) - parts["patch_embed"]


# Dense (no sparsity) tensor-core peaks from NVIDIA's datasheets, FLOP/s, per GPU:
# (name pattern, bf16 = fp16, tf32, fp32 without tensor cores). The first pattern that occurs
# in torch.cuda.get_device_name() wins, so the more specific names come first.
GPU_PEAKS = (
    ("GH200", 989e12, 495e12, 67e12),
    ("H200 NVL", 835e12, 418e12, 60e12),
    ("H200", 989e12, 495e12, 67e12),
    ("H100 NVL", 835e12, 418e12, 60e12),
    ("H100 PCIe", 756e12, 378e12, 51e12),
    ("H100", 989e12, 495e12, 67e12),  # SXM5: "NVIDIA H100 80GB HBM3"
    ("A100", 312e12, 156e12, 19.5e12),
)


def peak_flops(device, dtype: torch.dtype, tf32: bool | None = None) -> float | None:
    """Dense peak FLOP/s of ``device`` for matmuls in ``dtype``; None on a CPU or an unknown GPU.

    ``device`` is a torch device (or its string) or a GPU name as ``torch.cuda.get_device_name``
    returns it. fp32 counts the TF32 tensor-core peak when ``tf32`` (default: when
    ``torch.get_float32_matmul_precision()`` is not "highest"), else the CUDA-core peak.
    """
    if isinstance(device, str) and not device.startswith(("cuda", "cpu")):
        name = device
    else:
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name(device)
    for pattern, half, tf32_peak, fp32 in GPU_PEAKS:
        if pattern in name:
            break
    else:
        return None
    if dtype in (torch.bfloat16, torch.float16):
        return half
    if dtype == torch.float32:
        if tf32 is None:
            tf32 = torch.get_float32_matmul_precision() != "highest"
        return tf32_peak if tf32 else fp32
    return None


def mfu(images_per_s: float, flops_per_image: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak; None without a peak."""
    if peak is None:
        return None
    if peak <= 0:
        raise ValueError(f"peak must be positive, got {peak}")
    return images_per_s * flops_per_image / peak
