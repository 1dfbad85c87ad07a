"""Command groups of the ``dcbench`` CLI that are imported only when they run.

``dcbench viz``, ``dcbench report`` and the commands of the ``dcbench.commands`` entry-point
group (``dcbench pretrained`` is one) each import torch, which takes seconds; ``dcbench --help``
and ``dcbench --version`` must not. The help listing needs only each command's one-line help:
it is read from the command function's docstring in its source file (:mod:`ast`), found through
the import machinery without executing any package (same pattern as click's documented
"lazily loading subcommands", click.palletsprojects.com/en/stable/complex/#lazily-loading-subcommands).
A command whose help cannot be read statically is imported, so the listing is never wrong.
"""
from __future__ import annotations

import ast
import importlib
import logging
import sys
from functools import lru_cache
from importlib import metadata
from importlib.machinery import ModuleSpec
from pathlib import Path

import click

log = logging.getLogger("dcbench")

COMMANDS_GROUP = "dcbench.commands"

#: command name -> "module:attribute" of the command groups that live beside their subsystem
#: (they take precedence over an entry-point command of the same name, as they always did)
BUILTIN_LAZY = {"viz": "dcbench.viz.cli:viz_group", "report": "dcbench.viz.cli:report_command"}


@lru_cache(maxsize=1)
def _plugin_specs() -> dict[str, str]:
    """Entry-point name -> "module:attribute" for the ``dcbench.commands`` group."""
    return {ep.name: ep.value for ep in metadata.entry_points(group=COMMANDS_GROUP)}


def lazy_commands(group: click.Group) -> dict[str, str]:
    """The lazily loaded commands ``group`` does not hold yet: name -> "module:attribute"."""
    specs = {**_plugin_specs(), **BUILTIN_LAZY}
    return {name: value for name, value in specs.items() if not dict.__contains__(group.commands, name)}


def command_names(group: click.Group) -> list[str]:
    """Every command name of ``group``, loaded or not, sorted (imports nothing)."""
    return sorted({*dict.keys(group.commands), *lazy_commands(group)})


class LazyCommands(dict):
    """``group.commands`` that imports a lazy command when it is looked up by name, and all of
    them when it is iterated: code that reads ``main.commands`` sees what it always saw."""

    def __init__(self, group: click.Group, commands: dict) -> None:
        super().__init__(commands)
        self._group = group

    def _load(self, name) -> None:
        if isinstance(name, str) and not super().__contains__(name):
            command = load_command(self._group, name)
            if command is not None:
                super().__setitem__(name, command)

    def _load_all(self) -> None:
        for name in lazy_commands(self._group):
            self._load(name)

    def __contains__(self, name) -> bool:
        self._load(name)
        return super().__contains__(name)

    def __getitem__(self, name):
        self._load(name)
        return super().__getitem__(name)

    def get(self, name, default=None):
        self._load(name)
        return super().get(name, default)

    def __iter__(self):
        self._load_all()
        return super().__iter__()

    def __len__(self) -> int:
        self._load_all()
        return super().__len__()

    def keys(self):
        self._load_all()
        return super().keys()

    def items(self):
        self._load_all()
        return super().items()

    def values(self):
        self._load_all()
        return super().values()


def load_command(group: click.Group, name: str) -> click.Command | None:
    """Import the command ``name`` (None when there is none). A broken plugin logs one warning
    and is left out: it must not break dcbench; a broken built-in raises (a bug)."""
    value = lazy_commands(group).get(name)
    if value is None:
        return None
    module, _, attr = value.partition(":")
    try:
        command = getattr(importlib.import_module(module), attr)
    except Exception as exc:
        if name in BUILTIN_LAZY:
            raise
        log.warning("command plugin %s failed to load: %s", value, exc)
        return None
    if not isinstance(command, click.Command):
        log.warning("command plugin %s is not a click command", value)
        return None
    return command


def _find_spec(name: str, path) -> ModuleSpec | None:
    """Ask the meta-path finders for ``name`` given its parent's search path (imports nothing)."""
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        try:
            spec = find(name, path)
        except Exception:  # a third-party finder that cannot answer this question
            continue
        if spec is not None:
            return spec
    return None


def source_file(module: str) -> Path | None:
    """The ``.py`` file of ``module`` without executing it or its parent packages (None if unknown)."""
    parts, path, spec = module.split("."), None, None
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        loaded = sys.modules.get(name)
        spec = loaded.__spec__ if loaded is not None else _find_spec(name, path)
        if spec is None or (i < len(parts) and spec.submodule_search_locations is None):
            return None
        path = spec.submodule_search_locations
    origin = spec.origin if spec else None
    return Path(origin) if origin and origin.endswith(".py") else None


def _decorator_name(func: ast.expr) -> str | None:
    """``command`` for ``@click.command(...)`` / ``@group.command(...)`` / ``@command(...)``."""
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else None


@lru_cache(maxsize=None)
def static_help(value: str) -> tuple[str | None, str | None, bool] | None:
    """(help, short_help, hidden) of the click command ``value`` ("module:function"), read from
    its source: the decorators' ``help=`` / ``short_help=`` / ``hidden=`` or the docstring (what
    click uses). None when the source or the function cannot be found."""
    module, _, attr = value.partition(":")
    path = source_file(module)
    if path is None or not attr:
        return None
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == attr:
            given: dict = {}
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and _decorator_name(deco.func) in ("command", "group"):
                    for kw in deco.keywords:
                        if kw.arg in ("help", "short_help", "hidden") and isinstance(kw.value, ast.Constant):
                            given[kw.arg] = kw.value.value
            doc = given.get("help", ast.get_docstring(node))
            if doc is None and "short_help" not in given:
                return None
            return doc, given.get("short_help"), bool(given.get("hidden", False))
    return None


def help_listing(group: click.Group, ctx: click.Context, formatter: click.HelpFormatter) -> None:
    """click's ``Group.format_commands`` with the lazy commands described from their source."""
    lazy = lazy_commands(group)
    commands: list[tuple[str, click.Command]] = []
    for name in group.list_commands(ctx):
        described = static_help(lazy[name]) if name in lazy else None
        if described is not None:
            doc, short, hidden = described
            command = click.Command(name, help=doc, short_help=short, hidden=hidden)
        else:
            command = group.get_command(ctx, name)
        if command is not None and not command.hidden:
            commands.append((name, command))
    if commands:
        limit = formatter.width - 6 - max(len(name) for name, _ in commands)
        rows = [(name, command.get_short_help_str(limit)) for name, command in commands]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


# ----------------------------------------------------------------------------- `dcbench protocols`
PROTOCOLS_GROUP = "dcbench.protocols"


def _listing_key() -> str:
    """What the protocol listing depends on: dcbench's version, the ``dcbench.protocols`` entry
    points with their distributions' versions, and the size and mtime of every ``.py`` file of
    the packages they live in (an edited protocol, editable install or not, changes the key)."""
    import hashlib

    from dcbench import __version__

    parts = [__version__, sys.version]
    for ep in sorted(metadata.entry_points(group=PROTOCOLS_GROUP), key=lambda e: e.name):
        dist = getattr(ep, "dist", None)
        parts.append(f"{ep.name}={ep.value} {dist.name if dist else ''} {dist.version if dist else ''}")
        module = ep.value.partition(":")[0]
        files: set[Path] = set()
        for name in (module, module.split(".")[0]):  # its own package and the top-level one
            path = source_file(name)
            if path is None:
                return ""  # cannot tell when it changes: no cache
            # a package: every module under it; a plain module (maybe in site-packages): itself
            files.update(path.parent.rglob("*.py") if path.name == "__init__.py" else [path])
        for path in sorted(files):
            stat = path.stat()
            parts.append(f"{path} {stat.st_size} {stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def protocol_facts(compute) -> dict[str, dict]:
    """What the commands that do not run a protocol need to know of every registered one, by
    name: ``{"description", "headline_metrics" (patterns or None), "seed_dependent"}``.
    ``compute()`` imports every protocol (torch among them: seconds), so its answer is kept in
    ``cache_root()/cli`` under :func:`_listing_key`; it is recomputed when the key changes, when
    a plugin warned while loading, or when protocols are already registered in this process
    (tests, embedding code)."""
    import json

    from dcbench import protocol
    from dcbench.env import cache_root

    if protocol._REGISTRY or protocol._discovered:
        return compute()
    key = _listing_key()
    path = cache_root() / "cli" / "protocols.json"
    if key:
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            facts = saved.get("facts") if isinstance(saved, dict) and saved.get("key") == key else None
            if isinstance(facts, dict) and all(isinstance(f, dict) for f in facts.values()):
                return facts
        except (OSError, ValueError):
            pass
    warned = _WarningCounter()
    log.addHandler(warned)
    try:
        facts = compute()
    finally:
        log.removeHandler(warned)
    if key and not warned.count:
        try:
            from dcbench.fileio import atomic_write_text

            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({"key": key, "facts": facts}))
        except OSError:  # a read-only cache: listing still works, only slower
            pass
    return facts


class _WarningCounter(logging.Handler):
    """Counts the warnings logged (a plugin that failed to load must not be cached away)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
