"""Known published checkpoints (``manifest.toml``, the cache, downloads) and converters for
foreign checkpoint formats. ``--checkpoint pretrained:NAME`` resolves through :mod:`pretrained.registry`."""
from pretrained.converters import Converted, convert, converters, register_converter
from pretrained.registry import Entry, Reference, cache_root, cached_path, get_entry, load_manifest, verified_file

__all__ = ["Converted", "Entry", "Reference", "cache_root", "cached_path", "convert", "converters", "get_entry",
           "load_manifest", "register_converter", "verified_file"]
