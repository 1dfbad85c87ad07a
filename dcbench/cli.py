"""The ``dcbench`` command line (click).

Errors a user can cause end with one ``error: ...`` line on stderr and exit code 1 (2 for
usage); ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

import dcbench
from dcbench.errors import DcbenchError

log = logging.getLogger("dcbench")


class _Group(click.Group):
    """Turns user errors into one line and an exit code; ``--debug`` keeps the traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except DcbenchError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:  # a bug: still one line, unless --debug
            if ctx.obj and ctx.obj.get("debug"):
                raise
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            click.echo(f"error: internal error {type(exc).__name__}: {message} "
                       f"(rerun with --debug for the traceback and please report it)", err=True)
            ctx.exit(1)


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
@click.option("--to", "target", type=click.Choice(["dcbench", "torchvision"]), default="dcbench",
              show_default=True, help="Output format.")
@_arch_option
@_trust_option
def checkpoint_convert(src: str, dst: str, target: str, arch: str | None, trust: bool) -> None:
    """Convert SRC (any supported format) to DST."""
    from dcbench.checkpoint import convert_checkpoint

    out = convert_checkpoint(src, dst, target, arch=arch, trust=trust)
    click.echo(f"wrote {out} ({target} format)")


# ----------------------------------------------------------------------------- train
_TRAIN_FLAGS = {"data": "data", "arch": "arch", "sobel": "sobel", "k": "k", "epochs": "epochs",
                "batch_size": "batch_size", "image_size": "image_size", "out": "out",
                "checkpoint_every": "checkpoint_every", "clustering": "clustering", "workers": "workers",
                "strict": "strict", "device": "device"}


@main.command()
@click.option("--data", help="Training images: an ImageFolder, a folder of images, or a text file list.")
@click.option("--arch", help="alexnet (default) | vgg16 | timm:NAME | tv:NAME.")
@click.option("--sobel/--no-sobel", default=None, help="Fixed Sobel front end (default: on, as in the paper).")
@click.option("--k", type=int, help="Number of clusters (default 10000).")
@click.option("--epochs", type=int, help="Epochs (default 500).")
@click.option("--batch-size", type=int, help="Batch size per process (default 256).")
@click.option("--image-size", type=int, help="Crop side in pixels (default 224; 64 for small data).")
@click.option("--out", help="Run folder (default runs/deepcluster).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.pth.")
@click.option("--checkpoint-every", type=int, help="Also checkpoint every N iterations (default: per epoch).")
@click.option("--clustering", type=click.Choice(["kmeans", "pic"]), help="Clustering method (default kmeans).")
@click.option("--workers", type=int, help="Data loader workers (default 4).")
@click.option("--strict", is_flag=True, default=None, help="Stop at the first unreadable image.")
@click.option("--device", help="auto (default) | cpu | cuda | cuda:N.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file of settings.")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="Any setting, e.g. --set pca_dim=32 --set reassign=4 (see dcbench train --list-settings).")
@click.option("--list-settings", is_flag=True, help="Print every setting with its default and exit.")
def train(resume: bool, config_file: str | None, assignments: tuple[str, ...], list_settings: bool,
          **flags) -> None:
    """Train DeepCluster (defaults = the paper's recipe). Also under torchrun:
    torchrun --nproc-per-node N -m dcbench train ..."""
    from dcbench.settings import apply_settings, describe_fields, load_yaml_settings, parse_assignments
    from dcbench.train import TrainConfig, train as run_training

    if list_settings:
        for name, type_name, default, help_text in describe_fields(TrainConfig):
            click.echo(f"{name:<18} {str(default):<18} {help_text}")
        return
    overrides: dict = {}
    if resume and flags.get("out"):
        saved = Path(flags["out"]) / "config.yaml"
        if saved.exists():
            overrides.update(load_yaml_settings(saved))
    if config_file:
        overrides.update(load_yaml_settings(config_file))
    overrides.update({_TRAIN_FLAGS[k]: v for k, v in flags.items() if v is not None})
    overrides.update(parse_assignments(assignments))
    cfg = apply_settings(TrainConfig(), overrides)
    if not cfg.data:
        raise click.UsageError("--data is required (an ImageFolder, a folder of images, or a file list)")
    out = run_training(cfg, resume=resume)
    click.echo(f"run folder: {out}")


def run() -> None:
    """Entry point for ``python -m dcbench``."""
    main(prog_name="dcbench")
