"""Checkpoints: the dcbench format, safe loading, foreign-format recognition, provenance.

The dcbench format is a dict saved with ``torch.save``::

    {"format": "dcbench", "format_version": 1, "arch", "sobel", "input_size", "epoch",
     "config", "versions", "git", "weights_sha256", "state_dict", "train_state" (optional),
     "input_config" (optional: the backbone's input convention, e.g. of timm pretrained weights)}

Writes are atomic (temp file in the same folder, fsync, rename), so an interrupted save never
leaves a half-written checkpoint. Loading uses ``torch.load(weights_only=True)``; a file that
needs full unpickling is refused unless the caller trusts it.
"""
from __future__ import annotations

import errno
import logging
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from dcbench.digest import weights_sha256  # noqa: F401 (part of this module's API)
from dcbench.env import git_hash, software_versions
from dcbench.fileio import atomic_write
from dcbench.errors import CheckpointError
from dcbench.models import Backbone, alexnet_grid, build_backbone
from dcbench.models.external import HookedBackbone
from dcbench.models.hub import PretrainedModel, hf_hub_pretrained, timm_pretrained, torchvision_pretrained
from dcbench.converters import Converted, convert

log = logging.getLogger("dcbench")
FORMAT_VERSION = 1
_BUFFER_SUFFIXES = ("num_batches_tracked",)


# ----------------------------------------------------------------------------- saving
def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temp file beside ``path``, fsync, then rename over ``path``.

    Tensors are saved on the CPU (a plain ``torch.load`` on a machine without the GPU they
    came from works; ``Optimizer.load_state_dict`` and ``load_state_dict`` move them back to
    their parameters' device). A full disk leaves the previous file untouched and raises one
    CheckpointError line.
    """
    path = Path(path)
    try:
        atomic_write(path, lambda f: torch.save(to_cpu(obj), f), fsync=True)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(f"cannot write {path}: no space left on its disk (quota or full); nothing was "
                                  f"replaced, the previous {path.name} (if any) is intact; free some space and run "
                                  f"again (dcbench train --resume continues a run)") from None
        raise
    except RuntimeError as exc:  # torch's zip writer reports a failed write as a RuntimeError
        if "write" not in str(exc).lower():
            raise
        raise CheckpointError(f"cannot write {path} ({_first_line(exc)}; is its disk full?); nothing was "
                              f"replaced, the previous {path.name} (if any) is intact") from None


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor inside (dicts, lists, tuples) moved to the CPU; CPU tensors are
    kept as they are (no copy)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        out = {k: to_cpu(v) for k, v in obj.items()}
        if type(obj) is not dict:  # an OrderedDict state dict: same type, same _metadata (BN versions)
            out = type(obj)(out)
            if hasattr(obj, "_metadata"):
                out._metadata = obj._metadata
        return out
    if isinstance(obj, list):
        return [to_cpu(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(to_cpu(v) for v in obj)
    return obj


def checkpoint_record(backbone: Backbone, epoch: int | None = None, config: dict | None = None,
                      train_state: dict | None = None) -> dict[str, Any]:
    """The dict the dcbench format saves for ``backbone``."""
    weights = backbone.backbone_state_dict()
    record = {"format": "dcbench", "format_version": FORMAT_VERSION, "arch": backbone.arch,
              "sobel": backbone.has_sobel, "input_size": backbone.input_size, "epoch": epoch,
              "config": config or {}, "versions": software_versions(), "git": git_hash(),
              "weights_sha256": weights_sha256(weights), "state_dict": weights,
              "input_config": dict(backbone.input_config)}
    if train_state is not None:
        record["train_state"] = train_state
    return record


def save_checkpoint(path: str | Path, backbone: Backbone, epoch: int | None = None,
                    config: dict | None = None, train_state: dict | None = None) -> Path:
    """Write ``backbone`` in the dcbench format, atomically."""
    atomic_save(checkpoint_record(backbone, epoch, config, train_state), path)
    return Path(path)


# ----------------------------------------------------------------------------- reading
def read_checkpoint_file(path: str | Path, trust: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True``; full unpickling only when ``trust``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; pass the .pth file "
                              f"(a run folder keeps it as {path}/checkpoint.pth)")
    if not _looks_like_torch_file(path):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (not a torch.save zip or pickle file)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols of foreign files
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        plain = None if _is_zip(path) else _safe_plain_pickle(path)
        if plain is not None:  # e.g. a detectron2 .pkl: numpy arrays in dicts, read without running code
            return plain
        if not trust:
            raise CheckpointError(f"{path} contains Python objects beyond tensors and needs full unpickling, "
                                  f"which can run code; pass --trust-checkpoint if you trust its source") from exc
    except Exception as exc:  # garbage bytes make the unpickler fail in many ways
        raise CheckpointError(f"{path} is not a PyTorch checkpoint or is truncated ({_first_line(exc)})") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        if _is_zip(path):  # torch.save's format: torch's own error is the one that names the cause
            raise CheckpointError(f"cannot unpickle {path}: {_first_line(exc)} (the code that defined "
                                  f"its objects must be importable here)") from exc
    try:  # a plain pickle (not written by torch.save)
        with open(path, "rb") as f:
            return pickle.load(f)
    except Exception as exc:  # arbitrary unpickling can fail in arbitrary ways
        raise CheckpointError(f"cannot unpickle {path}: {_first_line(exc)}") from exc


def _safe_plain_pickle(path: Path) -> Any:
    """A plain pickle (not a torch.save file) that holds only builtin containers, numbers, strings
    and numpy arrays (detectron2's checkpoint format), read with an unpickler that refuses every
    other global before calling it, so it never runs code; None for any other file."""
    from dcbench.data.retrieval import load_ground_truth_pickle  # the same safe unpickler

    try:
        with open(path, "rb") as f:
            return load_ground_truth_pickle(f)
    except Exception:  # noqa: BLE001 - refused globals, or not a plain pickle at all
        return None


def _looks_like_torch_file(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK") or head[:1] == b"\x80"


def _is_zip(path: Path) -> bool:
    """torch.save's default format (a zip archive); legacy torch files and plain pickles are not."""
    with open(path, "rb") as f:
        return f.read(2) == b"PK"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0].split(". ")[0] if text else type(exc).__name__


# ----------------------------------------------------------------------------- arch inference
_RESNETS = {((3, 4, 6, 3), True): "resnet50", ((3, 4, 23, 3), True): "resnet101",
            ((3, 8, 36, 3), True): "resnet152", ((2, 2, 2, 2), False): "resnet18",
            ((3, 4, 6, 3), False): "resnet34"}
_CANDIDATE_SIZES = (224, 64, 96, 128, 160, 192, 256, 288, 320)


@dataclass
class ArchGuess:
    """What the weights say about their architecture."""

    arch: str | None
    sobel: bool | None = None
    input_size: int | None = None


def infer_arch(sd: dict[str, torch.Tensor]) -> ArchGuess:
    """Recognise DeepCluster AlexNet/VGG16 and torchvision/timm ResNets from key names and shapes."""
    first = sd.get("features.0.weight")
    if first is not None and first.dim() == 4:
        sobel = first.shape[1] == 2
        bn = "features.1.running_mean" in sd
        if tuple(first.shape[2:]) == (11, 11) and first.shape[0] == 96 and bn:
            return ArchGuess("alexnet", sobel, _size_for_grid(sd, "classifier.1.weight", 256, alexnet_grid))
        if tuple(first.shape[2:]) == (3, 3) and first.shape[0] == 64 and bn:
            # torchvision's vgg16_bn has a third fc (classifier.6); a torchvision export of
            # tv:vgg16_bn has no classifier at all (heads are not exported): DeepCluster's VGG16
            # cannot load without its fc6/fc7, so only torchvision's fits
            if "classifier.6.weight" in sd or "classifier.0.weight" not in sd:
                return ArchGuess("tv:vgg16_bn", sobel, 224)
            return ArchGuess("vgg16", sobel, _size_for_grid(sd, "classifier.0.weight", 512, lambda s: s // 32))
        if tuple(first.shape[2:]) == (11, 11) and first.shape[0] == 64:
            return ArchGuess("tv:alexnet", sobel, 224)
    if "conv1.weight" in sd and "layer4.0.conv1.weight" in sd:
        blocks = tuple(1 + max(int(k.split(".")[1]) for k in sd if k.startswith(f"layer{i}."))
                       for i in range(1, 5))
        bottleneck = "layer1.0.conv3.weight" in sd
        name = _RESNETS.get((blocks, bottleneck))
        conv2 = sd.get("layer1.0.conv2.weight")
        if name and bottleneck and conv2 is not None and conv2.shape[1] != conv2.shape[0]:
            # grouped 3x3 convs: a ResNeXt (torchvision resnext50_32x4d, resnext101_32x8d, resnext101_64x4d);
            # it has the same 128-wide first conv as wide_resnet50_2, so it is told apart here
            groups, width = conv2.shape[0] // conv2.shape[1], conv2.shape[1]
            name = f"resnext{name[len('resnet'):]}_{groups}x{width}d"
            name = name if name in ("resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d") else None
        elif name and bottleneck and sd["layer1.0.conv1.weight"].shape[0] == 128:
            name = "wide_" + name + "_2"
        return ArchGuess(f"tv:{name}" if name else None, sd["conv1.weight"].shape[1] == 2, 224)
    return ArchGuess(None)


def _size_for_grid(sd: dict[str, torch.Tensor], key: str, channels: int, grid_of) -> int | None:
    weight = sd.get(key)
    if weight is None:
        return None
    grid = round((weight.shape[1] / channels) ** 0.5)
    if grid < 1 or grid * grid * channels != weight.shape[1]:
        return None
    usual = next((s for s in _CANDIDATE_SIZES if grid_of(s) == grid), None)
    # other grids (VGG16 below 64 px: grid 1; large inputs): the smallest side that gives the grid
    return usual or next((s for s in range(32, 32 * (grid + 2) + 1) if grid_of(s) == grid), None)


# ----------------------------------------------------------------------------- loading
@dataclass
class LoadReport:
    """Which keys of a checkpoint went where; printed on every load."""

    format: str
    arch: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored_heads: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"format {self.format}", f"arch {self.arch}", f"{self.loaded} tensors loaded",
                 f"{len(self.missing)} missing", f"{len(self.unexpected)} unexpected"]
        if self.ignored_heads:
            parts.append(f"{len(self.ignored_heads)} head keys ignored ({_abbrev(self.ignored_heads)})")
        text = ", ".join(parts)
        if self.missing:
            text += f"; missing: {_abbrev(self.missing)}"
        if self.unexpected:
            text += f"; unexpected: {_abbrev(self.unexpected)}"
        return text


def _abbrev(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


@dataclass
class LoadedCheckpoint:
    """A backbone with its provenance: name, format, sha256 of its weights, metadata."""

    backbone: Backbone
    name: str
    format: str
    sha256: str
    report: LoadReport | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    raw: dict[str, Any] | None = None  # the dcbench record, for resuming training

    def identity(self) -> dict[str, str]:
        """``{"name", "sha256", "arch"}`` as stored with every result."""
        return {"name": self.name, "sha256": self.sha256, "arch": self.backbone.arch}


def _native_target(backbone: Backbone) -> tuple[torch.nn.Module, tuple[str, ...]]:
    """The module whose state-dict names equal the arch's native (foreign) names, and its heads."""
    if isinstance(backbone, HookedBackbone):
        return backbone.model, backbone.native_heads
    return backbone, backbone.head_prefixes


def _load_weights(backbone: Backbone, sd: dict[str, torch.Tensor], fmt: str, source: str,
                  heads: list[str], native: bool) -> LoadReport:
    target, head_prefixes = _native_target(backbone) if native else (backbone, backbone.head_prefixes)
    arch = backbone.arch
    skip = head_prefixes + ("sobel.",)  # Sobel filters are fixed: rebuilt, not loaded
    expected = {k: v for k, v in target.state_dict().items() if not k.startswith(skip)}
    heads = heads + sorted(k for k in sd if k.startswith(head_prefixes))
    sd = {k: v for k, v in sd.items() if not k.startswith(skip)}
    for key in sorted(set(sd) & set(expected)):
        if tuple(sd[key].shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{source} does not fit arch {arch}: {key} has shape {tuple(sd[key].shape)}, "
                f"{arch} expects {tuple(expected[key].shape)}; pass the right --arch")
    missing = sorted(k for k in expected if k not in sd and not k.endswith(_BUFFER_SUFFIXES))
    unexpected = sorted(k for k in sd if k not in expected)
    if missing:
        raise CheckpointError(f"{source} does not match arch {arch}: {len(missing)} of {len(expected)} weights "
                              f"missing (e.g. {_abbrev(missing)}); pass the right --arch")
    target.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=False)
    return LoadReport(fmt, arch, len(sd) - len(unexpected), missing, unexpected, heads)


def _from_dcbench(obj: dict, path: Path) -> LoadedCheckpoint:
    try:
        backbone = build_backbone(obj["arch"], sobel=bool(obj["sobel"]), input_size=int(obj["input_size"]))
    except KeyError as exc:
        raise CheckpointError(f"{path} is a dcbench checkpoint without '{exc.args[0]}'; it is damaged") from exc
    sd = obj["state_dict"]
    report = _load_weights(backbone, sd, "dcbench", str(path), [], native=False)
    meta = {k: obj.get(k) for k in ("epoch", "config", "versions", "git", "format_version")}
    if isinstance(obj.get("input_config"), dict):  # files before issue 19 lack it: the arch's default stays
        backbone.input_config = dict(obj["input_config"])
        meta["input_config"] = dict(obj["input_config"])
    sha = obj.get("weights_sha256") or weights_sha256(backbone.backbone_state_dict())
    return LoadedCheckpoint(backbone, path.stem if path.stem != "checkpoint" else path.parent.name,
                            "dcbench", sha, report, meta, path, obj)


def _from_foreign(converted: Converted, path: Path, arch: str | None, input_size: int | None) -> LoadedCheckpoint:
    guess = infer_arch(converted.state_dict)
    arch = arch or converted.arch or guess.arch
    if arch is None:
        raise CheckpointError(f"cannot tell the architecture of {path} (format {converted.format}); pass --arch NAME")
    if converted.arch and guess.arch and arch == converted.arch and guess.arch != arch and ":" not in arch:
        arch = guess.arch  # the file's own 'arch' key disagrees with its weights: trust the weights
    sobel = guess.sobel if guess.sobel is not None else False
    size = guess.input_size or input_size or 224  # the weights decide where they can
    backbone = build_backbone(arch, sobel=sobel, input_size=size)
    report = _load_weights(backbone, converted.state_dict, converted.format, str(path), converted.head_keys,
                           native=True)
    return LoadedCheckpoint(backbone, path.stem, converted.format,
                            weights_sha256(backbone.backbone_state_dict()), report, converted.meta, path)


def load_checkpoint(path: str | Path, arch: str | None = None, trust: bool = False,
                    input_size: int | None = None) -> LoadedCheckpoint:
    """Load any supported checkpoint file into a backbone, logging a key report."""
    path = Path(path)
    obj = read_checkpoint_file(path, trust=trust)
    if isinstance(obj, dict) and obj.get("format") == "dcbench":
        loaded = _from_dcbench(obj, path)
        if arch and arch != loaded.backbone.arch:
            raise CheckpointError(f"{path} holds a {loaded.backbone.arch} but --arch {arch} was asked; "
                                  f"drop --arch or pass the matching checkpoint")
    else:
        converted = convert(obj)
        if converted is None:
            raise CheckpointError(f"{path} holds no recognisable weights (not a state dict or a known "
                                  f"checkpoint format); see `dcbench checkpoint inspect --help` for the formats")
        loaded = _from_foreign(converted, path, arch, input_size)
    log.info("loaded %s: %s", path, loaded.report.summary())
    return loaded


# ----------------------------------------------------------------------------- specs
SOURCE_GROUP = "dcbench.checkpoint_sources"


@dataclass
class SourceFile:
    """What a checkpoint source (``SCHEME:NAME``) resolves a name to."""

    path: Path
    name: str  # the checkpoint's name in results, e.g. ``pretrained:deepcluster-alexnet``
    arch: str | None = None
    input_size: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _checkpoint_source(spec: str) -> Callable[[str], SourceFile] | None:
    """The resolver registered for ``spec``'s scheme in the ``dcbench.checkpoint_sources``
    entry-point group (e.g. ``pretrained``), or None (then ``spec`` is a file or random init)."""
    scheme, sep, _ = spec.partition(":")
    if not sep or scheme in ("random", "timm", "tv") or len(scheme) < 2:
        return None
    for ep in metadata.entry_points(group=SOURCE_GROUP, name=scheme):
        return ep.load()
    return None


def _parse_random(spec: str) -> tuple[str, dict[str, str]]:
    arch, *opts = spec.split(",")
    options = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or key not in ("seed", "sobel", "size"):
            raise CheckpointError(f"bad option '{opt}' in '{spec}'; use random:ARCH[,seed=N][,sobel=0|1][,size=PX]")
        options[key] = value
    return arch, options


def _parse_flag(value: str, spec: str) -> bool:
    """``sobel=1|0`` (or true/false, yes/no) of a random: spec; anything else is an error, not off."""
    word = value.strip().lower()
    if word not in ("1", "true", "yes", "0", "false", "no"):
        raise CheckpointError(f"bad value '{value}' for sobel in '{spec}'; use sobel=1 or sobel=0")
    return word in ("1", "true", "yes")


#: spec prefixes naming published weights (or, without a tag, a seeded random init)
_NAMED_PREFIXES = ("timm:", "tv:", "hf-hub:")


def _named_weights(spec: str, input_size: int | None) -> LoadedCheckpoint | str:
    """A ``timm:`` / ``tv:`` / ``hf-hub:`` spec: the pretrained checkpoint it names, or (no tag,
    no ``pretrained`` option) the ``random:`` spec of the same seeded init as a bare ``timm:NAME``."""
    prefix, _, rest = spec.partition(":")
    name, *opts = rest.split(",")
    tagged = prefix == "hf-hub" or (prefix == "timm" and "." in name) or (prefix == "tv" and ":" in name)
    if "random" in opts:
        if tagged or "pretrained" in opts:
            raise CheckpointError(f"'{spec}' asks for pretrained and random weights; drop ',random' or the "
                                  f"weight tag / ',pretrained'")
        return "random:" + ",".join([f"{prefix}:{name}"] + [o for o in opts if o != "random"])
    if not tagged and "pretrained" not in opts:
        return "random:" + spec
    if [o for o in opts if o != "pretrained"] or not name:
        raise CheckpointError(f"bad pretrained spec '{spec}'; use timm:NAME.TAG, timm:NAME,pretrained, "
                              f"tv:NAME:WEIGHTS, tv:NAME,pretrained or hf-hub:ORG/REPO (no other options)")
    size = input_size or 224
    if prefix == "hf-hub":
        found = hf_hub_pretrained(name, input_size=size)
    elif prefix == "timm":
        found = timm_pretrained(name, input_size=size)
    else:
        arch, _, weights = name.partition(":")
        found = torchvision_pretrained(arch, weights or "DEFAULT", input_size=size)
    return _from_pretrained(found)


def _from_pretrained(found: PretrainedModel) -> LoadedCheckpoint:
    """The LoadedCheckpoint of published weights; meta has the tag, the file and its sha256."""
    weights = found.backbone.backbone_state_dict()
    report = LoadReport(found.format, found.backbone.arch, len(weights))
    log.info("loaded %s from %s (file sha256 %s): %s", found.name, found.file, found.file_sha256[:12],
             report.summary())
    return LoadedCheckpoint(found.backbone, found.name, found.format, weights_sha256(weights), report,
                            found.meta(), found.file)


def resolve_checkpoint(spec: str, arch: str | None = None, trust: bool = False,
                       input_size: int | None = None) -> LoadedCheckpoint:
    """Resolve a checkpoint spec: a file, ``random:ARCH[,seed=N][,sobel=0|1][,size=PX]``,
    ``timm:NAME`` or ``tv:NAME`` (random init, seed 0; ``,random`` says so explicitly), published
    weights ``timm:NAME.TAG``, ``timm:NAME,pretrained`` (timm's default tag), ``tv:NAME:WEIGHTS``
    (a torchvision weight enum member), ``tv:NAME,pretrained`` and ``hf-hub:ORG/REPO`` (from the
    Hugging Face / torch hub caches, see :mod:`dcbench.models.hub`), or ``SCHEME:NAME`` for a
    scheme of the ``dcbench.checkpoint_sources`` entry-point group (dcbench's own:
    ``pretrained:NAME``, a published checkpoint downloaded once into the cache, its file sha256
    verified on every load)."""
    given = spec
    if spec.startswith(_NAMED_PREFIXES):
        named = _named_weights(spec, input_size)
        if isinstance(named, LoadedCheckpoint):
            return _arch_ignored(named, given, arch)
        spec = named
    source = _checkpoint_source(spec)
    if source is not None:
        found = source(spec.partition(":")[2])
        loaded = load_checkpoint(found.path, arch=arch or found.arch, trust=trust,
                                 input_size=input_size or found.input_size)
        loaded.name = found.name
        loaded.meta.update(found.meta)
        return loaded
    if spec.startswith("random:"):
        name, options = _parse_random(spec[len("random:"):])
        try:
            seed = int(options.get("seed", 0))
            size = int(options.get("size", input_size or 224))
        except ValueError as exc:
            raise CheckpointError(f"bad number in '{spec}': {exc}") from exc
        sobel = None if "sobel" not in options else _parse_flag(options["sobel"], spec)
        backbone = build_backbone(name, sobel=sobel, input_size=size, seed=seed)
        sha = weights_sha256(backbone.backbone_state_dict())
        loaded = LoadedCheckpoint(backbone, spec, "random", sha, None, {"seed": seed, "random_init": True})
        return _arch_ignored(loaded, given, arch)
    return load_checkpoint(spec, arch=arch, trust=trust, input_size=input_size)


def _arch_ignored(loaded: LoadedCheckpoint, spec: str, arch: str | None) -> LoadedCheckpoint:
    """``loaded``, after a warning when ``--arch`` names another arch than the spec does (a spec
    that names its model builds that model; ``--arch`` is for checkpoint files, and one ``--arch``
    may serve the files among several specs of a ``compare``)."""
    if arch is not None and arch != loaded.backbone.arch:
        log.warning("--arch %s does not apply to %s, which builds %s; --arch is for checkpoint files",
                    arch, spec, loaded.backbone.arch)
    return loaded


def load_backbone(spec: str, arch: str | None = None, trust: bool = False,
                  input_size: int | None = None) -> Backbone:
    """Public API: a backbone from a checkpoint file or spec (see :func:`resolve_checkpoint`)."""
    return resolve_checkpoint(spec, arch=arch, trust=trust, input_size=input_size).backbone


# ----------------------------------------------------------------------------- conversion
def to_torchvision_state_dict(backbone: Backbone) -> dict[str, torch.Tensor]:
    """The weights in torchvision naming, where the arch has a torchvision twin."""
    if isinstance(backbone, HookedBackbone) and backbone.arch.startswith("tv:") and not backbone.has_sobel:
        return {k[len("model."):]: v for k, v in backbone.backbone_state_dict().items()}
    if backbone.arch == "vgg16" and not backbone.has_sobel and backbone.input_size == 224:
        # DeepCluster's VGG16-BN uses torchvision vgg16_bn's module indices
        return dict(backbone.backbone_state_dict())
    twin = _torchvision_twin(backbone)
    if twin is not None:
        return twin
    raise CheckpointError(f"{backbone.arch}{' with Sobel' if backbone.has_sobel else ''} has no torchvision "
                          f"equivalent ({_no_torchvision_reason(backbone)}); use --to dcbench")


def _torchvision_twin(backbone: Backbone) -> dict[str, torch.Tensor] | None:
    """The weights of a timm model whose names and shapes are exactly a torchvision model's (timm's
    standard ResNets keep torchvision's ``conv1``/``bn1``/``layerN`` layout), else None."""
    if not isinstance(backbone, HookedBackbone) or backbone.has_sobel or backbone.family != "resnet":
        return None
    weights = {k[len("model."):]: v for k, v in backbone.backbone_state_dict().items() if k.startswith("model.")}
    guess = infer_arch(weights)
    if guess.arch is None or not guess.arch.startswith("tv:"):
        return None
    import torchvision

    with torch.device("meta"):  # names and shapes only, no weights allocated
        model = torchvision.models.get_model(guess.arch[3:], weights=None)
    native = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    if set(native) != set(weights) or any(native[k].shape != weights[k].shape for k in native):
        return None  # a variant (deep stem, other blocks): the same names would load wrong weights
    return weights


def _no_torchvision_reason(backbone: Backbone) -> str:
    """Why ``backbone`` has no torchvision twin, for the refusal."""
    if backbone.has_sobel:
        return "torchvision models have no Sobel front end"
    if backbone.arch == "alexnet":
        return "torchvision's alexnet has no BatchNorm and other widths"
    if backbone.arch == "vgg16":
        return (f"torchvision's vgg16_bn has fc layers for 224 px images (a 7x7 map), this one for "
                f"{backbone.input_size} px")
    return "no torchvision model has its layout and names"
