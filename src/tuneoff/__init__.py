"""tuneoff: LoRA or full fine-tuning? Run both under one protocol and measure honestly."""

__version__ = "0.1.0"
