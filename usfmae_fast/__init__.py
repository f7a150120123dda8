"""usfmae_fast: fast pretraining, fine-tuning and explanation of ultrasound masked autoencoders."""
__version__ = "0.1.0"
