"""``dcbench pretrained list | download NAME | path NAME | add NAME FILE | pin NAME SHA256``.

The group is registered on the main CLI as ``main.add_command(pretrained_group, "pretrained")``;
user errors raised here (DcbenchError) become the main CLI's one-line ``error: ...``.
"""
from __future__ import annotations

import json

import click

from dcbench.pretrained.registry import (Entry, cached_path, get_entry, is_cached, load_manifest, partial_path,
                                         pinned_sha256, read_lock)


@click.group("pretrained")
def pretrained_group() -> None:
    """Published checkpoints by name (DeepCluster, DeepCluster-v2, supervised baselines);
    any --checkpoint accepts pretrained:NAME."""


def _cache_state(entry: Entry, lock: dict) -> str:
    if is_cached(entry):
        if entry.name in lock and lock[entry.name].get("unverified"):
            return "forced (unverified)"
        return "yes" if entry.name in lock else "unverified"
    part = partial_path(entry)
    return f"partial {part.stat().st_size / 1e6:.0f} MB" if part.is_file() else "no"


def _reference_text(entry: Entry) -> str:
    """The first published number set, as its best value, e.g. ``imagenet-linear top1 39.8 (conv4)``."""
    if not entry.references:
        return "-"
    ref = entry.references[0]
    where, value = ref.best()
    more = f" +{len(entry.references) - 1} more" if len(entry.references) > 1 else ""
    shown = f"{value:.1f}" if round(value, 1) == value else f"{value:g}"
    return f"{ref.protocol} {ref.metric} {shown} ({where}){more}"


@pretrained_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print every entry in full as one JSON object.")
def list_cmd(as_json: bool) -> None:
    """Table of the known checkpoints: name, arch, source format, cached, reference numbers."""
    entries = load_manifest()
    lock = read_lock()
    if as_json:
        click.echo(json.dumps({name: {**e.to_json(), "cached": _cache_state(e, lock), "path": str(cached_path(e)),
                                      "pinned_sha256": (pinned_sha256(e) or (None,))[0]}
                               for name, e in entries.items()}))
        return
    rows = [(e.name, e.arch, e.source_format, _cache_state(e, lock), _reference_text(e)) for e in entries.values()]
    header = ("name", "arch", "source", "cached", "reference (paper / README; `list --json` for all)")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        click.echo("  ".join([c.ljust(w) for c, w in zip(row, widths)] + [row[-1]]).rstrip())


_SHA256_HELP = ("The full sha256 the file must have (verified elsewhere, e.g. `sha256sum` of a copy you trust); "
                "it is pinned for NAME, which allows --trust-checkpoint on it.")


@pretrained_group.command("download")
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
@click.option("--force", is_flag=True, help="Discard the cached (or partial) file and download again.")
@click.option("--sha256", "sha256", default=None, metavar="SHA256", help=_SHA256_HELP + " One NAME only.")
def download_cmd(names: tuple[str, ...], force: bool, sha256: str | None) -> None:
    """Download NAME into the cache over https (resumable; checked against the manifest's or your
    pinned sha256 when there is one, else its sha256 is recorded in the cache's lock file for
    later loads)."""
    from dcbench.errors import UsageError
    from dcbench.pretrained.download import download

    if sha256 and len(names) > 1:
        raise UsageError("--sha256 pins one file: pass one NAME with it")
    for name in names:
        entry = get_entry(name)
        path, sha = download(entry, force=force, sha256=sha256)
        click.echo(f"{entry.name}: {path} (sha256 {sha})")


@pretrained_group.command("pin")
@click.argument("name")
@click.argument("sha256")
def pin_cmd(name: str, sha256: str) -> None:
    """Pin the full SHA256 of NAME's file (for entries whose authors publish none): downloads,
    adds and loads must match it, and --trust-checkpoint (full unpickling, which runs code) is
    allowed on it only once it is pinned. Check the value on a copy you trust first."""
    from dcbench.pretrained.registry import pin

    entry = get_entry(name)
    pin(entry, sha256, "pin")
    click.echo(f"{entry.name}: sha256 {pinned_sha256(entry)[0]} pinned")


@pretrained_group.command("path")
@click.argument("name")
def path_cmd(name: str) -> None:
    """Print the cached file of NAME (an error when it is not downloaded yet)."""
    from dcbench.errors import CheckpointError

    entry = get_entry(name)
    if not is_cached(entry):
        raise CheckpointError(f"{entry.name} is not in the cache; run `dcbench pretrained download {entry.name}` "
                              f"(or `dcbench pretrained add {entry.name} FILE`)")
    click.echo(str(cached_path(entry)))


@pretrained_group.command("add")
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--trust-checkpoint", "trust", is_flag=True,
              help="Allow full unpickling of FILE (can run code: only for files you trust); needs a pinned "
                   "sha256 (--sha256, `pretrained pin` or the manifest's).")
@click.option("--force", is_flag=True, help="Store FILE even if it does not match the manifest entry; it is "
                                            "recorded as unverified and every table of its results says so.")
@click.option("--sha256", "sha256", default=None, metavar="SHA256",
              help=_SHA256_HELP + " FILE must have it; needed with --trust-checkpoint when nothing pins NAME yet.")
def add_cmd(name: str, file: str, trust: bool, force: bool, sha256: str | None) -> None:
    """Register a local copy of NAME (e.g. fetched on another machine): FILE must match the manifest
    entry (sha256 where published or pinned, format, arch, input size); it is copied into the cache.
    A mismatch is refused with one line naming what differs."""
    from dcbench.pretrained.registry import add_file

    entry, path, sha, report, unverified = add_file(name, file, trust=trust, force=force, sha256=sha256)
    click.echo(f"{entry.name}: {path} (sha256 {sha})")
    click.echo(f"structure: {report}")
    if unverified:
        click.echo(f"stored as UNVERIFIED ({unverified}); its results are marked [unverified]", err=True)
