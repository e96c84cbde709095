"""dowser: data-free importance probing (Model-Dowser) for multimodal LLM fine-tuning."""
__version__ = "0.1.0"
