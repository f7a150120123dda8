"""usfmae_fast: fast pretraining, fine-tuning and explanation of ultrasound masked autoencoders."""
__version__ = "0.1.0"


def __getattr__(name: str):
    # `usfmae_fast.accelerate` imports torch and timm only when first used
    if name == "accelerate":
        from ._accelerate import accelerate
        globals()[name] = accelerate
        return accelerate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
