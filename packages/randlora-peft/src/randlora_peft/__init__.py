"""randlora-peft: bridge between Hugging Face PEFT's RandLoRA and randlora."""

__version__ = "1.0.0"
