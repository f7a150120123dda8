"""The precision names commands accept (no torch import: the CLI parser uses them)."""

PRECISIONS = ("fp32", "bf16", "fp16")  # pretraining's autocast (fp16 with a grad scaler), Score-CAM
FINETUNE_PRECISIONS = ("auto", "bf16", "fp32")  # bf16 autocast or none; "auto": bf16 on CUDA
