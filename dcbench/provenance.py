"""Provenance cards shown to users: ``dcbench protocols NAME [--json] [--set K=V]`` and
docs/protocols.md (``dcbench protocols --markdown``).

A card (:class:`dcbench.protocol.Card`) lists a preset's resolved defaults, where each comes
from and the known deviations from those sources. Here it is combined with the user's
``--set`` assignments: the settings shown are the preset's defaults with the user's values on
top, and the deviations are the card's plus one per numbers-moving setting the user changed
(:meth:`dcbench.protocol.Protocol.deviations`, what an evaluation stores in its result).

Settings are listed with the protocol's own first and the fields every protocol shares
(:data:`COMMON_SETTINGS`: seed, batch_size, workers, taps, image_size, ...) after them.
"""
from __future__ import annotations

import typing
from collections.abc import Iterable, Mapping
from typing import Any

from dcbench.protocol import CommonSettings, FrozenFeatureSettings, Protocol
from dcbench.settings import apply_settings, describe_fields, ordered_fields, to_plain

__all__ = ["COMMON_SETTINGS", "DECODE_CACHE_SOURCE", "FROZEN_FEATURE_SOURCES", "GENERATED_MARKER", "WORKERS_SOURCE",
           "card_dict", "card_lines", "preset_choices", "protocols_markdown", "setting_names"]

#: the settings bases whose fields are listed after a protocol's own
COMMON_SETTINGS = (CommonSettings, FrozenFeatureSettings)

#: sources of the settings every protocol shares with the same meaning (see dcbench.protocol)
WORKERS_SOURCE = "dcbench choice: data-loading processes; cannot move the numbers"
DECODE_CACHE_SOURCE = "dcbench choice: decoding each image once gives the same pixels; cannot move the numbers"
FROZEN_FEATURE_SOURCES = {
    "workers": WORKERS_SOURCE,
    "cache": "dcbench choice: the feature cache; cannot move the numbers",
    "bn_recalibrate": "dcbench choice: auto re-estimates BatchNorm statistics only for random inits (their running "
                      "statistics are meaningless); trained checkpoints are used as they are",
}


def card_dict(protocol: Protocol, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{"name", "version", "preset", "settings", "sources", "deviations"}`` of ``protocol``
    with ``overrides`` (``--set``) applied; UsageError for unknown keys or bad values."""
    overrides = dict(overrides or {})
    settings = apply_settings(protocol.default_settings(), overrides, owner=protocol.name)
    out = protocol.card(settings).to_dict()
    out["settings"].update({k: to_plain(getattr(settings, k)) for k in overrides})
    order = {name: i for i, name in enumerate(setting_names(protocol))}
    out["settings"] = {k: out["settings"][k] for k in sorted(out["settings"], key=lambda k: order.get(k, len(order)))}
    out["sources"] = sorted(out["sources"], key=lambda s: order.get(s["setting"], len(order)))
    out["deviations"] = [d.to_dict() for d in protocol.deviations(settings)]
    return out


def setting_names(protocol: Protocol) -> list[str]:
    """The protocol's settings as cards list them: its own first, the common ones after."""
    return [f.name for f in ordered_fields(protocol.Settings, COMMON_SETTINGS)]


def _show(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def card_lines(protocol: Protocol, card: Mapping[str, Any]) -> list[str]:
    """The settings table (name, value, help) with each setting's source under it, then the
    deviations, as text lines for the terminal."""
    helps = {name: help_text for name, _type, _default, help_text in describe_fields(protocol.Settings)}
    sources = {s["setting"]: s["source"] for s in card["sources"]}
    preset = f" (preset {card['preset']})" if card.get("preset") else ""
    lines = [f"settings (--set KEY=VALUE){preset}:"]
    width = max([16, *(len(name) for name in card["settings"])])
    for name, value in card["settings"].items():
        lines.append(f"  {name:<{width}} {_show(value):<14} {helps.get(name, '')}")
        if name in sources:
            lines.append(f"  {'':<{width}} source: {sources[name]}")
    lines.append("")
    lines.append("deviations from the sources:" if card["deviations"] else "deviations from the sources: none known")
    for d in card["deviations"]:
        marker = "set by you" if d["source"] == "user" else "known"
        lines.append(f"  - [{marker}] {d['what']}: {d['why']}")
    return lines


def preset_choices(protocol: Protocol) -> list[str | None]:
    """The values of the protocol's ``preset`` setting (``[None]`` without one)."""
    hints = typing.get_type_hints(protocol.Settings)
    if "preset" not in hints:
        return [None]
    return [str(v) for v in typing.get_args(hints["preset"])]


def _cell(text: Any) -> str:
    return _show(text).replace("|", "\\|").replace("\n", " ")


def _preset_markdown(protocol: Protocol, preset: str | None) -> list[str]:
    card = card_dict(protocol, {} if preset is None else {"preset": preset})
    sources = {s["setting"]: s["source"] for s in card["sources"]}
    lines = [f"### preset `{preset}`" if preset else "### defaults", "",
             "| setting | dcbench default | source |", "|---|---|---|"]
    lines += [f"| `{name}` | `{_cell(value)}` | {_cell(sources.get(name, ''))} |"
              for name, value in card["settings"].items()]
    lines += ["", "Known deviations from the sources:" if card["deviations"] else "Known deviations: none.", ""]
    lines += [f"- **{_cell(d['what'])}**: {_cell(d['why'])}" for d in card["deviations"]]
    return lines + ([""] if card["deviations"] else [])


#: the line docs/protocols.md puts before the generated cards
GENERATED_MARKER = "<!-- generated by `dcbench protocols --markdown`; edit the protocols, not below -->"


def protocols_markdown(protocols: Iterable[Protocol]) -> str:
    """The generated part of docs/protocols.md: per protocol and preset, setting | dcbench
    default | source, and the known deviations with their reasons."""
    lines = [GENERATED_MARKER, ""]
    for protocol in protocols:
        lines += [f"## {protocol.name} (version {protocol.version})", "", protocol.description, ""]
        for preset in preset_choices(protocol):
            lines += _preset_markdown(protocol, preset)
    return "\n".join(lines).rstrip() + "\n"
