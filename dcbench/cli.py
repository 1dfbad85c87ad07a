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


def run() -> None:
    """Entry point for ``python -m dcbench``."""
    main(prog_name="dcbench")
