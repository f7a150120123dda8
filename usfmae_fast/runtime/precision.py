"""The precision names commands accept (no torch import: the CLI parser uses them)."""

PRECISIONS = ("fp32", "bf16", "fp16")  # pretraining's autocast (fp16 with a grad scaler), Score-CAM
FINETUNE_PRECISIONS = ("auto", "bf16", "fp32")  # bf16 autocast or none; "auto": bf16 on CUDA


def torch_dtype(precision: str) -> "torch.dtype":  # noqa: F821
    """The torch dtype of a name in :data:`PRECISIONS`."""
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
