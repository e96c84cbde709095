"""dowser: data-free importance probing (Model-Dowser) for multimodal LLM fine-tuning.

The Python API (``dowser_cli.api``; loaded on first use, so that ``dowser --help`` stays light):
``load_model``, ``load_mask``, ``MaskedAdamW`` (``MaskedAdamW.for_model``), ``read_examples``, ``collate``,
``save_delta``, ``Mask``, ``UserError``."""
from dowser_cli.version import __version__

_API = ("Mask", "MaskedAdamW", "collate", "load_mask", "load_model", "read_examples", "save_delta")


def __getattr__(name: str):
    if name in _API:
        from dowser_cli import api

        return getattr(api, name)
    if name == "UserError":
        from dowser_cli.errors import UserError

        return UserError
    raise AttributeError(f"module 'dowser_cli' has no attribute {name!r}")


__all__ = ["__version__", *_API, "UserError"]
