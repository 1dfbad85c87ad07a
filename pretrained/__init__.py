"""Known checkpoints (``manifest.json``) and converters for foreign checkpoint formats."""
from pretrained.converters import Converted, convert, converters, register_converter

__all__ = ["Converted", "convert", "converters", "register_converter"]
