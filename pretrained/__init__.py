"""Known published checkpoints (``manifest.toml``, the cache, downloads), installed as
``dcbench.pretrained``. ``--checkpoint pretrained:NAME`` resolves through
:func:`dcbench.pretrained.download.resolve_source` (the ``dcbench.checkpoint_sources`` entry
point) and ``dcbench pretrained ...`` is its command group (the ``dcbench.commands`` entry
point). It imports the engine; the engine never imports it."""
from dcbench.env import cache_root
from dcbench.pretrained.download import ensure_cached, resolve_source, verified_file
from dcbench.pretrained.registry import Entry, Reference, cached_path, get_entry, load_manifest

__all__ = ["Entry", "Reference", "cache_root", "cached_path", "ensure_cached", "get_entry", "load_manifest",
           "resolve_source", "verified_file"]
