"""Score-CAM (Wang et al. 2020) batched on the device.

The target layer's activations come from one forward pass. Every channel ``k`` of every image is
upsampled bilinearly to the input size, min-max normalised to ``H_k`` in [0, 1], and the masked
input ``X * H_k`` is scored by the model. All ``B * C`` masked inputs stream through the model in
chunks sized to a memory budget; masks, scores and weights stay on the device (no ``.item()``,
no ``.cpu()``: the loop never waits for the device). Channel weights are the softmax of the
scores over channels (the grad-cam package's choice, ``weights="softmax"``) or the scores
themselves (``weights="raw"``, the paper's code), and the map is ``ReLU(sum_k w_k A_k)`` finished
as every method here (:func:`usfmae_fast.explain.cam.finalize`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cam import BaseCAM, select_scores

WEIGHTS = ("softmax", "raw")
CPU_BUDGET = 1 << 30  # bytes of activations per chunk on a CPU
PROBE = 4             # masked inputs in the forward that measures the memory per input on CUDA


class ScoreCAM(BaseCAM):
    """Score-CAM for ViTs and CNNs (see :class:`usfmae_fast.explain.cam.BaseCAM` for
    ``target_layer``, ``reshape``, ``score`` and ``dtype``).

    ``weights``: "softmax" (over the channel scores, as grad-cam) or "raw" (the scores).
    ``align_corners``: of the bilinear upsampling of the channel maps to the input size (True, as
    grad-cam's ``UpsamplingBilinear2d``). ``batch_size``: masked inputs per forward pass; by
    default as many as ``memory_budget`` bytes allow (default: half the free memory of the
    CUDA device as measured before the run, 1 GiB on a CPU).
    """

    def __init__(self, model: nn.Module, target_layer: str | None = None, *,
                 weights: str = "softmax", align_corners: bool = True,
                 batch_size: int | None = None, memory_budget: int | None = None, **kwargs):
        super().__init__(model, target_layer, **kwargs)
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
        for name, value in (("batch_size", batch_size), ("memory_budget", memory_budget)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value <= 0):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        self.weights = weights
        self.align_corners = align_corners
        self.batch_size = batch_size
        self.memory_budget = memory_budget
        self.last_batch_size: int | None = None  # chunk size the latest call used

    def masks(self, acts: torch.Tensor, size) -> torch.Tensor:
        """Channel maps ``[n, h, w]`` -> normalised upsampled masks ``[n, H, W]`` (fp32)."""
        up = F.interpolate(acts[:, None].float(), size=tuple(size), mode="bilinear",
                           align_corners=self.align_corners)[:, 0]
        low = up.amin(dim=(1, 2), keepdim=True)
        high = up.amax(dim=(1, 2), keepdim=True)
        return (up - low) / (high - low + 1e-8)

    def chunk_size(self, images: torch.Tensor, total: int) -> int:
        if self.batch_size is not None:
            return min(self.batch_size, total)
        per_input = self._bytes_per_input(images)
        if self.memory_budget is not None:
            budget = self.memory_budget
        elif images.device.type == "cuda":
            budget = torch.cuda.mem_get_info(images.device)[0] // 2
        else:
            budget = CPU_BUDGET
        return max(1, min(total, budget // per_input))

    def _bytes_per_input(self, images: torch.Tensor) -> int:
        """Memory one masked input costs in a chunk: its mask and masked copy, plus the model's
        activations: measured (peak of a small forward pass) on CUDA; elsewhere estimated as
        three times the largest output of any module (what inference keeps alive at once)."""
        pixels = images[0].numel()
        own = 4 * (2 * pixels + 3 * (pixels // images.shape[1]))  # gathered + masked input, masks
        probe = images[:1].expand(PROBE, *images.shape[1:]).contiguous()
        if images.device.type == "cuda":
            torch.cuda.synchronize(images.device)
            base = torch.cuda.memory_allocated(images.device)
            torch.cuda.reset_peak_memory_stats(images.device)
            with torch.inference_mode(), self.autocast():
                self.model(probe)
            peak = torch.cuda.max_memory_allocated(images.device) - base
            return own + max(1, peak // PROBE)
        largest = [0]

        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                largest[0] = max(largest[0], output.numel() * output.element_size())
        handles = [m.register_forward_hook(hook) for m in self.model.modules()]
        try:
            with torch.inference_mode(), self.autocast():
                self.model(probe[:1])
        finally:
            for handle in handles:
                handle.remove()
        return own + 3 * largest[0]

    def _cam(self, images, output, logits, targets):
        acts = self.reshape(output).float()  # [B, C, h, w]
        batch, channels = acts.shape[:2]
        total = batch * channels
        flat = acts.reshape(total, *acts.shape[2:])
        owner = torch.arange(batch, device=images.device).repeat_interleave(channels)
        chunk = self.chunk_size(images, total)
        self.last_batch_size = chunk
        scores = torch.empty(total, device=images.device, dtype=torch.float32)
        with torch.inference_mode():
            for start in range(0, total, chunk):
                part = slice(start, start + chunk)
                masked = images[owner[part]] * self.masks(flat[part], images.shape[-2:])[:, None]
                with self.autocast():
                    out = self.model(masked)
                scores[part] = select_scores(out, targets[owner[part]], self.score)
        scores = scores.view(batch, channels)
        weights = scores.softmax(dim=1) if self.weights == "softmax" else scores
        return torch.einsum("bc,bchw->bhw", weights, acts)
