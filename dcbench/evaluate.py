"""The runner: one protocol on one checkpoint, and sweeps of many, recorded in the store.

Every step protocols share happens here, once, in this order:

1. :func:`plan`: settings resolved and validated, the data layout checked (``check_data``
   runs once, before a checkpoint is loaded or any forward pass runs);
2. :func:`load_for`: the checkpoint, built at the protocol's input size;
3. :func:`run`: the run context (device, feature cache gated by the ``cache`` setting,
   workers, progress), seeding from the ``seed`` setting, the wall time, and the MoCo-style
   check that the checkpoint's backbone, and every frozen backbone the context handed out,
   kept their weights and BatchNorm buffers (a fine-tune works on a copy; a violation is a
   :class:`~dcbench.protocol.ProtocolError` naming the protocol, and nothing is stored);
4. :func:`sweep`: plans x checkpoints x seeds, skipping what the store already holds; it
   serves ``dcbench compare`` and the demo (:mod:`dcbench.launch` fans the same cells out to
   submitit jobs instead).

Under ``torchrun`` (data-parallel evaluation) every rank runs these steps: :func:`context_for`
joins the process group (:func:`join`; gloo on the CPU, NCCL on GPUs, as the trainer), the
protocol runs on every rank with its extraction sharded (:class:`~dcbench.protocol.RunContext`),
and only rank 0 reads and writes the store (:func:`main_store`) and prints. The record says
``world_size`` and ``launcher`` in ``extra``.

A result reaches the store in one transaction, with the protocol's per-image outcomes, only
after the protocol finished, so a failed or interrupted evaluation stores nothing. A re-run
of a stored comparability key and seed is stored beside the earlier record (and logged);
tables use the latest (dcbench.results).
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcbench import parallel
from dcbench.checkpoint import LoadedCheckpoint, resolve_checkpoint
from dcbench.data import metered_waits
from dcbench.data.fingerprint import tree_signature
from dcbench.env import features_cache_dir as env_features_cache_dir
from dcbench.env import git_hash, software_versions
from dcbench.errors import UsageError
from dcbench.progress import Overall
from dcbench.digest import tensor_digests
from dcbench.protocol import Protocol, RunContext, check_unchanged, get_protocol
from dcbench.results import Result, ResultStore, default_store_path, utc_now
from dcbench.seeding import seeded
from dcbench.settings import apply_settings, to_plain

log = logging.getLogger("dcbench")


def feature_cache_dir() -> Path:
    """``<cache root>/features``: ``$DCBENCH_CACHE/features`` or ``~/.cache/dcbench/features``
    (:func:`dcbench.env.cache_root`, shared with the pretrained downloads)."""
    return env_features_cache_dir()


@dataclass
class Plan:
    """A validated evaluation: protocol, resolved settings, data root."""

    protocol: Protocol
    settings: Any
    root: Path
    #: ``compare --seeds`` on a protocol whose numbers depend on the seed only through BatchNorm
    #: re-estimation (:func:`expand_seeds`): True = run on checkpoints whose BatchNorm is
    #: re-estimated (one plan per seed), False = on the others (one plan); None = on every checkpoint
    for_recalibrated: bool | None = None

    @property
    def plain_settings(self) -> dict[str, Any]:
        return to_plain(self.settings)

    @property
    def seed(self) -> int | None:
        return getattr(self.settings, "seed", None)


def plan(protocol_name: str, overrides: dict[str, Any], data_root: str | Path | None,
         check_data: bool = True) -> Plan:
    """Validate everything that can be validated without loading a checkpoint.

    ``check_data=False`` leaves the data layout to whoever runs the plan (a job of
    :mod:`dcbench.launch`: the data may be mounted only where the jobs run). Under torchrun a
    protocol that is not data-parallel (:meth:`~dcbench.protocol.Protocol.data_parallel`) is a
    UsageError here, before any work.
    """
    from dcbench.train.distributed import env_world_size  # noqa: PLC0415

    protocol = get_protocol(protocol_name)
    settings = apply_settings(protocol.default_settings(), overrides, owner=protocol_name)
    if data_root is None:
        raise UsageError(f"--data is required for {protocol_name}; it expects: "
                         f"{protocol.data_layout.strip().splitlines()[0]}")
    if env_world_size() > 1:
        reason = protocol.data_parallel(settings)
        if reason:
            raise UsageError(reason)
    root = Path(data_root).expanduser()
    if check_data:
        protocol.check_data(root, settings)
    return Plan(protocol, settings, root)


def with_seed(p: Plan, seed: int) -> Plan:
    """The same plan with another ``seed`` setting (for ``compare --seeds``)."""
    if not hasattr(p.settings, "seed"):
        raise UsageError(f"{p.protocol.name} has no seed setting; drop --seeds")
    return Plan(p.protocol, apply_settings(p.settings, {"seed": seed}), p.root)


def load_for(p: Plan, spec: str, arch: str | None = None, trust: bool = False) -> LoadedCheckpoint:
    """The checkpoint, with a random init built at the protocol's image size."""
    size = p.protocol.model_input_size(p.settings)
    return resolve_checkpoint(spec, arch=arch, trust=trust, input_size=size)


_JOINED: Any = None  # the DistInfo of the process group this process joined (torchrun)


def join(device: str = "auto") -> Any:
    """This process's :class:`~dcbench.train.distributed.DistInfo`: under torchrun (``WORLD_SIZE``
    > 1) the process group is joined once (gloo on the CPU, NCCL on GPUs, chosen from the device
    as the trainer does) and left at exit, and ranks > 0 log errors only; otherwise rank 0 of 1."""
    global _JOINED
    from dcbench.train.distributed import init_distributed, shutdown  # noqa: PLC0415

    if _JOINED is not None:
        return _JOINED
    info = init_distributed(device)
    if info.enabled:
        _JOINED = info
        atexit.register(shutdown, info)
        if not info.is_main:  # only rank 0 prints: the others' lines would repeat its own
            log.setLevel(logging.ERROR)
    return info


def context_for(p: Plan, device: str = "auto", progress: bool = False, strict: bool = False,
                cache_dir: Path | None = None) -> RunContext:
    """The run context of ``p``: device, feature cache (when the ``cache`` setting is on; ``cache_dir``
    or :func:`feature_cache_dir`), workers, ``--strict``, and its place in a data-parallel run
    (joining torchrun's process group if need be)."""
    from dcbench.train.distributed import launcher_name  # noqa: PLC0415

    info = join(device)
    use_cache = getattr(p.settings, "cache", True)
    return RunContext(device=str(info.device), cache_dir=(cache_dir or feature_cache_dir()) if use_cache else None,
                      workers=getattr(p.settings, "workers", 0), progress=progress and info.is_main, strict=strict,
                      settings=p.settings, protocol=p.protocol.name, rank=info.rank, world_size=info.world_size,
                      launcher=launcher_name())


@contextmanager
def main_store(path: str | Path | None = None) -> Iterator[ResultStore | None]:
    """The results store (``path`` or the default) on rank 0, None on the other ranks of a
    torchrun job: only one process ever writes the SQLite file."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield None
        return
    with ResultStore(path or default_store_path()) as store:
        yield store


def run(p: Plan, ckpt: LoadedCheckpoint, ctx: RunContext) -> Result:
    """Run the protocol and wrap its output into a full :class:`Result` record."""
    ctx.settings, ctx.protocol = p.settings, p.protocol.name
    started, t0 = utc_now(), time.perf_counter()
    tree = tree_signature(p.root)  # before the run: the data it read (see stored())
    original = ("checkpoint backbone", ckpt.backbone, tensor_digests(ckpt.backbone))
    with seeded(p.seed), metered_waits() as waits:
        output = p.protocol.run(ckpt, p.settings, p.root, ctx)
    if not p.protocol.finetune:
        for entry in [original, *ctx.frozen]:
            check_unchanged(entry, p.protocol.name)
    else:  # a fine-tune trains a copy: the checkpoint itself must still be what was loaded
        check_unchanged(original, p.protocol.name)
    extra = {**output.extra, "checkpoint_format": ckpt.format, "device": ctx.device,
             **_execution_facts(output, ctx), "load_wait_s": round(waits.seconds, 3)}
    # a protocol may say per run (e.g. seed-driven BatchNorm re-estimation of a random init)
    extra.setdefault("seed_dependent", p.protocol.seed_dependent or bool((ctx.bn_info or {}).get("ran")))
    # the card's known deviations from the preset's source + every --set away from the preset
    extra["deviations"] = [d.to_dict() for d in p.protocol.deviations(p.settings)]
    if ctx.bn_info is not None and "bn_recalibrate" not in extra:
        extra["bn_recalibrate"] = ctx.bn_info
    if "file_sha256" in ckpt.meta:
        extra["checkpoint_file_sha256"] = ckpt.meta["file_sha256"]
    if ckpt.meta.get("unverified"):  # a `pretrained add --force` file: tables say so
        extra["checkpoint_unverified"] = True
    return Result(protocol=p.protocol.name, protocol_version=p.protocol.version, checkpoint=ckpt.identity(),
                  settings=p.plain_settings,
                  data={"root": str(p.root.resolve()), "fingerprint": output.data_fingerprint, "tree": tree},
                  metrics=list(output.metrics), versions=software_versions(), git=git_hash(), started=started,
                  wall_s=round(time.perf_counter() - t0, 3), extra=extra, outcomes=dict(output.outcomes or {}))


def _execution_facts(output: Any, ctx: RunContext) -> dict[str, Any]:
    """How the run was executed: ``world_size``, ``launcher``, ``workers`` (the DataLoader count),
    ``extract_s`` (time in the context's extraction) and ``extract_wait_s`` (of it, the time its
    forward passes waited for images; :func:`run` adds ``load_wait_s``, every loop's wait for
    images in the run: extraction, training and testing passes) and, under torchrun, how the ranks shared the work and
    whether they agree (each computed the metrics; rank 0's are stored)."""
    # the loader processes this run started ("auto" resolves per machine; no number depends on it)
    facts: dict[str, Any] = {"world_size": ctx.world_size, "launcher": ctx.launcher, "workers": ctx.workers}
    if ctx.extract_seconds:
        facts["extract_s"] = round(ctx.extract_seconds, 3)
        facts["extract_wait_s"] = round(ctx.extract_wait_seconds, 3)
    if ctx.world_size == 1:
        return facts
    facts["data_parallel"] = ("forward passes sharded across ranks (extraction or training shares), the rest "
                              "computed on every rank" if ctx.sharded_extractions
                              else "computed on every rank (no sharded extraction)")
    if not ctx.sharded_extractions:
        log.warning("%s extracted nothing through the run context: every rank did all the work (no speed-up)",
                    ctx.protocol)
    values = ctx.gather([(m.metric, m.tap, m.selection, m.value) for m in output.metrics])
    if values is not None:
        spread = max((abs(a[3] - b[3]) for other in values[1:] for a, b in zip(values[0], other)), default=0.0)
        facts["ranks_max_abs_diff"] = spread
        if spread > 0 or any(len(v) != len(values[0]) for v in values):
            log.warning("ranks computed different metrics (max difference %.3g); rank 0's are stored", spread)
    return facts


def run_and_store(p: Plan, ckpt: LoadedCheckpoint, store: ResultStore | None, ctx: RunContext) -> Result:
    """:func:`run`, then store the result and its per-image outcomes in one transaction (on
    rank 0 only: ``store`` is None on the other ranks of a torchrun job)."""
    result = run(p, ckpt, ctx)
    if store is None:
        return result
    earlier = store.trials(result.key(), result.seed)
    store.add(result)
    if earlier:
        log.info("the store already held %d result(s) of this key and seed %s: kept (tables use the latest; "
                 "`dcbench results list` shows them)", earlier, result.seed)
    return result


def stored(p: Plan, ckpt: LoadedCheckpoint, store: ResultStore,
           trees: dict[Path, str | None] | None = None) -> Result | None:
    """The latest stored result for this checkpoint, protocol version, settings and data root, if
    any, unless the data at that root changed since (its folders' :func:`tree_signature` differs:
    files added, removed or renamed; not checked for records older than the signature, or where
    the root cannot be read here, e.g. mounted only where jobs run). ``trees`` memoises the
    signatures over a sweep."""
    root = str(p.root.resolve())
    found = [r for r in store.find(ckpt.sha256, p.protocol.name, p.plain_settings)
             if r.protocol_version == p.protocol.version and r.data.get("root") == root]
    if any(r.data.get("tree") for r in found):
        trees = {} if trees is None else trees
        if p.root not in trees:
            trees[p.root] = tree_signature(p.root)
        now = trees[p.root]
        found = [r for r in found if now is None or r.data.get("tree") in (None, now)]
    return found[-1] if found else None


def expand_seeds(plans: Sequence[Plan], seeds: Sequence[int] | None) -> list[Plan]:
    """One plan per (plan, seed); ``plans`` unchanged when ``seeds`` is empty. A protocol whose
    result does not depend on the seed (``seed_dependent = False``) runs once, not per seed,
    except on checkpoints whose BatchNorm it re-estimates (``bn_recalibrate``: a random init
    with 'auto', every checkpoint with 'on'): the seed draws the calibration images, so those
    get a run per seed and their cells the spread over seeds (:func:`applies_to`)."""
    if not seeds:
        return list(plans)
    out = []
    for p in plans:
        if p.protocol.seed_dependent:
            out += [with_seed(p, seed) for seed in seeds]
        elif getattr(p.settings, "bn_recalibrate", "off") != "off":
            out += [dataclasses.replace(p, for_recalibrated=False)]
            out += [dataclasses.replace(with_seed(p, seed), for_recalibrated=True) for seed in seeds]
        else:
            out.append(p)
    return out


def applies_to(p: Plan, ckpt: LoadedCheckpoint) -> bool:
    """Whether plan ``p`` runs on ``ckpt`` (see :attr:`Plan.for_recalibrated`)."""
    if p.for_recalibrated is None:
        return True
    from dcbench.features import has_batchnorm, wants_bn_recalibration  # noqa: PLC0415 (heavy: torch)

    recalibrated = wants_bn_recalibration(p.settings.bn_recalibrate, ckpt.format) and has_batchnorm(ckpt.backbone)
    return p.for_recalibrated == recalibrated


def split_overrides(protocols: Sequence[str], overrides: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-protocol settings from ``--set`` assignments for several protocols.

    ``NAME.key`` applies to protocol NAME only; a bare ``key`` applies to every protocol whose
    settings have it and is a UsageError only when none has it. A scoped value wins over a bare
    one. A scope that is not among ``protocols`` is a UsageError.
    """
    fields = {name: {f.name for f in dataclasses.fields(get_protocol(name).Settings)} for name in protocols}
    out: dict[str, dict[str, Any]] = {name: {} for name in protocols}
    scoped: dict[str, dict[str, Any]] = {name: {} for name in protocols}
    for key, value in overrides.items():
        scope, dot, bare = key.partition(".")
        if dot and scope in fields:
            scoped[scope][bare] = value
            continue
        if dot and scope not in fields:
            raise UsageError(f"--set {key}: '{scope}' is not one of the --protocol values "
                             f"({', '.join(protocols)})")
        takers = [name for name in protocols if key in fields[name]]
        if not takers:
            raise UsageError(f"unknown setting '{key}' for {', '.join(protocols)} (no protocol has it); "
                             f"see `dcbench protocols NAME`")
        for name in takers:
            out[name][key] = value
    for name in protocols:
        out[name].update(scoped[name])  # validated (unknown keys named) by plan()
    return out


@dataclass
class SweepItem:
    """One cell of a sweep: which plan, which checkpoint, the result, whether it was stored."""

    plan: Plan
    checkpoint: LoadedCheckpoint
    result: Result
    reused: bool


def sweep_cells(plans: Sequence[Plan], specs: Sequence[str], store: ResultStore | None, *,
                arch: str | None = None, trust: bool = False, reuse: bool = True,
                on_skip: Callable[[], None] | None = None) -> Iterable[tuple[str, Plan, LoadedCheckpoint,
                                                                             Result | None]]:
    """``(spec, plan, checkpoint, stored result or None)`` for every checkpoint spec and plan that
    :func:`applies_to` it (``on_skip`` is called for each one that does not), checkpoint by
    checkpoint; a checkpoint is loaded once per input size the plans need. The store is read
    on rank 0 (``store`` None elsewhere) and its answer broadcast, so every rank of a torchrun
    job walks the same cells."""
    trees: dict[Path, str | None] = {}
    for spec in specs:
        loaded: dict[int | None, LoadedCheckpoint] = {}
        for p in plans:
            size = p.protocol.model_input_size(p.settings)
            if size not in loaded:
                loaded[size] = load_for(p, spec, arch=arch, trust=trust)
            ckpt = loaded[size]
            if not applies_to(p, ckpt):
                if on_skip is not None:
                    on_skip()
                continue
            found = stored(p, ckpt, store, trees) if reuse and store is not None else None
            yield spec, p, ckpt, parallel.broadcast_object(found)


def sweep(plans: Sequence[Plan], specs: Sequence[str], store: ResultStore | None, *, device: str = "auto",
          arch: str | None = None, trust: bool = False, progress: bool = False, strict: bool = False,
          reuse: bool = True, on_item: Callable[[SweepItem], None] | None = None, cache_dir: Path | None = None,
          desc: str = "compare") -> list[SweepItem]:
    """Evaluate every checkpoint spec with every plan (seeds expanded beforehand, see
    :func:`expand_seeds`) in this process (every rank of a torchrun job), skipping results the
    store already holds for the same checkpoint, protocol and settings when ``reuse``
    (:func:`sweep_cells`). With ``progress``, one line per evaluation: n of N done and the ETA
    (:class:`dcbench.progress.Overall`, named ``desc``)."""
    info = join(device)  # first: ranks > 0 go quiet before anything logs
    items = []
    overall = Overall(len(plans) * len(specs), desc, "evaluations", enabled=progress and info.is_main)
    for _spec, p, ckpt, result in sweep_cells(plans, specs, store, arch=arch, trust=trust, reuse=reuse,
                                              on_skip=overall.drop):
        if result is None:
            log.info("running %s on %s (seed %s)", p.protocol.name, ckpt.name, p.seed)
            ctx = context_for(p, device, progress=progress, strict=strict, cache_dir=cache_dir)
            result = run_and_store(p, ckpt, store, ctx)
            item = SweepItem(p, ckpt, result, reused=False)
        else:
            log.info("stored: %s on %s (seed %s)", p.protocol.name, ckpt.name, p.seed)
            item = SweepItem(p, ckpt, result, reused=True)
        overall.step(free=item.reused)
        items.append(item)
        if on_item is not None:
            on_item(item)
    return items
