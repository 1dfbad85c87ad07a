"""Published weights by name: timm pretrained tags, timm-compatible Hugging Face hub repositories
and torchvision weight enums.

Weight files live in the standard caches: the Hugging Face hub cache (``HF_HUB_CACHE``, else
``HF_HOME``/hub, else ~/.cache/huggingface/hub) for timm and ``hf-hub:`` weights, torch hub's
(``TORCH_HOME``/hub/checkpoints) for torchvision weights and timm weights published only by URL.
A cached file is used without network; ``HF_HUB_OFFLINE=1`` forbids downloads for both caches.
A missing file that cannot be downloaded is one :class:`CheckpointError` naming the cache path
to fill and the command that fetches it elsewhere. The environment is read at every call
(huggingface_hub reads it once, at import).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from dcbench.errors import ArchError, CheckpointError
from dcbench.models.external import (HookedBackbone, check_timm_name, check_torchvision_name, timm_model_kwargs,
                                     wrap_timm, wrap_torchvision)

#: the weight files timm looks for in a hub repository, in its order of preference
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_TRUE = ("1", "true", "yes", "on")


@dataclass
class PretrainedModel:
    """A backbone with published weights and where they came from."""

    backbone: HookedBackbone
    name: str  # the exact weights, e.g. ``timm:resnet18.a1_in1k``, ``tv:resnet50:IMAGENET1K_V2``
    format: str  # ``timm-pretrained`` or ``torchvision-pretrained``
    file: Path
    file_sha256: str
    source: str  # ``hf-hub:REPO@REVISION`` or the download URL
    extra: dict[str, Any] = field(default_factory=dict)

    def meta(self) -> dict[str, Any]:
        """Checkpoint metadata: tag, source, weight file and its sha256, input convention."""
        return {"pretrained": self.name, "weights_source": self.source, "file": str(self.file),
                "file_sha256": self.file_sha256, "input_config": dict(self.backbone.input_config), **self.extra}


# ----------------------------------------------------------------------------- caches
def offline() -> bool:
    """Whether downloads are forbidden (``HF_HUB_OFFLINE``)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache folder, from the environment as it is now."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "huggingface" / "hub"


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _why_missing(error: BaseException | None) -> str:
    if error is None or offline():
        return "HF_HUB_OFFLINE is set"
    return f"the download failed ({_first_line(error)})"


def hf_file(repo: str, filenames: tuple[str, ...], python_hint: str) -> tuple[Path, str]:
    """The first of ``filenames`` in hub repository ``repo`` (``ORG/NAME[@REVISION]``), from the
    cache or downloaded into it; returns ``(path, commit)``."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, revision = repo.partition("@")
    cache, error = hf_cache_dir(), None
    for filename in filenames:
        try:
            path = Path(hf_hub_download(repo_id, filename, revision=revision or None, cache_dir=cache,
                                        local_files_only=offline()))
            return path, path.parent.name
        except Exception as exc:  # not in the repo, not cached offline, no network, no such repo: all "missing"
            error = error or exc
            if isinstance(exc, LocalEntryNotFoundError) and not offline():
                break  # the hub is unreachable: trying the next file name only repeats the retries
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    raise CheckpointError(
        f"no cached weights of {repo} ({' or '.join(filenames)}) in {folder} and {_why_missing(error)}; where there "
        f"is network run `hf download {repo_id}` (or {python_hint}), then copy its {folder.name} folder (from "
        f"~/.cache/huggingface/hub) into {cache}, or point HF_HUB_CACHE at a cache that has it")


def torch_hub_file(url: str, python_hint: str) -> Path:
    """The torch hub cache file of ``url`` (``TORCH_HOME``/hub/checkpoints/NAME), downloaded into
    the cache (hash prefix of the name checked, as torch does) when missing and allowed."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if path.exists():
        return path
    error: BaseException | None = None
    if not offline():
        match = torch.hub.HASH_REGEX.search(path.name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), match.group(1) if match else None, progress=True)
            return path
        except Exception as exc:  # URLError, HTTPError, hash mismatch: all mean "not available here"
            error = exc
    raise CheckpointError(
        f"no cached weights {path.name} in {path.parent} and {_why_missing(error)}; where there is network run "
        f"{python_hint} (or `curl -L -O {url}`), then copy {path.name} to {path} (TORCH_HOME sets the folder)")


# ----------------------------------------------------------------------------- timm
def _timm_cfg(name: str, tag: str | None) -> Any:
    """timm's pretrained config of ``name.tag`` (``tag`` None: the default tag)."""
    import timm
    from timm.models import get_pretrained_cfg

    check_timm_name(name)
    try:
        cfg = get_pretrained_cfg(f"{name}.{tag}" if tag else name)
    except RuntimeError:
        cfg = None
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        tags = timm.list_pretrained(f"{name}.*")
        known = f"its tags: {', '.join(t.partition('.')[2] for t in tags[:8])}" if tags else "it has none"
        what = f"pretrained tag '{tag}'" if tag else "pretrained weights"
        raise ArchError(f"timm model '{name}' has no {what}; {known} (timm.list_pretrained('{name}.*'))")
    return cfg


def _timm_weight_file(cfg: Any, hint: str) -> tuple[Path, str]:
    if cfg.hf_hub_id:
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HF_WEIGHT_FILES
        path, commit = hf_file(cfg.hf_hub_id, files, hint)
        return path, f"hf-hub:{cfg.hf_hub_id.partition('@')[0]}@{commit}"
    return torch_hub_file(cfg.url, hint), cfg.url


def _create_timm(model_name: str, arch: str, weights: Path, input_size: int, name: str) -> HookedBackbone:
    """timm.create_model with its own pretrained loading (key filters, head handling) reading the
    weight file resolved here, so the file hashed is the file loaded."""
    import timm

    try:
        model = timm.create_model(model_name, pretrained=True, **timm_model_kwargs(arch),
                                  pretrained_cfg_overlay={"file": str(weights), "source": "file"})
    except Exception as exc:  # a damaged or foreign file fails in timm's loader in many ways
        raise CheckpointError(f"{weights} does not load into timm model {arch}: {_first_line(exc)}") from exc
    return wrap_timm(arch, model, input_size=input_size, weights=name)


def timm_pretrained(name: str, input_size: int = 224) -> PretrainedModel:
    """timm model ``NAME.TAG`` with its published weights (``NAME`` alone: timm's default tag)."""
    arch, _, tag = name.partition(".")
    cfg = _timm_cfg(arch, tag or None)
    full = f"{arch}.{cfg.tag}" if cfg.tag else arch
    path, source = _timm_weight_file(cfg, f'python -c "import timm; timm.create_model(\'{full}\', pretrained=True)"')
    backbone = _create_timm(full, arch, path, input_size, full)
    return PretrainedModel(backbone, f"timm:{full}", "timm-pretrained", path, file_sha256(path), source,
                           {"weights_tag": full})


def hf_hub_pretrained(repo: str, input_size: int = 224) -> PretrainedModel:
    """A timm-compatible Hugging Face hub repository ``ORG/NAME[@REVISION]`` (config.json + weights)."""
    from timm.models._hub import load_model_config_from_path  # timm's parser of a repo's config.json

    hint = f'python -c "import timm; timm.create_model(\'hf-hub:{repo}\', pretrained=True)"'
    config, _ = hf_file(repo, ("config.json",), hint)
    cfg, arch, _args = load_model_config_from_path(config.parent)
    check_timm_name(arch)
    files = (cfg["hf_hub_filename"],) if cfg.get("hf_hub_filename") else HF_WEIGHT_FILES
    path, commit = hf_file(repo, files, hint)
    backbone = _create_timm(f"local-dir:{config.parent}", arch, path, input_size, f"hf-hub:{repo}")
    return PretrainedModel(backbone, f"hf-hub:{repo}", "timm-pretrained", path, file_sha256(path),
                           f"hf-hub:{repo.partition('@')[0]}@{commit}", {"weights_tag": f"timm:{arch}"})


# ----------------------------------------------------------------------------- torchvision
def torchvision_pretrained(name: str, weights: str, input_size: int = 224) -> PretrainedModel:
    """torchvision model ``name`` with weight enum member ``weights`` (e.g. ``IMAGENET1K_V2``,
    ``DEFAULT``), built by torchvision's own builder from the cached file."""
    import torchvision

    check_torchvision_name(name)
    enum = torchvision.models.get_model_weights(name)
    try:
        member = enum[weights]
    except KeyError:
        raise ArchError(f"torchvision model '{name}' has no weights '{weights}'; choose one of: "
                        f"{', '.join(w.name for w in enum)}, DEFAULT") from None
    full = f"{name}:{member.name}"
    path = torch_hub_file(member.url, f"python -c \"import torchvision; torchvision.models.get_model('{name}', "
                                      f"weights='{member.name}')\"")
    try:  # the builder unpickles the file fully: accept only plain tensors, as for any checkpoint
        torch.load(path, map_location="cpu", weights_only=True)
        model = torchvision.models.get_model(name, weights=member)
    except Exception as exc:  # a damaged or foreign file
        raise CheckpointError(f"{path} does not load into torchvision {full}: {_first_line(exc)}") from exc
    backbone = wrap_torchvision(name, model, input_size=input_size)
    backbone.input_config = torchvision_input_config(member)
    return PretrainedModel(backbone, f"tv:{full}", "torchvision-pretrained", path, file_sha256(path), member.url,
                           {"weights_tag": f"{type(member).__name__}.{member.name}"})


def torchvision_input_config(member: Any) -> dict[str, Any]:
    """The input convention of a torchvision weight enum member (its ``transforms()``)."""
    t = member.transforms()
    source = f"torchvision {type(member).__name__}.{member.name}.transforms()"
    crop, resize = _side(getattr(t, "crop_size", 224)), _side(getattr(t, "resize_size", 256))
    interpolation = getattr(t, "interpolation", None)
    return {"input_size": crop, "mean": [float(v) for v in t.mean], "std": [float(v) for v in t.std],
            "interpolation": getattr(interpolation, "value", "bilinear"), "crop_pct": round(crop / resize, 4),
            "crop_mode": "center", "source": source}


def _side(size: Any) -> int:
    return int(size[0] if isinstance(size, (list, tuple)) else size)
