"""The settings of a Score-CAM run (``usfmae-fast scorecam``, :func:`.run.explain_images`);
imports no torch, so the command line reads its defaults from here."""
from __future__ import annotations

from dataclasses import dataclass, field

SCORES = ("logit", "softmax")
CHANNEL_WEIGHTS = ("softmax", "raw")


@dataclass
class ScorecamConfig:
    ckpt: str = ""                      # classifier checkpoint (.safetensors/.pth/.pt)
    images: list[str] = field(default_factory=list)  # image files or folders
    out_dir: str = "outputs/scorecam"
    model_name: str | None = None       # timm model name (None: the checkpoint's 'arch')
    class_idx: int | None = None        # class explained (None: each image's predicted class)
    target_layer: str | None = None     # None: a ViT's last norm1, a DenseNet's features.norm5
    masks: str | None = None            # folder of lesion masks named like the images
    device: str | None = None           # None: cuda if any
    dtype: str = "fp32"                 # autocast precision of the forward passes
    score: str = "logit"                # class score of a masked input: logit | softmax
    weights: str = "softmax"            # channel weights: softmax (grad-cam) | raw (paper)
    batch_size: int | None = None       # masked inputs per forward pass (None: memory budget)
    tolerance: float = 0.0              # pointing-game tolerance in pixels
    colormap: str = "jet"               # matplotlib colormap
    alpha: float = 0.5                  # heatmap opacity in the overlays

    def validate(self) -> ScorecamConfig:
        """``ValueError`` naming the first field out of range and the range accepted."""
        from ..runtime.precision import PRECISIONS
        checks = {"dtype": (self.dtype in PRECISIONS, f"one of {PRECISIONS}"),
                  "score": (self.score in SCORES, f"one of {SCORES}"),
                  "weights": (self.weights in CHANNEL_WEIGHTS, f"one of {CHANNEL_WEIGHTS}"),
                  "batch_size": (self.batch_size is None or self.batch_size >= 1,
                                 ">= 1, or unset"),
                  "class_idx": (self.class_idx is None or self.class_idx >= 0, ">= 0, or unset"),
                  "tolerance": (self.tolerance >= 0, ">= 0 pixels"),
                  "alpha": (0 <= self.alpha <= 1, "in [0, 1]")}
        for name, (ok, accepted) in checks.items():
            if not ok:
                raise ValueError(f"{name}: {getattr(self, name)!r} is out of range; accepted: "
                                 f"{accepted}")
        return self

    def run_kwargs(self) -> dict:
        """The keyword arguments of :func:`usfmae_fast.explain.run.explain_images`."""
        return {k: getattr(self, k) for k in (
            "model_name", "class_idx", "target_layer", "masks", "device", "dtype", "score",
            "weights", "batch_size", "tolerance", "colormap", "alpha")}
