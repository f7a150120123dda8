"""The settings of a Score-CAM run (``usfmae-fast scorecam``, :func:`.run.explain_images`);
imports no torch, so the command line reads its defaults from here."""
from __future__ import annotations

from dataclasses import dataclass, field

SCORES = ("logit", "softmax")
CHANNEL_WEIGHTS = ("softmax", "raw")
CLASS_SOURCES = ("auto", "label", "predicted")  # auto: the label when labels are given
DELETION_BASELINES = ("blur", "mean")
# target layers by role (a module of a ViT's last block): norm1 is signed (LayerNorm), so the
# weighted sum of its channels may be negative everywhere, an all-zero map after the ReLU; the
# MLP's GELU output is almost non-negative (>= -0.17), which rarely happens there
LAYER_CHOICES = {"last_norm1": "norm1", "last_mlp_act": "mlp.act"}


@dataclass
class ScorecamConfig:
    ckpt: str = ""                      # classifier checkpoint (.safetensors/.pth/.pt)
    images: list[str] = field(default_factory=list)  # image files or folders
    out_dir: str = "outputs/scorecam"
    model_name: str | None = None       # timm model name (None: the checkpoint's 'arch')
    labels: str | None = None           # ground truth: CSV (path,label) or "folder"
    class_source: str = "auto"          # class explained: auto (label if labels, else predicted)
    class_idx: int | None = None        # one fixed class explained for every image
    target_layer: str | None = None     # None: a ViT's last norm1, a DenseNet's features.norm5
    masks: str | None = None            # folder of lesion masks named like the images
    device: str | None = None           # None: cuda if any
    dtype: str = "fp32"                 # autocast precision of the forward passes
    score: str = "logit"                # class score of a masked input: logit | softmax
    weights: str = "softmax"            # channel weights: softmax (grad-cam) | raw (paper)
    batch_size: int | None = None       # masked inputs per forward pass (None: memory budget)
    tolerance: float | None = None      # pointing-game tolerance in px (None: 15 px at 224, scaled)
    faithfulness: bool = True           # deletion / insertion AUC of Score-CAM, Grad-CAM, ...
    deletion_steps: int = 20            # deletion / insertion steps (20: 5 % of the pixels each)
    deletion_baseline: str = "blur"     # what removed pixels become: blur | mean
    seed: int = 0                       # the random map; ties in the deletion order
    colormap: str = "jet"               # matplotlib colormap
    alpha: float = 0.5                  # heatmap opacity in the overlays

    def validate(self) -> ScorecamConfig:
        """``ValueError`` naming the first field out of range and the range accepted."""
        from ..runtime.precision import PRECISIONS
        checks = {"dtype": (self.dtype in PRECISIONS, f"one of {PRECISIONS}"),
                  "score": (self.score in SCORES, f"one of {SCORES}"),
                  "weights": (self.weights in CHANNEL_WEIGHTS, f"one of {CHANNEL_WEIGHTS}"),
                  "class_source": (self.class_source in CLASS_SOURCES, f"one of {CLASS_SOURCES}"),
                  "batch_size": (self.batch_size is None or self.batch_size >= 1,
                                 ">= 1, or unset"),
                  "class_idx": (self.class_idx is None or self.class_idx >= 0, ">= 0, or unset"),
                  "tolerance": (self.tolerance is None or self.tolerance >= 0,
                                ">= 0 pixels, or unset"),
                  "deletion_steps": (self.deletion_steps >= 1, ">= 1"),
                  "deletion_baseline": (self.deletion_baseline in DELETION_BASELINES,
                                        f"one of {DELETION_BASELINES}"),
                  "alpha": (0 <= self.alpha <= 1, "in [0, 1]")}
        for name, (ok, accepted) in checks.items():
            if not ok:
                raise ValueError(f"{name}: {getattr(self, name)!r} is out of range; accepted: "
                                 f"{accepted}")
        return self

    def run_kwargs(self) -> dict:
        """The keyword arguments of :func:`usfmae_fast.explain.run.explain_images`."""
        return {k: getattr(self, k) for k in (
            "model_name", "labels", "class_source", "class_idx", "target_layer", "masks",
            "device", "dtype", "score", "weights", "batch_size", "tolerance", "faithfulness",
            "deletion_steps", "deletion_baseline", "seed", "colormap", "alpha")}
