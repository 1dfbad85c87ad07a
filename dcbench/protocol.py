"""The protocol contract: what a protocol is, what the runner gives it, what it returns.

A protocol is a class derived from :class:`Protocol` and decorated with
:func:`register_protocol`. Contract of what is registered (detectron2's Registry style: the
docstring is the contract, the registry only checks names):

- ``name`` (unique, kebab-case, what ``--protocol`` takes), ``description`` (one line),
  ``version`` (bump when a change can move its numbers), ``data_layout`` (text shown by
  ``dcbench protocols NAME``: the folders and files it expects under ``--data``);
- ``seed_dependent`` (ClassVar bool): False when the result does not depend on the ``seed``
  setting (kNN, SVMs, retrieval): tables then report no seed trials for it;
- ``finetune`` (ClassVar bool): True when the protocol trains the backbone (on a copy).
  For every other protocol the runner asserts that the backbone it handed out, weights and
  BatchNorm buffers, is unchanged after the run (MoCo's ``sanity_check``);
- ``Settings``: a dataclass whose field defaults ARE the protocol's standard settings
  (PROTOCOLS.md), each field documented with ``metadata={"help": ...}`` (use :func:`setting`).
  Derive it from :class:`CommonSettings` (or :class:`FrozenFeatureSettings`) so the shared
  fields and their validation exist once; a ``validate()`` override calls ``super().validate()``
  and raises :class:`~dcbench.errors.UsageError` for impossible combinations;
- ``check_data(root, settings)``: raise :class:`dcbench.data.DataError` (one line naming the
  missing piece and the expected layout) BEFORE any expensive work. The runner calls it once;
  ``run`` does not repeat it;
- ``run(ckpt, settings, root, ctx) -> ProtocolOutput``: metric rows plus the metadata needed
  to reproduce them. Frozen-feature protocols take their backbone from
  :meth:`RunContext.frozen_backbone` and their features from :meth:`RunContext.extract`, which
  apply the ``bn_recalibrate`` / ``cache`` / ``batch_size`` / ``workers`` settings, the device
  and the feature cache the same way for everyone;
- data parallelism (``torchrun --nproc-per-node N -m dcbench eval ...``): ``run`` is called on
  every rank. :meth:`RunContext.extract` shards the forward passes across the ranks and hands
  every rank all the rows, in dataset order, so what a protocol computes from them afterwards
  (kNN, SVMs, heads trained on cached features) is the same on every rank and the runner
  stores rank 0's result. A protocol whose heavy work does not go through the context
  (augmented probes, fine-tunes) says so in :meth:`Protocol.data_parallel`, and the runner
  refuses to start it under torchrun; one that computes parts per rank reduces them exactly
  with :meth:`RunContext.all_reduce_sum` (counts, never averages of averages).

Protocols are found through the ``dcbench.protocols`` entry-point group only: an entry names
a module (importing it registers its classes) or a callable (called once; it imports modules
that register). dcbench's own protocols are registered the same way as third-party ones, so
the engine never imports a protocol module by name.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Literal

from dcbench.env import DEFAULT_BUDGET_GB, resolve_workers
from dcbench.errors import DcbenchError, UsageError

log = logging.getLogger("dcbench")
ENTRY_POINT_GROUP = "dcbench.protocols"


def setting(default: Any = None, help: str = "", *, factory: Any = None, numbers: bool = True) -> Any:  # noqa: A002
    """A documented settings field: ``setting(0.01, "learning rate")``; ``factory`` for lists.

    ``numbers=False`` marks a setting that cannot move the results (workers, cache, the seed
    of a trial): changing it is not a deviation from the protocol's source.
    """
    metadata = {"help": help, "numbers": numbers}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def decode_cache_setting(what: str) -> Any:
    """The ``decode_cache_gb`` field of a protocol that reads ``what`` over and over (epochs,
    passes): decoded once, kept in shared memory when they fit (:mod:`dcbench.data.decoded`;
    :func:`dcbench.data.cache_decoded_images`). Validated by :meth:`CommonSettings.validate`."""
    return setting(DEFAULT_BUDGET_GB, f"keep the decoded {what} in shared memory across passes when they fit "
                                      "(GB, capped at half the available memory; 0: decode every pass)", numbers=False)


class ProtocolError(DcbenchError):
    """A protocol broke its contract (e.g. changed a backbone it must leave frozen)."""


# ----------------------------------------------------------------------------- settings
@dataclass
class CommonSettings:
    """Fields every protocol takes, with one validation. Subclasses redeclare a field to
    change its default (it keeps its place) and extend :meth:`validate`."""

    seed: int = setting(0, "random seed of the trial (head init, shuffling, augmentation)", numbers=False)
    batch_size: int = setting(256, "batch size")
    workers: int | Literal["auto"] = setting(
        "auto", "DataLoader worker processes; auto = the cores this process may use, shared by the "
                "processes of a torchrun job on the node, 1 to 8", numbers=False)

    def validate(self) -> None:
        """Raise UsageError for impossible values (called after every ``--set``)."""
        if self.batch_size is not None and self.batch_size < 1:  # None: "the preset's" where allowed
            raise UsageError(f"bad value {self.batch_size} for batch_size: must be at least 1")
        if self.workers != "auto" and self.workers < 0:
            raise UsageError(f"bad value {self.workers} for workers: must be >= 0 or auto")
        if getattr(self, "decode_cache_gb", 0) < 0:  # the field of decode_cache_setting()
            raise UsageError(f"bad value {self.decode_cache_gb} for decode_cache_gb: must be >= 0 (0 turns it off)")

    def loader_workers(self) -> int:
        """The ``workers`` setting as a DataLoader count (``auto`` resolved on this machine)."""
        return resolve_workers(self.workers)


@dataclass
class FrozenFeatureSettings(CommonSettings):
    """Common fields of protocols that read features of a frozen backbone."""

    # which taps share a run does not change any tap's numbers: not a deviation
    taps: list[str] | None = setting(None, "taps to evaluate, all from one forward pass (default: every conv tap)",
                                     numbers=False)
    image_size: int = setting(224, "input side in px")
    cache: bool = setting(True, "read/write the extracted features in the feature cache", numbers=False)
    bn_recalibrate: Literal["auto", "on", "off"] = setting(
        "auto", "re-estimate BatchNorm running stats on training images, on a copy, before extracting; "
                "auto = on for random inits")

    def validate(self) -> None:
        super().validate()
        if self.image_size < 1:
            raise UsageError(f"bad value {self.image_size} for image_size: must be at least 1")
        if self.taps is not None and not self.taps:
            raise UsageError("taps is empty: name at least one tap, or leave it unset for every conv tap")


# ----------------------------------------------------------------------------- provenance
@dataclass(frozen=True)
class Deviation:
    """A difference between what dcbench computes and the source a preset follows."""

    what: str  # e.g. "crops=center" or "region proposals from an RPN, not selective search"
    why: str  # the reason, or "set by the user"
    source: str = "card"  # "card": known and documented; "user": a --set away from the preset

    def to_dict(self) -> dict[str, str]:
        return {"what": self.what, "why": self.why, "source": self.source}


@dataclass
class Card:
    """A protocol's provenance card for one preset: every default setting with its source and
    the known deviations from that source (``dcbench protocols NAME [--json]``)."""

    name: str
    version: str
    preset: str | None
    settings: dict[str, Any]  # the resolved defaults
    sources: dict[str, str]  # setting -> where its default comes from
    deviations: list[Deviation]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "preset": self.preset, "settings": self.settings,
                "sources": [{"setting": k, "source": v} for k, v in self.sources.items()],
                "deviations": [d.to_dict() for d in self.deviations]}


def affects_numbers(settings_cls: type, name: str) -> bool:
    """Whether setting ``name`` can move a result (see :func:`setting`'s ``numbers``)."""
    for f in fields(settings_cls):
        if f.name == name:
            return bool(f.metadata.get("numbers", True))
    return True


# ----------------------------------------------------------------------------- run context
@dataclass
class RunContext:
    """What the runner hands a protocol besides its settings: where to compute, the cache,
    and the shared steps every frozen-feature protocol takes in the same way."""

    device: str = "cpu"
    cache_dir: Path | None = None  # feature cache folder; None when caching is off
    workers: int | Literal["auto"] = 0  # a DataLoader count after __post_init__ ("auto" resolved)
    progress: bool = False
    #: ``--strict``: stop at the first unreadable image instead of skipping it (cannot move a
    #: result: a strict run that ends read every image a skipping run reads)
    strict: bool = False
    settings: Any = None  # the protocol's resolved settings (read by the helpers below)
    protocol: str = ""  # the protocol's name, for error messages
    #: (name, digests) of every backbone handed out by :meth:`frozen_backbone`
    frozen: list[tuple[str, Any, dict[str, str]]] = field(default_factory=list)
    #: what :meth:`frozen_backbone` did about BatchNorm statistics (recorded in the result)
    bn_info: dict[str, Any] | None = None
    #: this process's place in a data-parallel run (torchrun): rank 0 of 1 otherwise
    rank: int = 0
    world_size: int = 1
    #: who started the process (recorded in the result): process, torchrun, submitit-local, ...
    launcher: str = "process"
    #: extractions sharded across ranks so far (the runner records whether the run was data-parallel)
    sharded_extractions: int = 0
    #: seconds spent in :meth:`extract` / :meth:`extract_rows` (forward passes, gathers, cache reads)
    extract_seconds: float = 0.0
    #: of ``extract_seconds``, the time the forward passes waited for images (``Extraction.waited_s``)
    extract_wait_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.workers = resolve_workers(self.workers)

    def _setting(self, name: str, default: Any) -> Any:
        return getattr(self.settings, name, default)

    def data(self, dataset: Any) -> Any:
        """``dataset`` made to stop at its first unreadable image under ``--strict`` (datasets
        with a ``strict`` attribute: images, detection and segmentation items); returned as is
        otherwise. :meth:`extract`, :meth:`extract_rows` and :meth:`frozen_backbone` apply it to
        what they are given; a protocol calls it on datasets it iterates itself."""
        if self.strict and hasattr(dataset, "strict"):
            dataset.strict = True
        return dataset

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints and writes the store."""
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int] | None:
        """``(rank, world_size)`` in a data-parallel run, None in one process."""
        return (self.rank, self.world_size) if self.world_size > 1 else None

    # -- collectives (identities in one process; see dcbench.parallel) ----------------------
    def barrier(self) -> None:
        """Wait for every rank."""
        from dcbench import parallel  # noqa: PLC0415 (heavy: torch)

        parallel.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's picklable ``obj`` on every rank (e.g. a decision only rank 0 can take)."""
        from dcbench import parallel  # noqa: PLC0415

        return parallel.broadcast_object(obj)

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's picklable ``obj`` on rank 0 (in rank order), None on the others."""
        from dcbench import parallel  # noqa: PLC0415

        return parallel.gather_objects(obj)

    def all_reduce_sum(self, values: Sequence[float]) -> Any:
        """Exact sums over ranks of per-rank ``values`` (int64 for counts, float64 otherwise), as
        a numpy array: reduce counts (hits, totals), then divide, never average averages."""
        from dcbench import parallel  # noqa: PLC0415

        return parallel.all_reduce_sum(values)

    @contextmanager
    def frozen_backbone(self, ckpt: Any, calibration_data: Any) -> Iterator[tuple[Any, str]]:
        """``(backbone, sha256)`` to read features from, on ``self.device``.

        With BatchNorm re-estimation (setting ``bn_recalibrate``: 'on', or 'auto' for a
        random init) it is a re-estimated copy fitted on ``calibration_data`` (the protocol's
        training images) and the sha256 is the copy's; otherwise the checkpoint's own backbone.
        The runner asserts after the run that it did not change. In a data-parallel run rank 0
        re-estimates and every rank gets the same copy.
        """
        from dcbench.digest import tensor_digests  # noqa: PLC0415 (heavy: torch)
        from dcbench.features import prepared_backbone  # noqa: PLC0415
        import torch

        with torch.random.fork_rng(devices=[]), prepared_backbone(
                ckpt, self._setting("bn_recalibrate", "auto"), self.data(calibration_data),
                self._setting("batch_size", 256), self.workers, self.device, self._setting("seed", 0),
                self.progress, shard=self.shard) as (backbone, sha, info):
            self.bn_info = info
            self.frozen.append(("backbone used for features", backbone, tensor_digests(backbone)))
            yield backbone, sha
            check_unchanged(self.frozen[-1], self.protocol)

    def extract(self, backbone: Any, sha: str, dataset: Any, taps: Sequence[str],
                pools: Mapping[str, Any] | None, transform_id: str, mmap: bool = True) -> Any:
        """:func:`dcbench.features.extract_features` with this run's cache, batch size, workers,
        device and progress settings (the cache is used only when the ``cache`` setting is on).

        In a data-parallel run each rank reads its block of the batches and every rank gets
        all the rows, in dataset order; the cache entry is written once, by rank 0, and is the
        one a single process writes.
        """
        from dcbench.features import check_per_image, per_image_features  # noqa: PLC0415

        check_per_image(taps, pools)
        return per_image_features(self.extract_rows(backbone, sha, dataset, taps, pools, transform_id, mmap),
                                  dataset)

    def extract_rows(self, backbone: Any, sha: str, dataset: Any, taps: Sequence[str],
                     pools: Mapping[str, Any] | None, transform_id: str, mmap: bool = True, **options: Any) -> Any:
        """:func:`dcbench.features.extract_rows` (rows per image or per region, ``batch_sampler``
        ...) with the same settings and the same data parallelism as :meth:`extract`."""
        from dcbench.features import extract_rows  # noqa: PLC0415

        with self._timed():
            out = extract_rows(backbone, self.data(dataset), taps, pools, transform_id, sha,
                               **self._extract_options(mmap), **options)
        self.extract_wait_seconds += out.waited_s or 0.0
        return out

    def shared_forward(self) -> None:
        """Count a pass that splits the backbone's forwards across ranks outside :meth:`extract`
        (an augmented probe: each rank forwards its share of every global batch): the runner
        records the run as data-parallel. Nothing in one process."""
        if self.shard is not None:
            self.sharded_extractions += 1

    @contextmanager
    def _timed(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.extract_seconds += time.perf_counter() - started

    def _extract_options(self, mmap: bool) -> dict[str, Any]:
        if self.shard is not None:
            self.sharded_extractions += 1
        return {"cache_dir": self.cache_dir if self._setting("cache", True) else None,
                "batch_size": self._setting("batch_size", 256), "workers": self.workers, "device": self.device,
                "progress": self.progress, "mmap": mmap, "shard": self.shard, "gather": self.shard is not None}


#: the pre-1.0 name of :class:`RunContext`
EvalContext = RunContext


def check_unchanged(entry: tuple[str, Any, dict[str, str]], protocol: str = "") -> None:
    """Raise :class:`ProtocolError` if the module of ``entry`` differs from its digests."""
    from dcbench.features import assert_unchanged  # noqa: PLC0415

    what, module, before = entry
    try:
        assert_unchanged(module, before, what=what)
    except RuntimeError as exc:
        who = f"protocol {protocol}: " if protocol else ""
        raise ProtocolError(f"{who}{exc}; nothing was stored") from None


@dataclass
class ProtocolOutput:
    """What ``Protocol.run`` returns: metric rows and reproduction metadata."""

    metrics: list  # list[dcbench.results.MetricRow]
    data_fingerprint: str
    extra: dict[str, Any] = field(default_factory=dict)
    #: per-evaluation-image outcomes for paired statistics, keyed like the metric rows they
    #: explain (:func:`dcbench.results.outcome_key`: ``"top1/conv3/final"``, ``"top1_k20/conv3"``
    #: -> 1-D array over val images in dataset order, 0/1 for accuracy so that 100 * mean is the
    #: metric; or a dcbench.stats.ImageOutcomes for mAP / mIoU: per-image scores and labels, or
    #: per-image confusion matrices); optional, stored with the result (dcbench.results) for the
    #: paired bootstrap over images of dcbench.stats
    outcomes: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- protocol
class Protocol:
    """Base class of every protocol; see the module docstring for the contract."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    data_layout: ClassVar[str] = ""
    finetune: ClassVar[bool] = False
    seed_dependent: ClassVar[bool] = True
    #: metric-name patterns tables show by default (empty: dcbench.table's fallback table)
    headline_metrics: ClassVar[tuple[str, ...]] = ()
    Settings: ClassVar[type] = CommonSettings
    #: setting -> where its default comes from (repository + file + key, or paper + table);
    #: per preset: override :meth:`sources_for`
    sources: ClassVar[dict[str, str]] = {}
    #: known deviations of the recipe from its sources, with the reason
    known_deviations: ClassVar[tuple[Deviation, ...]] = ()

    def default_settings(self) -> Any:
        """The protocol's standard settings (the ``Settings`` defaults)."""
        return self.Settings()

    def preset_defaults(self, settings: Any) -> Any:
        """The defaults of the preset ``settings`` uses (the plain defaults without presets)."""
        defaults = self.default_settings()
        preset = getattr(settings, "preset", None)
        if preset is not None and preset != getattr(defaults, "preset", None):
            defaults = dataclasses.replace(defaults, preset=preset)
        return defaults

    def sources_for(self, preset: str | None) -> dict[str, str]:
        """Where each default of ``preset`` comes from."""
        return dict(self.sources)

    def deviations_for(self, preset: str | None) -> list[Deviation]:
        """The known deviations of ``preset`` from its source."""
        return list(self.known_deviations)

    def card(self, settings: Any = None) -> Card:
        """The provenance card of the preset ``settings`` uses (default: the default preset)."""
        from dcbench.settings import to_plain  # noqa: PLC0415

        resolved = self.preset_defaults(settings if settings is not None else self.default_settings())
        preset = getattr(resolved, "preset", None)
        return Card(self.name, self.version, preset, to_plain(resolved), self.sources_for(preset),
                    self.deviations_for(preset))

    def deviations(self, settings: Any) -> list[Deviation]:
        """The card's deviations plus every setting of ``settings`` that can move the numbers
        and differs from its preset's default (what the user's ``--set`` changed)."""
        defaults = self.preset_defaults(settings)
        preset = getattr(settings, "preset", None)
        user = [Deviation(f"{f.name}={_show(getattr(settings, f.name))}",
                          f"set by the user; the {preset or 'protocol'} default is {_show(getattr(defaults, f.name))}",
                          "user")
                for f in fields(settings)
                if f.metadata.get("numbers", True) and getattr(settings, f.name) != getattr(defaults, f.name)]
        return self.deviations_for(preset) + user

    def model_input_size(self, settings: Any) -> int | None:
        """The input size the backbone's fully connected layers are built for when a random
        init is created (and the size foreign checkpoints are loaded at); None = the
        checkpoint's own size (224 for random inits). Default: the ``image_size`` setting."""
        return getattr(settings, "image_size", None)

    def check_data(self, root: Path, settings: Any) -> None:
        """Fast layout check; the default only asks for a folder."""
        if not root.is_dir():
            from dcbench.data import DataError  # noqa: PLC0415

            raise DataError(f"data root {root} is not a folder; {self.name} expects: "
                            f"{self.data_layout.strip().splitlines()[0]}")

    def run(self, ckpt: Any, settings: Any, root: Path, ctx: RunContext) -> ProtocolOutput:
        """Evaluate ``ckpt`` (a :class:`dcbench.checkpoint.LoadedCheckpoint`) on ``root``."""
        raise NotImplementedError

    def data_parallel(self, settings: Any) -> str | None:
        """None when ``run`` may run on every rank of a torchrun job (see the module docstring),
        else the one-line reason it cannot, which the runner shows before any work.

        Default: frozen-feature protocols can (their forward passes go through
        :meth:`RunContext.extract`); fine-tunes and probes trained on augmented crops
        (``cached=false``) cannot until they train data-parallel (a DistributedSampler over a
        global batch of the preset's size, gradients averaged over it): those override this,
        refusing only a batch size the processes do not divide (:func:`batch_refusal`).
        """
        one_process = "launch it as one process (no torchrun), or fan it out with compare --launcher"
        if self.finetune:
            return f"{self.name} fine-tunes the backbone, which is not data-parallel yet: {one_process}"
        if getattr(settings, "cached", None) is False:
            return (f"{self.name} with cached=false trains on augmented crops, which is not data-parallel yet: "
                    f"add --set cached=true (heads on extracted features), or {one_process}")
        return None


def batch_refusal(batch_size: int) -> str | None:
    """For :meth:`Protocol.data_parallel` of a protocol that trains on batches under torchrun
    (the global batch is ``batch_size``, each of the N processes reads ``batch_size / N``): the
    one-line reason when the launcher's N does not divide ``batch_size``, else None."""
    from dcbench.errors import UsageError  # noqa: PLC0415
    from dcbench.parallel import per_rank_batch  # noqa: PLC0415 (heavy: torch)
    from dcbench.train.distributed import env_world_size  # noqa: PLC0415

    try:
        per_rank_batch(int(batch_size), env_world_size())
    except UsageError as exc:
        return str(exc)
    return None


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


# ----------------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[Protocol]] = {}
_discovered = False


def register_protocol(cls: type[Protocol]) -> type[Protocol]:
    """Class decorator: register ``cls`` under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"protocol {cls.name!r} is registered twice "
                         f"({_REGISTRY[cls.name].__module__} and {cls.__module__})")
    _REGISTRY[cls.name] = cls
    return cls


def discover() -> None:
    """Load every entry of the ``dcbench.protocols`` entry-point group (once)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            loaded = ep.load()
            if callable(loaded) and not isinstance(loaded, type):
                loaded()
        except Exception as exc:  # a broken plugin must not break dcbench
            log.warning("protocol plugin %s failed to load: %s", ep.value, exc)
    if not _REGISTRY:
        log.warning("no protocol is registered: dcbench's entry points are missing; "
                    "reinstall it (`pip install -e .` in the repository)")


def list_protocols() -> list[str]:
    """Names of every registered protocol, sorted."""
    discover()
    return sorted(_REGISTRY)


def get_protocol(name: str) -> Protocol:
    """An instance of the protocol called ``name``; UsageError naming the choices otherwise."""
    discover()
    if name not in _REGISTRY:
        raise UsageError(f"unknown protocol '{name}'; available: {', '.join(sorted(_REGISTRY))} "
                         f"(see `dcbench protocols`)")
    return _REGISTRY[name]()
