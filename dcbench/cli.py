"""The ``dcbench`` command line (click).

Errors a user can cause end with one ``error: ...`` line on stderr and exit code 1 (2 for
usage); ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

import dcbench
from dcbench import lazycli
from dcbench.errors import DcbenchError

log = logging.getLogger("dcbench")


class _Group(click.Group):
    """Turns user errors into one line and an exit code; ``--debug`` keeps the traceback.

    Command groups that live in other modules (``dcbench viz``, ``dcbench report``) and those of
    the ``dcbench.commands`` entry-point group are imported only when they are run: each pulls
    in torch, and ``dcbench --help`` must start in well under a second. The help listing reads
    their one-line help from the source (:mod:`dcbench.lazycli`) without importing them.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.commands = lazycli.LazyCommands(self, self.commands)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return lazycli.command_names(self)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return self.commands.get(cmd_name)  # imports a lazy command on first use

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        lazycli.help_listing(self, ctx, formatter)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except DcbenchError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {_user_message(exc)}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(130)
        except BrokenPipeError:
            # the reader went away (`dcbench protocols | head`): stop quietly, as a tool killed by
            # SIGPIPE does; stdout goes to /dev/null so the interpreter's final flush cannot fail
            # (the recipe of Python's signal module documentation, "Note on SIGPIPE")
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            ctx.exit(141)
        except Exception as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            if isinstance(exc, OSError) and _is_user_os_error(exc):
                click.echo(f"error: {_os_error_message(exc)}", err=True)
                ctx.exit(1)
            if _peer_stopped(exc):  # the process that stopped first printed the cause
                click.echo(f"error: process {os.environ.get('RANK', '?')} of this torchrun job stopped because "
                           f"another one ended first (its error line says why)", err=True)
                ctx.exit(1)
            # a bug: still one line
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            click.echo(f"error: internal error {type(exc).__name__}: {message} "
                       f"(rerun with --debug for the traceback and please report it)", err=True)
            ctx.exit(1)


#: errors of the file system a user controls (permissions, read-only mounts, full disks, missing
#: folders), whatever code ran into them: one line naming the path, not an "internal error"
_USER_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOENT,
                          errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG})


#: what gloo and NCCL raise in the processes left when one process of the job exits
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing",
              "NCCL communicator was aborted")


def _peer_stopped(exc: Exception) -> bool:
    """A collective failed because another process of this torchrun job ended (its own error, or a
    kill): not a bug of this process, which would otherwise print an "internal error"."""
    return (int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and isinstance(exc, RuntimeError)
            and any(text in str(exc) for text in _PEER_GONE))


def _is_user_os_error(exc: OSError) -> bool:
    """A file-system error on a path the user chose (not one of dcbench's own files: that is a bug)."""
    if exc.errno not in _USER_ERRNOS or exc.filename is None:
        return False
    return not _is_under(Path(os.fsdecode(exc.filename)), Path(dcbench.__file__).parent)


def _os_error_message(exc: OSError) -> str:
    """``cannot use PATH (Read-only file system); FIX`` for a file-system error on PATH. dcbench's
    atomic writes and staged folders fail on hidden siblings of the target (fileio.atomic_write:
    ``.NAME.XXXX.tmp``; fixtures: ``.NAME.partial-...``): the message names the target instead."""
    from dcbench.env import cache_root

    path = Path(os.fsdecode(exc.filename))
    staged = re.fullmatch(r"\.(.+?)(?:\.[^.]+\.tmp|\.partial-.*)", path.name)
    if staged:
        path = path.with_name(staged.group(1))
    reason = exc.strerror or type(exc).__name__
    if exc.errno in (errno.EEXIST, errno.ENOTDIR) and path.is_file():  # a file where a folder must be
        reason = "a file where a folder is needed"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space or write elsewhere"
    elif _is_under(path, cache_root()):
        fix = "set DCBENCH_CACHE to a writable folder"
    else:
        fix = "check the path and its permissions, or choose another"
    return f"cannot use {path} ({reason}); {fix}"


def _is_under(path: Path, folder: Path) -> bool:
    try:
        return path.absolute().is_relative_to(folder.expanduser().absolute())
    except OSError:
        return False


def _user_message(exc: BaseException) -> str:
    """The one line of a user error. A DataLoader worker re-raises an error as the same type with
    "Caught X in DataLoader worker process N. Original Traceback ..." (torch/_utils.py
    ExceptionWrapper.reraise): the original message is the traceback's last line."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        name, sep, message = last.partition(": ")
        text = message if sep and name.split(".")[-1] == type(exc).__name__ else last
    return " ".join(text.split())


def _setup_logging(debug: bool, quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    log.propagate = False


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(dcbench.__version__, prog_name="dcbench")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
@click.pass_context
def main(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """dcbench: train DeepCluster and evaluate vision checkpoints with standard protocols."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    _setup_logging(debug, quiet)


# ----------------------------------------------------------------------------- checkpoint
@main.group()
def checkpoint() -> None:
    """Inspect and convert checkpoints (dcbench, DeepCluster, torchvision, timm, MoCo, Lightning, VISSL)."""


_arch_option = click.option("--arch", default=None, help="Architecture, when the file does not tell "
                            "(alexnet, vgg16, timm:NAME, tv:NAME).")
_trust_option = click.option("--trust-checkpoint", "trust", is_flag=True,
                             help="Allow full unpickling (can run code: only for files you trust).")


@checkpoint.command("inspect")
@click.argument("ckpt")
@_arch_option
@_trust_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def checkpoint_inspect(ckpt: str, arch: str | None, trust: bool, as_json: bool) -> None:
    """Print format, arch, taps, parameter count and sha256 of CKPT (a file or random:ARCH)."""
    import json

    from dcbench.checkpoint import resolve_checkpoint

    loaded = resolve_checkpoint(ckpt, arch=arch, trust=trust)
    info = {"checkpoint": ckpt, "format": loaded.format, **loaded.backbone.describe(),
            "sha256": loaded.sha256,
            "epoch": loaded.meta.get("epoch"),
            "load_report": loaded.report.summary() if loaded.report else None}
    if as_json:
        click.echo(json.dumps(info))
        return
    for key, value in info.items():
        if isinstance(value, list):
            value = ", ".join(map(str, value))
        click.echo(f"{key:>12}: {value}")


@checkpoint.command("convert")
@click.argument("src")
@click.argument("dst", type=click.Path(dir_okay=False))
@click.option("--to", "target", type=click.Choice(["dcbench", "torchvision", "detectron2"]), default="dcbench",
              show_default=True, help="Output format (detectron2: a ResNet as a detectron2 .pkl).")
@_arch_option
@_trust_option
def checkpoint_convert(src: str, dst: str, target: str, arch: str | None, trust: bool) -> None:
    """Convert SRC (any supported format) to DST."""
    from dcbench.convert import convert_checkpoint

    out = convert_checkpoint(src, dst, target, arch=arch, trust=trust)
    click.echo(f"wrote {out} ({target} format)")


# ----------------------------------------------------------------------------- train
_TRAIN_FLAGS = {"data": "data", "arch": "arch", "sobel": "sobel", "k": "k", "epochs": "epochs",
                "batch_size": "batch_size", "image_size": "image_size", "out": "out",
                "checkpoint_every": "checkpoint_every", "clustering": "clustering", "workers": "workers",
                "strict": "strict", "device": "device", "method": "method", "preset": "preset"}


@main.command()
@click.option("--data", help="Training images: an ImageFolder, a folder of images, or a text file list.")
@click.option("--method", type=click.Choice(["deepcluster", "deepcluster-v2"]),
              help="deepcluster (default: v1, ECCV 2018) or deepcluster-v2 (SwAV paper, appendix).")
@click.option("--preset", type=click.Choice(["paper", "small-data"]),
              help="paper (default: the published recipe) or small-data (batch, lr, epochs, clusters from the "
                   "number of images; README, Training).")
@click.option("--arch", help="alexnet (default) | vgg16 | timm:NAME | tv:NAME.")
@click.option("--sobel/--no-sobel", default=None, help="Fixed Sobel front end (default: on, as in the paper).")
@click.option("--k", type=int, help="Number of clusters, v1 (default 10000; v2: --set prototypes=[K,K,K]).")
@click.option("--epochs", type=int, help="Epochs (default 500).")
@click.option("--batch-size", type=int, help="Batch size per process (default 256).")
@click.option("--image-size", type=int, help="Crop side in pixels (default 224; 64 for small data).")
@click.option("--out", help="Run folder (default runs/deepcluster).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.pth.")
@click.option("--checkpoint-every", type=int, help="Also checkpoint every N iterations (default: per epoch).")
@click.option("--clustering", type=click.Choice(["kmeans", "pic"]), help="Clustering method (default kmeans).")
@click.option("--workers", type=int, help="Data loader workers (default: usable cores, at most 8).")
@click.option("--strict", is_flag=True, default=None, help="Stop at the first unreadable image.")
@click.option("--device", help="auto (default) | cpu | cuda | cuda:N.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file of settings.")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="Any setting, e.g. --set pca_dim=32 --set reassign=4 (see dcbench train --list-settings).")
@click.option("--list-settings", is_flag=True, help="Print every setting with its default and exit.")
def train(resume: bool, config_file: str | None, assignments: tuple[str, ...], list_settings: bool,
          **flags) -> None:
    """Train DeepCluster (defaults = the paper's recipe) or DeepCluster-v2 (--method deepcluster-v2:
    the SwAV repository's recipe). Also under torchrun: torchrun --nproc-per-node N -m dcbench train ..."""
    from dcbench.settings import describe_fields, load_yaml_settings, parse_assignments
    from dcbench.train import train as run_training
    from dcbench.train.presets import __doc__ as preset_rules, resolve_config

    overrides: dict = load_yaml_settings(config_file) if config_file else {}
    overrides.update({_TRAIN_FLAGS[k]: v for k, v in flags.items() if v is not None})
    overrides.update(parse_assignments(assignments))
    if list_settings:  # the method's settings, resolved with the preset when --data says N
        _check_method_keys(overrides)
        cfg = resolve_config(overrides)
        for name, type_name, _, help_text in describe_fields(type(cfg)):
            click.echo(f"{name:<24} {str(getattr(cfg, name)):<18} {help_text}")
        if cfg.preset == "small-data" and not cfg.data:
            click.echo("\n(pass --data to see the small-data values for your images)\n" + preset_rules)
        return
    if resume:
        overrides = _resume_overrides(overrides)
    _check_method_keys(overrides)
    cfg = resolve_config(overrides)
    if not cfg.data:
        raise click.UsageError("--data is required (an ImageFolder, a folder of images, or a file list)")
    try:
        out = run_training(cfg, resume=resume)
    except KeyboardInterrupt:
        _interrupted_run(Path(cfg.out))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: once, not once per process
        click.echo(f"run folder: {out}")


def _check_method_keys(overrides: dict) -> None:
    """``--k`` is v1's number of clusters: for v2 say what to use instead of "unknown setting 'k'"."""
    from dcbench.errors import UsageError

    if overrides.get("method") == "deepcluster-v2" and "k" in overrides:
        raise UsageError("--k is DeepCluster v1's number of clusters; deepcluster-v2 takes one K per head: "
                         "--set prototypes=[K,K,K]")


def _interrupted_run(run_dir: Path) -> None:
    """Ctrl-C during training: say whether the run can continue (its checkpoints are written
    atomically, so the last one is whole), then exit 130 as a shell does for SIGINT."""
    if (run_dir.expanduser() / "checkpoint.pth").is_file():
        click.echo(f"error: interrupted; continue from the last checkpoint with: dcbench train --out "
                   f"{shlex.quote(str(run_dir))} --resume", err=True)
    else:
        click.echo("error: interrupted before the first checkpoint; nothing to resume", err=True)
    raise click.exceptions.Exit(130)


def _resume_overrides(overrides: dict) -> dict:
    """``train --resume``: the run's saved settings (``OUT/config.yaml``) with what the command line
    says on top; the trainer then refuses any change but those ``RESUME_MAY_CHANGE`` allows."""
    from dcbench.errors import UsageError
    from dcbench.settings import load_yaml_settings
    from dcbench.train import config_class

    run_dir = Path(str(overrides.get("out") or config_class(overrides.get("method") or "deepcluster")().out))
    saved_path = run_dir.expanduser() / "config.yaml"
    if not saved_path.is_file():
        if overrides.get("data"):  # the trainer names the missing checkpoint
            return overrides
        raise UsageError(f"nothing to resume: {run_dir} holds no run (no config.yaml); pass the run's folder "
                         f"as --out, or drop --resume and pass --data to start a run")
    saved = load_yaml_settings(saved_path)
    method, asked = saved.get("method", "deepcluster"), overrides.get("method")
    if asked and asked != method:  # else: "unknown setting" for a key of the other method's config.yaml
        raise UsageError(f"cannot resume {run_dir} with method {asked}: it is a {method} run; drop --method, "
                         f"or start a new run with another --out")
    return {**saved, **overrides}


# ----------------------------------------------------------------------------- protocols
@main.command("protocols")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True,
              help="Print NAME's provenance card as JSON: name, version, settings, sources, deviations.")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="Show the card for these settings (e.g. --set preset=vissl); a changed setting is a deviation.")
@click.option("--markdown", is_flag=True, help="Print every protocol's card as Markdown (docs/protocols.md).")
def protocols_cmd(name: str | None, as_json: bool, assignments: tuple[str, ...], markdown: bool) -> None:
    """List the protocols, or describe NAME: data layout, settings with their sources, deviations."""
    import json

    from dcbench.errors import UsageError
    from dcbench.protocol import get_protocol, list_protocols
    from dcbench.provenance import card_dict, card_lines, protocols_markdown
    from dcbench.settings import parse_assignments

    if markdown:
        if name or as_json or assignments:
            raise UsageError("--markdown prints every protocol's card with its defaults: drop NAME, --json and "
                             "--set (or drop --markdown to describe NAME)")
        click.echo(protocols_markdown([get_protocol(n) for n in list_protocols()]), nl=False)
        return
    if name is None:
        if as_json or assignments:
            raise UsageError("--json and --set describe one protocol: dcbench protocols NAME --json")
        for proto_name, facts in _protocol_facts().items():
            click.echo(f"{proto_name:<18} {facts['description']}")
        return
    proto = get_protocol(name)
    card = card_dict(proto, parse_assignments(assignments))
    if as_json:
        click.echo(json.dumps(card, indent=2))
        return
    click.echo(f"{proto.name} (version {proto.version}): {proto.description}\n")
    click.echo("data layout (--data ROOT):")
    for line in proto.data_layout.strip().splitlines():
        click.echo(f"  {line}")
    click.echo("")
    for line in card_lines(proto, card):
        click.echo(line)


# ----------------------------------------------------------------------------- eval
def _non_empty_store(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """``--store $UNSET_VAR`` must never mean the default store silently."""
    if value is not None and not value.strip():
        raise click.BadParameter("is empty; give the results database file, e.g. --store results.db")
    return value


_store_option = click.option("--store", type=click.Path(dir_okay=False), callback=_non_empty_store,
                             help="Results database (default $DCBENCH_STORE or ~/.dcbench/results.db).")


def _store_path(path: str | None) -> Path:
    from dcbench.results import default_store_path

    return Path(path).expanduser() if path else default_store_path()


def _said_store(path: str | Path, what: str = "results store:") -> None:
    """The one line every command that reads or writes the store gives: which file (INFO, stderr)."""
    log.info("%s %s", what, Path(path).expanduser())


def _check_protocols(names: tuple[str, ...] | list[str], store_path: Path | None = None) -> None:
    """UsageError (exit 2) naming the choices unless every name is a registered protocol or one
    the store holds results of (a plugin uninstalled since)."""
    if not any(names):
        return  # importing every protocol (torch, their libraries) to check no name costs seconds
    from dcbench.errors import UsageError
    from dcbench.protocol import list_protocols

    known = set(list_protocols())
    unknown = [n for n in names if n and n not in known]
    if unknown and store_path is not None and store_path.is_file():
        from dcbench.results import ResultStore

        with ResultStore(store_path, readonly=True) as db:
            known |= {r.protocol for r in db.results()}
        unknown = [n for n in unknown if n not in known]
    if unknown:
        raise UsageError(f"unknown protocol '{unknown[0]}'; choose from: {', '.join(sorted(known))} "
                         f"(see `dcbench protocols`)")


_strict_option = click.option("--strict", is_flag=True,
                              help="Stop at the first unreadable image (default: skip it, count it, warn once). Features "
                                   "read back from the feature cache read no image: add --set cache=false to check all.")


def _print_result(result) -> None:
    rows = [(m.tap or "-", m.metric, m.split or "-", m.selection or "-", f"{m.value:.2f}") for m in result.metrics]
    header = ("tap", "metric", "split", "selection", "value")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(5)]
    click.echo(f"{result.protocol} on {result.checkpoint['name']} ({result.checkpoint['sha256'][:12]}), "
               f"{result.wall_s:.1f}s")
    for r in [header, *rows]:
        click.echo("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))


def _launch_options(fn):
    """--launcher and its options (dcbench.launch): one submitit job per missing result."""
    options = [
        click.option("--launcher", type=click.Choice(["local", "slurm"]),
                     help="Run each missing result as a submitit job: local (processes on this machine) or slurm "
                          "(default: everything in this process). Only this process writes the store."),
        click.option("--jobs", type=int, help="At most N jobs at once (default: 1 local, all on slurm)."),
        click.option("--job-dir", type=click.Path(file_okay=False),
                     help="Job folders: records and logs (default $DCBENCH_JOBS or ~/.dcbench/jobs; on SLURM a "
                          "folder every node sees)."),
        click.option("--slurm-partition", help="SLURM partition."),
        click.option("--slurm-time", help="Time limit per job: MINUTES, HH:MM:SS or D-HH:MM:SS (default 24 h "
                                          "on SLURM; also stops local jobs)."),
        click.option("--slurm-account", help="SLURM account."),
        click.option("--gpus-per-job", type=int, default=0, show_default=True,
                     help="GPUs per job; data-parallel protocols run one process per GPU."),
        click.option("--cpus-per-job", type=int, help="CPUs per job, shared by its processes (SLURM cpus-per-task = "
                                                      "CPUS / processes; torch threads)."),
        click.option("--slurm-option", multiple=True, metavar="KEY=VALUE",
                     help="Any other sbatch option, e.g. --slurm-option qos=high --slurm-option constraint=a100."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@main.command("eval")
@click.option("--protocol", "protocol_name", required=True, help="Protocol name (see `dcbench protocols`).")
@click.option("--checkpoint", "spec", required=True, help="A checkpoint file, pretrained:NAME, random:ARCH, timm:NAME or tv:NAME.")
@click.option("--data", "data_root", type=click.Path(), help="Dataset root in the protocol's layout.")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE", help="Protocol setting.")
@_store_option
@click.option("--json", "as_json", is_flag=True, help="Print the result record as one JSON line (last line).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N.")
@_strict_option
@_arch_option
@_trust_option
@_launch_options
def eval_cmd(protocol_name: str, spec: str, data_root: str | None, assignments: tuple[str, ...], store: str | None,
             as_json: bool, device: str, strict: bool, arch: str | None, trust: bool, launcher: str | None,
             **launch) -> None:
    """Evaluate one checkpoint with one protocol and store the result. Data-parallel under torchrun:
    torchrun --nproc-per-node N -m dcbench eval ... (rank 0 prints and stores one record). With
    --launcher: as one submitit job, unless the store already holds this result (as compare)."""
    from dcbench import evaluate
    from dcbench.settings import parse_assignments

    if launcher is not None:
        return _eval_as_job(protocol_name, spec, data_root, parse_assignments(assignments), store, as_json, device,
                            strict, arch, trust, launcher, launch)
    from dcbench.launch import launch_options

    launch_options(None, **launch)  # --jobs, --slurm-* without --launcher: a usage error, not ignored
    plan = evaluate.plan(protocol_name, parse_assignments(assignments), data_root)  # data checked here, first
    ctx = evaluate.context_for(plan, device, progress=True, strict=strict)  # under torchrun: joins the process group
    with evaluate.main_store(store) as db:  # None on ranks > 0: only rank 0 writes and prints
        ckpt = evaluate.load_for(plan, spec, arch=arch, trust=trust)
        result = evaluate.run_and_store(plan, ckpt, db, ctx)
    if not ctx.is_main:
        return
    _said_store(_store_path(store), f"stored as result {result.id} in")
    _print_result(result)
    if as_json:
        click.echo(result.to_json())


def _eval_as_job(protocol_name: str, spec: str, data_root: str | None, overrides: dict, store: str | None,
                 as_json: bool, device: str, strict: bool, arch: str | None, trust: bool, launcher: str,
                 launch: dict) -> None:
    """``eval --launcher``: compare's fan-out (dcbench.launch) for one cell; the job checks the data
    where it runs, this process stores the record once and prints it."""
    from dcbench import evaluate
    from dcbench.launch import fan_out, launch_options

    jobs = launch_options(launcher, **launch)
    plan = evaluate.plan(protocol_name, overrides, data_root, check_data=False)
    with evaluate.main_store(store) as db:
        done = fan_out([plan], [spec], db, jobs, device=device, arch=arch, trust=trust, strict=strict)
        _said_store(db.path)
    if done.failures:
        raise DcbenchError("the job failed (its line above names its log); fix the cause and run the same "
                           "command again")
    (item,) = done.items
    if item.reused:
        click.echo(f"already stored as result {item.result.id}: nothing submitted")
    _print_result(item.result)
    if as_json:
        click.echo(item.result.to_json())


# ----------------------------------------------------------------------------- tables
def _parse_seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"'{text}' is not a comma-separated list of integers", param_hint="--seeds")
    if not seeds:  # an empty list would silently mean "the default seed"
        raise click.BadParameter("give at least one seed, e.g. --seeds 0,1,2", param_hint="--seeds")
    return seeds


def _split_list(values: tuple[str, ...]) -> list[str] | None:
    """Repeatable options that also take comma-separated lists; None when not given."""
    out = [v.strip() for text in values for v in text.split(",") if v.strip()]
    return out or None


def _table_options(fn):
    """--metric, --tap, --reference, --selection: what every table command shares."""
    options = [
        click.option("--metric", "metrics", multiple=True, metavar="NAME",
                     help="Metrics to show (repeatable, globs ok, e.g. 'AP_*'); 'headline' (default): each "
                          "protocol's headline metric (top1, top1_k20, mAP, AP50, mIoU); 'all': every metric."),
        click.option("--tap", "taps", multiple=True, metavar="TAP", help="Only these taps (repeatable, globs ok)."),
        click.option("--reference", help="Checkpoint row to compare every other row with (paired difference, "
                                         "95% CI, significance mark)."),
        click.option("--selection", type=click.Choice(["final", "best"]), default="final", show_default=True,
                     help="Probe epoch to report (final is the standard; best is selected on val)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _metrics(values: tuple[str, ...]) -> list[str]:
    from dcbench.leaderboard import HEADLINE

    return _split_list(values) or [HEADLINE]


def _protocol_facts() -> dict[str, dict]:
    """Description, headline metrics and seed dependence of every registered protocol, from the
    cache :func:`dcbench.lazycli.protocol_facts` keeps (the tables need them; importing every
    protocol for them would cost seconds of start-up)."""
    from dcbench.protocol import get_protocol, list_protocols

    def compute() -> dict[str, dict]:
        protocols = {name: get_protocol(name) for name in list_protocols()}
        return {name: {"description": p.description, "seed_dependent": bool(p.seed_dependent),
                       "headline_metrics": list(getattr(p, "headline_metrics", None) or []) or None}
                for name, p in protocols.items()}

    return lazycli.protocol_facts(compute)


def _table_callbacks() -> dict[str, Callable[[str], Any]]:
    """``build_table``'s questions about protocols, answered from :func:`_protocol_facts`: seed
    dependence for records older than their ``seed_dependent`` flag (True for a protocol not
    installed here) and the headline metric patterns (None: undeclared or not installed)."""
    facts = _protocol_facts()
    return {"seed_dependent": lambda name: bool(facts.get(name, {}).get("seed_dependent", True)),
            "headlines": lambda name: facts.get(name, {}).get("headline_metrics")}


def _parse_data(values: tuple[str, ...], protocols: tuple[str, ...]) -> dict[str, str | None]:
    """``--data ROOT`` (shared) and ``--data NAME=ROOT`` (one protocol) -> root per protocol."""
    from dcbench.errors import UsageError

    from dcbench.protocol import list_protocols

    shared, own = None, {}
    for value in values:
        name, sep, root = value.partition("=")
        if sep and name in protocols:
            own[name] = root
        elif sep and name in list_protocols() and not Path(value).expanduser().exists():
            raise UsageError(f"--data {value}: '{name}' is not one of the --protocol values "
                             f"({', '.join(protocols)})")
        elif shared is not None:
            raise UsageError(f"--data given twice without a protocol ({shared}, {value}); "
                             f"use --data NAME=ROOT for one protocol")
        else:
            shared = value
    return {name: own.get(name, shared) for name in protocols}


@main.command("compare")
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--protocol", "protocol_names", multiple=True, required=True, help="Protocol (repeatable).")
@click.option("--data", "data_roots", multiple=True, metavar="[NAME=]ROOT",
              help="Dataset root for every protocol, or NAME=ROOT for protocol NAME only (repeatable).")
@click.option("--set", "assignments", multiple=True, metavar="[NAME.]KEY=VALUE",
              help="Setting: KEY=VALUE for every protocol that has KEY, NAME.KEY=VALUE for protocol NAME only.")
@click.option("--seeds", help="Comma-separated seeds: one trial each (protocols whose result does not depend on "
                              "the seed run once).")
@_table_options
@_store_option
@click.option("--device", default="auto", show_default=True)
@_strict_option
@_arch_option
@_trust_option
@_launch_options
def compare_cmd(checkpoints: tuple[str, ...], protocol_names: tuple[str, ...], data_roots: tuple[str, ...],
                assignments: tuple[str, ...], seeds: str | None, metrics: tuple[str, ...], taps: tuple[str, ...],
                reference: str | None, selection: str, store: str | None, device: str, strict: bool,
                arch: str | None, trust: bool, launcher: str | None, **launch) -> None:
    """Evaluate CHECKPOINTS with each --protocol (skipping results already stored) and print the table:
    one block per protocol and metric, n, mean +- std over seeds, best / tied marks, and with
    --reference the paired difference with its 95% CI. Data-parallel under torchrun
    (torchrun --nproc-per-node N -m dcbench compare ...); one job per missing result with --launcher."""
    from dcbench import evaluate
    from dcbench.launch import fan_out, launch_options
    from dcbench.settings import parse_assignments

    jobs = launch_options(launcher, **launch)
    overrides = evaluate.split_overrides(protocol_names, parse_assignments(assignments))
    roots = _parse_data(data_roots, protocol_names)
    # with --launcher the jobs check the data where they run (it may be mounted only there)
    plans = evaluate.expand_seeds([evaluate.plan(name, overrides[name], roots[name], check_data=jobs is None)
                                   for name in protocol_names], _parse_seeds(seeds))
    failures: list[str] = []
    with evaluate.main_store(store) as db:  # None on ranks > 0 of a torchrun job: rank 0 stores and prints
        if jobs is None:
            items = evaluate.sweep(plans, checkpoints, db, device=device, arch=arch, trust=trust, progress=True,
                                   strict=strict)
        else:
            done = fan_out(plans, checkpoints, db, jobs, device=device, arch=arch, trust=trust, strict=strict)
            items, failures = done.items, done.failures
        if db is None:
            return
        _said_store(db.path)
        shas = list(dict.fromkeys(item.checkpoint.sha256 for item in items))
        if reference in checkpoints and len(shas) == len(checkpoints):
            reference = shas[checkpoints.index(reference)]  # a spec as given -> its weights
        if items:
            _echo_table([item.result for item in items], "terminal", db, protocols=list(protocol_names),
                        checkpoints=shas, metrics=_metrics(metrics), taps=_split_list(taps), reference=reference,
                        selection=selection)
    if failures:
        raise DcbenchError(f"{len(failures)} job(s) failed (one line each above, with its log); the other "
                           f"results are stored: fix the cause and run the same command again")


def _echo_table(results: list, fmt: str, db, *, output: str | None = None, reference: str | None = None,
                **build) -> None:
    """Build, analyse and print (or write) a table of ``results``; statistics read ``db``'s outcomes."""
    from dcbench.errors import UsageError
    from dcbench.fileio import atomic_write_text
    from dcbench.leaderboard import build_table, render, render_terminal

    table = build_table(results, outcomes=db.outcomes, **_table_callbacks(), **build)
    try:
        text = render_terminal(table, reference) if fmt == "terminal" else render(table, fmt, reference=reference)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if output:
        atomic_write_text(output, text)
        click.echo(f"wrote {output}")
    else:
        click.echo(text)


# ----------------------------------------------------------------------------- leaderboard
@main.command("leaderboard")
@_store_option
@click.option("--protocol", "protocol_names", multiple=True, help="Only these protocols (repeatable).")
@click.option("--checkpoint", "checkpoint_names", multiple=True,
              help="Only these checkpoints (name or sha256 prefix; repeatable), in this order.")
@_table_options
@click.option("--where", "where", multiple=True, metavar="[NAME.]KEY=VALUE",
              help="Only results whose setting KEY is VALUE (data=FINGERPRINT_PREFIX for the dataset).")
@click.option("--latest", is_flag=True,
              help="Per checkpoint and protocol, only the setup (settings, data) of its most recent result.")
@click.option("--format", "fmt", type=click.Choice(["md", "csv", "latex", "html", "json"]), default="md",
              show_default=True)
@click.option("--output", type=click.Path(dir_okay=False), help="Write to FILE instead of stdout.")
def leaderboard_cmd(store: str | None, protocol_names: tuple[str, ...], checkpoint_names: tuple[str, ...],
                    metrics: tuple[str, ...], taps: tuple[str, ...], reference: str | None, selection: str,
                    where: tuple[str, ...], latest: bool, fmt: str, output: str | None) -> None:
    """Export the stored results as a table: one column per protocol setup, tap and metric (results of
    different settings or data are never merged: their column names what differs)."""
    from dcbench.errors import UsageError
    from dcbench.leaderboard import filter_results

    pairs = [w.partition("=") for w in where]
    if any(not sep or not key for key, sep, _ in pairs):
        raise UsageError(f"bad --where '{next(w for w in where if '=' not in w or w.startswith('='))}': "
                         f"use KEY=VALUE, e.g. --where epochs=2")
    store_path = _store_path(store)
    _check_protocols(protocol_names, store_path)
    with _existing_store(store) as db:
        results = [r for r in db.results() if not protocol_names or r.protocol in protocol_names]
        results = filter_results(results, {key.strip(): value for key, _, value in pairs})
        if not results:
            what = f" for {', '.join(protocol_names)}" if protocol_names else ""
            raise DcbenchError(f"no results in the store{what}{' matching --where' if where else ''}; "
                               f"run `dcbench eval` or `dcbench compare` first (see `dcbench results list`)")
        _echo_table(results, fmt, db, output=output, protocols=list(protocol_names) or None,
                    checkpoints=list(checkpoint_names) or None, metrics=_metrics(metrics), taps=_split_list(taps),
                    reference=reference, selection=selection, latest=latest)
    _said_store(store_path, f"read {len(results)} result(s) from")


# ----------------------------------------------------------------------------- results
@main.group("results")
def results_group() -> None:
    """See and curate the stored results the tables are built from."""


def _existing_store(path: str | None):
    """The store opened read-only: a missing one is one line (no results yet, the file looked at),
    and nothing is created (neither the file nor its folders)."""
    from dcbench.results import ResultStore

    return ResultStore(_store_path(path), readonly=True)


_filter_options = [click.option("--checkpoint", help="Only this checkpoint (name or sha256 prefix of 8+)."),
                   click.option("--protocol", "protocol_name", help="Only this protocol.")]


def _with_filters(fn):
    for option in reversed(_filter_options):
        fn = option(fn)
    return fn


@results_group.command("list")
@_store_option
@_with_filters
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def results_list(store: str | None, checkpoint: str | None, protocol_name: str | None, as_json: bool) -> None:
    """One line per stored result: id, time, protocol, checkpoint, seed, comparability key, data."""
    _check_protocols([protocol_name] if protocol_name else [], _store_path(store))
    with _existing_store(store) as db:
        for line in _list_lines(db, db.results(protocol_name, checkpoint), as_json):
            click.echo(line)
    _said_store(_store_path(store))


def _list_lines(db, results: list, as_json: bool) -> list[str]:
    """``results list`` lines: aligned columns, or one JSON object per result."""
    import json

    with_outcomes = db.outcome_names()
    rows = []
    for r in results:
        flags = ",".join(f for f, on in (("outcomes", r.id in with_outcomes), ("unverified", r.unverified)) if on)
        rows.append({"id": r.id, "started": r.started[:19].replace("T", " "), "protocol": r.protocol,
                     "version": r.protocol_version, "checkpoint": r.checkpoint.get("name"),
                     "sha256": r.checkpoint["sha256"], "seed": r.seed, "key": r.key(),
                     "data": r.data.get("fingerprint"), "metrics": len(r.metrics), "flags": flags})
    if as_json:
        return [json.dumps(row) for row in rows]
    header = ("id", "started", "protocol", "checkpoint", "seed", "key", "data", "metrics", "flags")
    table = [header] + [(str(x["id"]), x["started"], f"{x['protocol']} v{x['version']}", str(x["checkpoint"]),
                         str(x["seed"]), x["key"][:12], str(x["data"] or "-")[:12], str(x["metrics"]),
                         x["flags"] or "-") for x in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in table]


@results_group.command("show")
@click.argument("result_id", type=int)
@_store_option
def results_show(result_id: int, store: str | None) -> None:
    """The full record of RESULT_ID as JSON, with its keys and outcome names."""
    import json

    with _existing_store(store) as db:
        result = db.get(result_id)
        record = {"id": result.id, "key": result.key(), "setup_key": result.setup_key(),
                  "outcomes": sorted(db.outcomes(result_id)), **result.to_dict()}
    click.echo(json.dumps(record, indent=2, ensure_ascii=False))
    _said_store(_store_path(store))


@results_group.command("rm")
@click.argument("result_ids", type=int, nargs=-1, required=True)
@_store_option
@click.option("--yes", "-y", is_flag=True, help="Do not ask.")
def results_rm(result_ids: tuple[int, ...], store: str | None, yes: bool) -> None:
    """Delete results (their metric rows and outcomes too)."""
    from dcbench.results import CorruptRecordError, ResultStore

    ResultStore(_store_path(store), readonly=True).close()  # a missing store: one line, nothing created
    with ResultStore(_store_path(store)) as db:
        doomed, corrupt = [], []
        for i in result_ids:  # an unknown id stops here, before anything is deleted
            try:
                doomed.append(db.get(i))
            except CorruptRecordError:  # what the corrupt-record error tells the user to delete
                corrupt.append(i)
        for line in _list_lines(db, doomed, False) + [f"{i}  (corrupt record)" for i in corrupt]:
            click.echo(line)
        if not yes:
            click.confirm(f"delete {len(doomed) + len(corrupt)} result(s)?", abort=True)
        removed = db.remove(result_ids)
    click.echo(f"removed {removed} result(s)")
    _said_store(_store_path(store))


@results_group.command("export")
@_store_option
@_with_filters
@click.option("--format", "fmt", type=click.Choice(["json", "csv"]), default="json", show_default=True,
              help="json: the full records (with id and keys); csv: one line per metric row.")
@click.option("--output", type=click.Path(dir_okay=False), help="Write to FILE instead of stdout.")
def results_export(store: str | None, checkpoint: str | None, protocol_name: str | None, fmt: str,
                   output: str | None) -> None:
    """Every stored result with everything needed to reproduce it."""
    from dcbench.fileio import atomic_write_text
    from dcbench.results import export_results

    _check_protocols([protocol_name] if protocol_name else [], _store_path(store))
    with _existing_store(store) as db:
        text = export_results(db.results(protocol_name, checkpoint), fmt)
    _said_store(_store_path(store))
    if output:
        atomic_write_text(output, text)
        click.echo(f"wrote {output}")
    else:
        click.echo(text, nl=False)


# ----------------------------------------------------------------------------- demo
@main.command("demo")
@click.option("--out", default="demo_out", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the data, the run, the results store and the leaderboards.")
@click.option("--epochs", type=int, help="Training epochs (default: the demo's).")
def demo_cmd(out: str, epochs: int | None) -> None:
    """Train DeepCluster-v2 on scikit-learn digits, probe it against a random init, print the leaderboard."""
    from dcbench.demo import print_summary, run_demo

    print_summary(run_demo(out, epochs=epochs), click.echo)


# ----------------------------------------------------------------------------- doctor
@main.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def doctor_cmd(as_json: bool) -> None:
    """Check this machine before a long run: versions, devices, bf16 autocast, NCCL, disk, fixes."""
    import json

    from dcbench.doctor import diagnose, exit_code, report_lines

    report = diagnose()
    if as_json:
        click.echo(json.dumps(report))
    else:
        for line in report_lines(report):
            click.echo(line)
    if exit_code(report):
        raise click.exceptions.Exit(exit_code(report))


# ----------------------------------------------------------------------------- fixtures
@main.command("fixtures")
@click.argument("kind", type=click.Choice(["imagefolder", "voc", "retrieval"]))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--classes", type=int, help="Classes (voc: the first N VOC classes; retrieval: landmarks per dataset) "
                                          "[default: 4].")
@click.option("--per-class", type=int, help="Images per class and split (retrieval: database photos per landmark) "
                                            "[default: imagefolder 10, voc 6, retrieval 6].")
@click.option("--size", type=int, help="Image side in px [default: imagefolder 64, voc 96, retrieval 128].")
@click.option("--layout", type=click.Choice(["revisitop", "original", "both"]), default="both", show_default=True,
              help="retrieval: roxford5k + rparis6k (revisitop), oxford5k + paris6k (original), or all four.")
@click.option("--year", type=click.Choice(["2007", "2012"]), default="2007", show_default=True,
              help="voc: VOC2007 (classification, SVMs, detection) or VOC2012 (segmentation).")
@click.option("--seed", type=int, default=0, show_default=True, help="Content seed (same arguments, same bytes).")
def fixtures_cmd(kind: str, out: str, classes: int | None, per_class: int | None, size: int | None, layout: str,
                 year: str, seed: int) -> None:
    """Write a tiny synthetic dataset in the real layout to OUT (a new or empty folder), to try the
    protocols without downloads: imagefolder (ROOT/train|val/CLASS/*.jpg: linear, knn), voc
    (VOCdevkit/VOC2007: voc07-svm, voc07-cls, voc07-lowshot, voc-det; --year 2012: voc-seg),
    retrieval (revisitop roxford5k/rparis6k and original oxford5k/paris6k)."""
    from dcbench.fixtures import write_fixture

    fixture = write_fixture(kind, out, classes=classes, per_class=per_class, size=size, layout=layout, year=year,
                            seed=seed)
    click.echo(f"wrote {fixture.root}: {fixture.summary}")
    for command in fixture.try_commands:
        click.echo(f"  try: {command}")


COMMANDS_GROUP = lazycli.COMMANDS_GROUP  # the entry-point group of command plugins


def run() -> None:
    """Entry point for ``python -m dcbench``."""
    main(prog_name="dcbench")
