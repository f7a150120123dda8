"""Class activation maps for ViT and CNN classifiers: the shared machinery (target layer by name,
activation capture, ViT token reshape, input / target checks, post-processing) plus Grad-CAM and
Eigen-CAM. Score-CAM, which builds on the same pieces, lives in ``scorecam.py``.

The conventions are those of the ``grad-cam`` package (jacobgil/pytorch-grad-cam), so that maps
agree with it: a ViT layer's tokens ``[B, 1+L, D]`` lose the prefix (cls) tokens and become
``[B, D, rows, cols]``; the map is ``ReLU(sum_k w_k A_k)``, min-max scaled (``/ (max + 1e-7)``),
resized bilinearly to the input (half-pixel centres, as ``cv2.resize``), and min-max scaled again.
"""
from __future__ import annotations

import contextlib
import difflib
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models.classifier import expected_input
from ..runtime.precision import PRECISIONS, torch_dtype
from .config import LAYER_CHOICES

Reshape = Callable[[torch.Tensor], torch.Tensor]
TORCH_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}  # also accepted
SCORES = ("logit", "softmax")


class CAMOutput(NamedTuple):
    maps: torch.Tensor     # [B, H, W] float32 in [0, 1], on the model's device
    targets: torch.Tensor  # [B] class explained per image
    logits: torch.Tensor   # [B, num_classes] float32 of the unmasked images


def vit_reshape(tokens: torch.Tensor, grid: Sequence[int] | None = None,
                num_prefix_tokens: int = 1) -> torch.Tensor:
    """ViT tokens ``[B, prefix + rows*cols, D]`` -> ``[B, D, rows, cols]`` (prefix tokens such as
    cls and registers dropped); ``grid`` defaults to a square."""
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be [B, N, D], got shape {tuple(tokens.shape)}")
    patches = tokens.shape[1] - num_prefix_tokens
    if grid is None:
        side = round(max(patches, 0) ** 0.5)
        grid = (side, side)
    rows, cols = grid
    if patches != rows * cols:
        raise ValueError(f"{tokens.shape[1]} tokens minus {num_prefix_tokens} prefix tokens do not "
                         f"fill a {rows}x{cols} patch grid")
    x = tokens[:, num_prefix_tokens:, :].reshape(tokens.shape[0], rows, cols, tokens.shape[2])
    return x.permute(0, 3, 1, 2)


def default_reshape(model: nn.Module) -> Reshape:
    """timm ViTs: tokens -> patch grid of the model; anything else passes ``[B, C, h, w]`` on."""
    patch_embed = getattr(model, "patch_embed", None)
    grid = getattr(patch_embed, "grid_size", None)
    prefix = getattr(model, "num_prefix_tokens", 1)

    def reshape(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            return vit_reshape(x, tuple(grid) if grid is not None and not getattr(
                model, "dynamic_img_size", False) else None, prefix)
        if x.dim() == 4:
            return x
        raise ValueError(f"the target layer's output has shape {tuple(x.shape)}: neither ViT "
                         "tokens [B, N, D] nor a feature map [B, C, h, w]; pass reshape=")
    return reshape


def default_layer(model: nn.Module) -> str:
    """The last block's first norm of a ViT, ``features.norm5`` of a DenseNet."""
    names = dict(model.named_modules())
    blocks = getattr(model, "blocks", None)
    if blocks is not None and len(blocks) and f"blocks.{len(blocks) - 1}.norm1" in names:
        return f"blocks.{len(blocks) - 1}.norm1"
    if "features.norm5" in names:
        return "features.norm5"
    raise ValueError(f"target_layer: no default for {type(model).__name__}; name one of its "
                     f"modules, e.g. {list(names)[-3:]}")


def find_layer(model: nn.Module, name: str | None) -> tuple[str, nn.Module]:
    """``(name, module)``; negative indices count from the end (``blocks.-1.norm1``), and a
    name of :data:`LAYER_CHOICES` stands for that module of a ViT's last block."""
    name = default_layer(model) if name is None else name
    if name in LAYER_CHOICES:
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or not len(blocks):
            raise ValueError(f"target_layer: {name!r} names a module of a ViT's last block; "
                             f"{type(model).__name__} has no blocks")
        name = f"blocks.{len(blocks) - 1}.{LAYER_CHOICES[name]}"
    module = model
    for part in name.split("."):
        try:
            module = (module[int(part)] if part.lstrip("-").isdigit()
                      and isinstance(module, (nn.Sequential, nn.ModuleList))
                      else getattr(module, part))
        except (AttributeError, IndexError):
            module = None
        if not isinstance(module, nn.Module):
            names = [n for n, _ in model.named_modules() if n]
            close = difflib.get_close_matches(name, names, n=5)
            raise ValueError(f"target_layer: {type(model).__name__} has no module {name!r}"
                             + (f"; close names: {close}" if close else ""))
    return name, module


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str) and TORCH_NAMES.get(dtype, dtype) in PRECISIONS:
        return torch_dtype(TORCH_NAMES.get(dtype, dtype))
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return dtype
    raise ValueError(f"dtype must be one of fp32, fp16, bf16 (or the torch dtypes), got {dtype!r}")


def select_scores(logits: torch.Tensor, targets: torch.Tensor, score: str) -> torch.Tensor:
    """The explained class's logit or softmax probability, per row (float32)."""
    logits = logits.float()
    if score == "softmax":
        logits = logits.softmax(dim=-1)
    return logits.gather(1, targets.view(-1, 1)).squeeze(1)


def finalize(cam: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """grad-cam's ending: ReLU, min-max, bilinear resize (half-pixel, = cv2), min-max again."""
    def scale(x):
        x = x - x.amin(dim=(-2, -1), keepdim=True)
        return x / (x.amax(dim=(-2, -1), keepdim=True) + 1e-7)
    cam = scale(cam.float().clamp_min(0))
    cam = F.interpolate(cam[:, None], size=tuple(size), mode="bilinear", align_corners=False)
    return scale(cam[:, 0].clamp_min(0))


class BaseCAM:
    """Target layer, reshape and checks shared by every method; subclasses define ``_cam``.

    ``model`` is a classifier returning logits ``[B, num_classes]``; ``target_layer`` the name of
    one of its modules (default: :func:`default_layer`); ``reshape`` turns that layer's output
    into ``[B, C, h, w]`` (default: :func:`default_reshape`); ``dtype`` fp32 / fp16 / bf16 runs
    the model under autocast in that precision (the maps are always computed in fp32).
    """

    uses_gradients = False

    def __init__(self, model: nn.Module, target_layer: str | None = None, *,
                 reshape: Reshape | None = None, score: str = "logit", dtype="fp32"):
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        self.model = model.eval()
        self.layer_name, self.layer = find_layer(model, target_layer)
        self.reshape = reshape or default_reshape(model)
        self.score = score
        self.dtype = resolve_dtype(dtype)
        self.in_chans, self.input_size = expected_input(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def check_images(self, images) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise TypeError(f"images: expected a floating-point torch.Tensor [N, C, H, W], got "
                            f"{getattr(images, 'dtype', type(images).__name__)}")
        channels = self.in_chans or (images.shape[1] if images.dim() == 4 else "C")
        height, width = self.input_size or ("H", "W")
        if (images.dim() != 4 or images.shape[0] == 0
                or (self.in_chans and images.shape[1] != self.in_chans)
                or (self.input_size and tuple(images.shape[2:]) != self.input_size)):
            raise ValueError(f"images: expected shape [N, {channels}, {height}, {width}] with "
                             f"N >= 1 (the model's input), got {tuple(images.shape)}")
        return images.to(self.device, torch.float32)

    def check_targets(self, targets, logits: torch.Tensor) -> torch.Tensor:
        batch, classes = logits.shape
        if targets is None:
            return logits.argmax(dim=1)
        targets = torch.as_tensor(targets, device=logits.device)
        if targets.dim() == 0:
            targets = targets.expand(batch)
        if targets.is_floating_point() or targets.is_complex() or targets.shape != (batch,):
            raise ValueError(f"targets: expected None, one class index or {batch} integer class "
                             f"indices, got {targets.tolist()}")
        bad = targets[(targets < 0) | (targets >= classes)]
        if bad.numel():
            raise ValueError(f"targets: class index {bad[0].item()} is out of range for a model "
                             f"with {classes} classes (0..{classes - 1})")
        return targets.long()

    @contextlib.contextmanager
    def capture(self):
        """Records the target layer's output of the next forward. The network goes on with a
        copy, so in-place ops after the layer (torchvision DenseNet's ReLU after ``norm5``)
        cannot change what was captured, nor the gradient taken with respect to it."""
        store: list[torch.Tensor] = []

        def hook(module, args, output):
            store.append(output)
            return output.clone()
        handle = self.layer.register_forward_hook(hook)
        try:
            yield store
        finally:
            handle.remove()

    def __call__(self, images: torch.Tensor, targets=None) -> CAMOutput:
        """Maps ``[B, H, W]`` in [0, 1] for ``images [B, C, H, W]`` (normalised as the model
        expects); ``targets``: None (the predicted class), one class index, or one per image."""
        images = self.check_images(images)
        if self.uses_gradients and not any(p.requires_grad for p in self.model.parameters()):
            images = images.detach().requires_grad_()  # a frozen model: the graph starts here
        with torch.set_grad_enabled(self.uses_gradients):
            with torch.inference_mode(not self.uses_gradients), self.capture() as store, \
                    self.autocast():
                logits = self.model(images)
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                raise ValueError("model: expected logits [B, num_classes], got "
                                 f"{getattr(logits, 'shape', type(logits).__name__)}")
            if not store:
                raise ValueError(f"target_layer: {self.layer_name!r} did not run in the forward "
                                 "pass")
            targets = self.check_targets(targets, logits)
            cam = self._cam(images, store[0], logits, targets)
        return CAMOutput(finalize(cam, images.shape[-2:]).detach(), targets,
                         logits.detach().float())

    def _cam(self, images, output, logits, targets) -> torch.Tensor:  # -> [B, h, w]
        raise NotImplementedError


class GradCAM(BaseCAM):
    """Grad-CAM (Selvaraju et al. 2017): channel weights = spatial mean of the gradient of the
    target score (logit, or softmax probability with ``score="softmax"``)."""

    uses_gradients = True

    def _cam(self, images, output, logits, targets):
        score = select_scores(logits, targets, self.score).sum()
        grads, = torch.autograd.grad(score, output)
        acts, grads = self.reshape(output.detach()).float(), self.reshape(grads).float()
        weights = grads.mean(dim=(2, 3))
        return torch.einsum("bc,bchw->bhw", weights, acts)


class EigenCAM(BaseCAM):
    """Eigen-CAM (Muhammad & Yeasin 2020): the activations projected on their first principal
    component (class-agnostic: ``targets`` only decide what is reported).

    The sign of a singular vector is arbitrary (numpy, MKL and cuSOLVER pick differently), and
    the ReLU that follows keeps one side only. ``sign_correction=True`` (default) flips the
    projection so that its largest magnitude is positive (Seg-Eigen-CAM, eq. 13, as grad-cam's
    ``get_2d_projection_with_sign_correction``), which makes the map the same everywhere;
    ``False`` keeps whatever sign the SVD returned, as grad-cam's ``EigenCAM`` does.
    """

    def __init__(self, model: nn.Module, target_layer: str | None = None, *,
                 sign_correction: bool = True, **kwargs):
        super().__init__(model, target_layer, **kwargs)
        self.sign_correction = sign_correction

    def _cam(self, images, output, logits, targets):
        acts = self.reshape(output).float()
        batch, channels, rows, cols = acts.shape
        x = acts.nan_to_num(0.0).flatten(2).transpose(1, 2)  # [B, h*w, C]
        x = x - x.mean(dim=1, keepdim=True)
        _, _, vh = torch.linalg.svd(x, full_matrices=False)
        projection = (x @ vh[:, 0, :, None]).squeeze(-1)
        if self.sign_correction:
            flip = projection.amin(dim=1).abs() > projection.amax(dim=1).abs()
            projection = torch.where(flip[:, None], -projection, projection)
        return projection.view(batch, rows, cols)
