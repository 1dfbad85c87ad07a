"""Leaderboard tables: results -> a checkpoint x column :class:`Table` with its statistics.

Identity first. A column is one metric on one tap of one *setup* (protocol, version, every
setting but the seed, dataset fingerprint: :func:`dcbench.results.setup_key`), so every cell
of a column is comparable and a cell is exactly one comparability key: its trials are the
seeds of one experiment. Two setups of one protocol are two columns whose header names what
differs (``linear [epochs=2]`` / ``linear [epochs=5]``, ``knn [data=ab12cd]``); nothing is ever
averaged across setups. A re-run of one key and seed is kept in the store; the cell uses the
latest and counts the others as ``duplicates``.

:func:`build_table` aggregates, :func:`analyze` adds the statistics of :mod:`dcbench.stats`
(confidence intervals, the best/tied marks, paired differences against a reference row) and
the deviation notes; :mod:`dcbench.render` writes them. Rows are checkpoints.

Readable by default: ``metrics=("headline",)`` keeps each protocol's headline metric (its
``headline_metrics`` ClassVar, :data:`HEADLINE_METRICS` for protocols that do not declare one
or are not installed).

Deviations. Every record lists its deviations from the preset's source (``extra["deviations"]``:
``source="card"`` for the protocol card's known ones, ``"user"`` for a ``--set`` away from the
preset). A cell whose result has user deviations gets a mark (:data:`DEVIATION_MARK` + a
number, one number per distinct list) explained under the table; the card's deviations are
listed once per protocol and preset (:class:`DeviationNotes`).
"""
from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from dcbench.errors import DcbenchError, UsageError
from dcbench.protocol import get_protocol
from dcbench.settings import parse_assignments
from dcbench.results import Result, key_of, outcome_key, setup_identity, setup_key
from dcbench.stats import (ALPHA, RESAMPLES, Comparison, Summary, Trials, cell_summary, compare_trials, holm,
                           summarize)

__all__ = ["ALL", "Analysis", "BEST", "Cell", "Column", "DEVIATION_MARK", "Deviations", "DeviationNotes", "HEADLINE",
           "HEADLINE_METRICS", "SPREAD_METRICS", "TIED", "Table", "analyze", "build_table", "deviation_notes",
           "column_known_label", "filter_results", "find_row", "known_label", "protocol_headlines"]

HEADLINE = "headline"
ALL = "all"
#: the headline metric of a protocol that declares none (``Protocol.headline_metrics``): the
#: first pattern (regex, full match) that matches a metric it emitted selects every metric it
#: matches (probes top1 / kNN top1_k20, VOC cls and SVM mAP, revisited retrieval mAP Medium,
#: detection AP50, segmentation mIoU, low-shot mAP per k); otherwise the first metric the
#: protocol emitted
HEADLINE_METRICS = ("top1_k20", r"top1_k\d+", "top1", "mAP", "mAP_medium", "AP50", "mIoU", r"mAP_k\d+_mean")
BEST, TIED = "best", "tied"
#: metrics (regex, full match) that measure a spread, not a quality (voc07-lowshot's
#: ``mAP_k{k}_std``, the std of the mAP over its samples): a higher value is not better, so their
#: columns get no best / tied marks (``--metric all`` shows them beside the means)
SPREAD_METRICS = (r".+_std",)
#: marks a cell whose result was computed with settings away from the preset (user deviations)
DEVIATION_MARK = "‡"
#: a deviation as shown: (what, why)
Deviations = tuple[tuple[str, str], ...]


# ----------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------
@dataclass
class Cell:
    """One checkpoint x column: the trials (one value per seed, the latest re-run) and their
    mean, sample std (None when ``n == 1``) and Student-t interval (None when ``n == 1``)."""

    mean: float
    std: float | None
    n: int
    ci_low: float | None = None
    ci_high: float | None = None
    values: dict = field(default_factory=dict)  # seed -> value
    result_ids: dict = field(default_factory=dict)  # seed -> store id (for per-image outcomes)
    seed_dependent: bool = True
    duplicates: int = 0  # earlier results of the same key and seed (kept in the store, unused)
    key: str = ""  # the comparability key
    #: the settings of this cell's results that differ from their preset's defaults ((what, why), user
    #: deviations); the same for every trial of a key (only the seed and execution settings vary)
    deviations: Deviations = ()

    def trials(self, outcomes: dict | None = None) -> Trials:
        """The cell as :class:`dcbench.stats.Trials` (a hand-made cell without values: one trial)."""
        return Trials(dict(self.values) or {None: self.mean}, dict(outcomes or {}), self.seed_dependent)

    def summary(self) -> Summary:
        """The cell's own statistics (no per-image outcomes)."""
        return Summary(self.n, self.mean, self.std, self.ci_low, self.ci_high,
                       "t" if self.ci_low is not None else "none")


@dataclass
class Column:
    """What a column holds: one metric on one tap of one setup."""

    id: str
    protocol: str
    tap: str | None
    metric: str
    split: str | None = None
    variant: str = ""  # what distinguishes this setup from the protocol's others ("" if alone)
    setup: str = ""  # the setup key
    version: str = ""
    settings: dict = field(default_factory=dict)  # identity settings (no seed / execution-only)
    data_fingerprint: str | None = None
    seed_dependent: bool = True
    outcome: str = ""  # name of the per-image outcomes of this metric row

    @property
    def group(self) -> str:
        """The block / header group: ``linear [epochs=2] · top1 (val)``."""
        variant = f" [{self.variant}]" if self.variant else ""
        split = f" ({self.split})" if self.split else ""
        return f"{self.protocol}{variant} · {self.metric}{split}"

    @property
    def short(self) -> str:
        """The column's name inside its group: the tap (the metric when there is no tap)."""
        return self.tap or self.metric


@dataclass
class Table:
    """Rows are checkpoints, columns :class:`Column` ids; absent (row, column) = no result."""

    columns: list[str]
    rows: list[str]
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    reference: str | None = None
    higher_is_better: bool = True
    column_info: dict[str, Column] = field(default_factory=dict)
    unverified: set[str] = field(default_factory=set)  # rows of `pretrained add --force` files
    row_sha: dict[str, str] = field(default_factory=dict)  # row label -> checkpoint sha256
    #: result id -> its per-image outcomes (``ResultStore.outcomes``); None: no bootstrap
    outcomes: Callable[[int], dict[str, np.ndarray]] | None = None
    #: the protocol cards' known deviations of the results shown: "protocol (preset P)" -> (what, why)
    known_deviations: dict[str, Deviations] = field(default_factory=dict)

    def column(self, col: str) -> Column:
        """The :class:`Column` of ``col`` (a bare one for hand-built tables)."""
        return self.column_info.get(col) or Column(col, col.split("/")[0], None, col)


# ----------------------------------------------------------------------------------------
# building
# ----------------------------------------------------------------------------------------
def build_table(results: list[Result], protocols: list[str] | None = None,
                checkpoints: list[str] | None = None, selection: str = "final", *,
                metrics: Sequence[str] | None = None, taps: Sequence[str] | None = None,
                latest: bool = False, seed_dependent: Callable[[str], bool] | None = None,
                outcomes: Callable[[int], dict[str, np.ndarray]] | None = None,
                headlines: Callable[[str], Sequence[str] | None] | None = None) -> Table:
    """Aggregate ``results`` into a :class:`Table`.

    Rows are checkpoint names (``name@sha256[:8]`` when two checkpoints share a name,
    `` [unverified]`` appended for forced ``pretrained add`` files), in the order of
    ``checkpoints`` when given (a name, a row label, or a sha256 prefix of 8+ characters),
    else of first appearance. Columns are ``protocol[ [variant]]/tap/metric`` (`` (split)``
    appended only when one column would otherwise mix splits), grouped by protocol in the
    order of ``protocols`` when given. Only metric rows whose selection is ``selection`` or
    None are used. ``metrics``: names or globs, ``"headline"`` for each protocol's headline
    metric, ``"all"`` or None for every metric; ``taps``: names or globs. ``latest`` keeps, per
    checkpoint and protocol, only the setup of the most recent result. ``seed_dependent(protocol)``
    answers for records that do not say (default: True); ``outcomes`` loads per-image outcomes
    by result id for the bootstrap; ``headlines(protocol)`` gives a protocol's headline metric
    patterns (default: :func:`protocol_headlines`).
    """
    results = [r for r in results if protocols is None or r.protocol in protocols]
    setups = {id(r): _setup(r) for r in results}
    if latest:
        results = _latest_setups(results, setups)
    labels = _row_labels(results)
    if checkpoints is not None:
        results, row_order = _filter_checkpoints(results, labels, checkpoints)
    else:
        row_order = _unique(labels[_ckpt_id(r)] for r in results)
    variants = _variants(results, setups)
    entries = list(_entries(results, selection, _metric_filter(results, metrics, headlines or protocol_headlines),
                            taps))
    if not entries:
        _nothing_selected(results, selection, metrics, taps)
    dependent = seed_dependent or (lambda _p: True)
    columns = _columns(entries, setups, variants, dependent)
    cells = _cells(entries, labels, setups, columns, dependent)
    order = _ordered_columns(entries, setups, columns, protocols)
    rows = [r for r in row_order if any((r, c) in cells for c in order)]
    unverified = {labels[_ckpt_id(r)] for r in results if r.unverified}
    info = {c.id: c for c in columns.values()}
    row_sha = {label: ident[1] for ident, label in labels.items() if label in rows}
    return Table(columns=order, rows=rows, cells=cells, column_info=info, unverified=unverified,
                 row_sha=row_sha, outcomes=outcomes, known_deviations=_known_deviations(entries))


def _nothing_selected(results: list[Result], selection: str, metrics: Sequence[str] | None,
                      taps: Sequence[str] | None) -> None:
    """UsageError naming what the results have when ``metrics`` / ``taps`` / ``selection`` left
    no metric row of results that have some (a typo must not print an empty table with exit 0)."""
    rows = [row for r in results for row in r.metrics]
    if not rows:
        return
    asked = [f"--metric {', '.join(metrics)}"] if metrics and list(metrics) != [HEADLINE] else []
    asked += [f"--tap {', '.join(taps)}"] if taps else []
    asked += [f"--selection {selection}"] if selection != "final" or not asked else []
    have_metrics = ", ".join(_unique(row.metric for row in rows))
    have_taps = ", ".join(_unique(row.tap for row in rows if row.tap)) or "(none)"
    have_selections = ", ".join(_unique(row.selection or "(any)" for row in rows))
    raise UsageError(f"no result matches {' and '.join(asked)}; the results have metrics {have_metrics}; taps "
                     f"{have_taps}; selections {have_selections}")


def find_row(table: Table, text: str) -> str:
    """The row ``text`` names: a row label, a checkpoint name, or a sha256 (prefix of 8+);
    ValueError listing the rows otherwise."""
    if text in table.rows:
        return text
    hits = [r for r in table.rows if r.split(" [")[0].split("@")[0] == text
            or (len(text) >= 8 and table.row_sha.get(r, "").startswith(text.lower()))]
    if len(hits) == 1:
        return hits[0]
    available = ", ".join(table.rows) or "(none)"
    what = "ambiguous" if hits else "unknown"
    raise ValueError(f"{what} reference {text!r}; available rows: {available}")


def filter_results(results: list[Result], where: Mapping[str, Any]) -> list[Result]:
    """The results that match every ``where`` item (a value as typed or as ``--set`` parses it):
    ``key=value`` a setting (results of protocols without that setting pass),
    ``NAME.key=value`` the same for protocol NAME's results only, ``data=PREFIX`` a dataset
    fingerprint prefix, ``version=V`` the protocol version. A key no result has is an error."""
    out = list(results)
    for raw, value in where.items():
        scope, dot, key = raw.rpartition(".")
        known = any(key in r.settings for r in out) or key in ("data", "version")
        if not known:
            raise UsageError(f"--where {raw}: no result has a setting '{key}'")
        out = [r for r in out if (dot and r.protocol != scope) or _matches(r, key, value)]
    return out


def _matches(result: Result, key: str, value: Any) -> bool:
    if key == "data":
        return str(result.data.get("fingerprint") or "").startswith(str(value))
    if key == "version" and key not in result.settings:
        return str(result.protocol_version) == str(value)
    return key not in result.settings or _short(result.settings[key]) in _spellings(value)


def _spellings(value: Any) -> set[str]:
    """A ``--where`` value as typed and as ``--set`` would parse it (``2`` matches 2, ``[a,b]`` a list)."""
    if not isinstance(value, str):
        return {_short(value)}
    return {value, _short(parse_assignments([f"v={value}"])["v"])}


def _setup(result: Result) -> tuple[str, dict]:
    record = result.to_dict()
    return setup_key(record), setup_identity(record)


def _latest_setups(results: list[Result], setups: dict[int, tuple[str, dict]]) -> list[Result]:
    """Per (checkpoint, protocol), only the results of the setup of the last result (store order)."""
    last: dict[tuple[str, str], str] = {}
    for r in results:
        last[(r.checkpoint.get("sha256", ""), r.protocol)] = setups[id(r)][0]
    return [r for r in results if setups[id(r)][0] == last[(r.checkpoint.get("sha256", ""), r.protocol)]]


def _ckpt_id(result: Result) -> tuple[str, str]:
    ck = result.checkpoint
    sha = str(ck.get("sha256") or "")
    return str(ck.get("name") or sha[:12] or "?"), sha


def _row_labels(results: list[Result]) -> dict[tuple[str, str], str]:
    """Checkpoint (name, sha) -> row label, disambiguating names shared by different weights
    and naming unverified files."""
    shas_by_name: dict[str, set[str]] = {}
    unverified = set()
    for r in results:
        name, sha = _ckpt_id(r)
        shas_by_name.setdefault(name, set()).add(sha)
        if r.unverified:
            unverified.add((name, sha))
    return {(name, sha): (f"{name}@{sha[:8]}" if len(shas_by_name[name]) > 1 else name)
            + (" [unverified]" if (name, sha) in unverified else "")
            for name, shas in shas_by_name.items() for sha in shas}


def _filter_checkpoints(results: list[Result], labels: dict[tuple[str, str], str],
                        wanted: list[str]) -> tuple[list[Result], list[str]]:
    def matches(entry: str, ident: tuple[str, str]) -> bool:
        name, sha = ident
        return entry in (name, sha, labels[ident]) or (len(entry) >= 8 and sha.startswith(entry))

    unknown = [entry for entry in wanted if not any(matches(entry, ident) for ident in labels)]
    if unknown:  # a typo must not print an empty (or silently shorter) table
        have = ", ".join(_unique(labels.values())) or "(none)"
        raise UsageError(f"--checkpoint {unknown[0]}: no result of that checkpoint (name, row label or sha256 prefix "
                         f"of 8+) among the results selected; checkpoints with results: {have}")
    order = _unique(labels[ident] for entry in wanted for ident in labels if matches(entry, ident))
    keep = [r for r in results if labels[_ckpt_id(r)] in order]
    return keep, order


def _short(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _variants(results: list[Result], setups: dict[int, tuple[str, dict]]) -> dict[str, str]:
    """setup key -> label of what differs from the protocol's other setups in ``results``
    (``""`` when the protocol has one setup): ``v2``, ``epochs=2``, ``data=ab12cd``."""
    by_protocol: dict[str, dict[str, dict]] = {}
    for r in results:
        key, ident = setups[id(r)]
        by_protocol.setdefault(r.protocol, {})[key] = ident
    labels = {}
    for idents in by_protocol.values():
        if len(idents) == 1:
            labels.update({k: "" for k in idents})
            continue
        all_idents = list(idents.values())
        # compared as canonical JSON with absence distinct from null: 2 and "2" are different setups
        differ = sorted({k for i in all_idents for k in i["settings"]
                         if len({_canonical(j["settings"], k) for j in all_idents}) > 1})
        versions = len({i["protocol_version"] for i in all_idents}) > 1
        datas = len({i["data_fingerprint"] for i in all_idents}) > 1
        own = {}
        for key, ident in idents.items():
            parts = [f"v{ident['protocol_version']}"] if versions else []
            parts += [f"{k}={_shown(ident['settings'], k)}" for k in differ]
            parts += [f"data={str(ident['data_fingerprint'])[:6]}"] if datas else []
            own[key] = ", ".join(parts) or f"setup={key[:6]}"
        # a label is a column's name and cells are keyed by it: two setups that read the same
        # (2 vs "2", fingerprints sharing 6 characters) must never share a column
        counts: dict[str, int] = {}
        for label in own.values():
            counts[label] = counts.get(label, 0) + 1
        labels.update({key: label if counts[label] == 1 else f"{label}, setup={key[:6]}"
                       for key, label in own.items()})
    return labels


def _canonical(settings: Mapping[str, Any], key: str) -> str:
    return json.dumps(settings[key], sort_keys=True, default=str) if key in settings else "\0unset"


def _shown(settings: Mapping[str, Any], key: str) -> str:
    return _short(settings[key]) if key in settings else "(unset)"


def _metric_filter(results: list[Result], metrics: Sequence[str] | None,
                   headlines: Callable[[str], Sequence[str] | None]) -> Callable[[str, str], bool]:
    """(protocol, metric) -> shown?"""
    if not metrics or ALL in metrics:
        return lambda _p, _m: True
    patterns = [m for m in metrics if m != HEADLINE]
    headline = _headlines(results, headlines) if HEADLINE in metrics else {}

    def keep(protocol: str, metric: str) -> bool:
        return metric in headline.get(protocol, ()) or any(fnmatch.fnmatchcase(metric, p) for p in patterns)
    return keep


def protocol_headlines(protocol: str) -> Sequence[str] | None:
    """The ``headline_metrics`` the registered protocol ``protocol`` declares (regex patterns,
    the first one matching an emitted metric wins), None when it declares none or is unknown
    (e.g. a plugin that is not installed here)."""
    try:
        declared = getattr(get_protocol(protocol), "headline_metrics", None)
    except DcbenchError:
        return None
    return tuple(declared) if declared else None


def _headlines(results: list[Result], declared: Callable[[str], Sequence[str] | None]) -> dict[str, set[str]]:
    """protocol -> its headline metric names (its declared patterns, else :data:`HEADLINE_METRICS`)."""
    emitted: dict[str, list[str]] = {}
    for r in results:
        names = emitted.setdefault(r.protocol, [])
        names.extend(m.metric for m in r.metrics if m.metric not in names)
    out = {}
    for protocol, names in emitted.items():
        for pattern in declared(protocol) or HEADLINE_METRICS:
            hits = {n for n in names if re.fullmatch(pattern, n)}
            if hits:
                out[protocol] = hits
                break
        else:
            out[protocol] = set(names[:1])
    return out


def _entries(results: list[Result], selection: str, keep_metric: Callable[[str, str], bool],
             taps: Sequence[str] | None) -> Iterable[tuple[Result, Any]]:
    for result in results:
        for row in result.metrics:
            if row.selection is not None and row.selection != selection:
                continue
            if not keep_metric(result.protocol, row.metric):
                continue
            if taps and not any(fnmatch.fnmatchcase(row.tap or "", t) for t in taps):
                continue
            yield result, row


def _col_key(result: Result, row: Any, setups: dict[int, tuple[str, dict]]) -> tuple:
    return result.protocol, setups[id(result)][0], row.tap, row.metric, row.split


def _seed_dependent(result: Result, default: Callable[[str], bool]) -> bool:
    flag = result.extra.get("seed_dependent")
    return bool(flag) if flag is not None else default(result.protocol)


def _columns(entries: list[tuple[Result, Any]], setups: dict[int, tuple[str, dict]], variants: dict[str, str],
             seed_dependent: Callable[[str], bool]) -> dict[tuple, Column]:
    """Column per (protocol, setup, tap, metric, split); seed-dependent when any of its results is
    (a random init's BatchNorm re-estimation makes a seed-independent protocol's run depend on it)."""
    splits: dict[tuple, set] = {}
    for result, row in entries:
        splits.setdefault(_col_key(result, row, setups)[:4], set()).add(row.split)
    columns: dict[tuple, Column] = {}
    for result, row in entries:
        key = _col_key(result, row, setups)
        if key in columns:
            columns[key].seed_dependent |= _seed_dependent(result, seed_dependent)
            continue
        protocol, skey, tap, metric, split = key
        ident = setups[id(result)][1]
        variant = variants.get(skey, "")
        base = "/".join(p for p in (protocol + (f" [{variant}]" if variant else ""), tap, metric) if p)
        # val and test numbers must never be averaged together
        name = f"{base} ({split})" if len(splits[key[:4]]) > 1 and split is not None else base
        columns[key] = Column(name, protocol, tap, metric, split, variant, skey, ident["protocol_version"],
                              ident["settings"], ident["data_fingerprint"], _seed_dependent(result, seed_dependent),
                              outcome_key(metric, tap, row.selection))
    return columns


def _seed(result: Result, row: Any) -> Any:
    return row.seed if row.seed is not None else result.settings.get("seed")


def _deviations(result: Result, source: str) -> Deviations:
    """(what, why) of the record's deviations from ``source`` ("user" or "card")."""
    listed = result.extra.get("deviations") or []
    return tuple((str(d.get("what", "")), str(d.get("why", ""))) for d in listed
                 if isinstance(d, Mapping) and d.get("source", "card") == source)


def _cells(entries: list[tuple[Result, Any]], labels: dict, setups: dict[int, tuple[str, dict]],
           columns: dict[tuple, Column], seed_dependent: Callable[[str], bool]) -> dict[tuple[str, str], Cell]:
    per_cell: dict[tuple[str, str], list[tuple[Result, Any]]] = {}
    for result, row in entries:
        per_cell.setdefault((labels[_ckpt_id(result)], columns[_col_key(result, row, setups)].id), []).append(
            (result, row))
    cells = {}
    for cell_key, items in per_cell.items():
        # a seed-independent run has one trial whatever the seed: every run re-runs it
        dependent = any(_seed_dependent(r, seed_dependent) for r, _ in items)
        by_seed: dict[Any, list[tuple[float, int | None]]] = {}
        for result, row in items:
            by_seed.setdefault(_seed(result, row) if dependent else None, []).append((float(row.value), result.id))
        latest = {seed: runs[-1] for seed, runs in by_seed.items()}  # store order: oldest first
        s = summarize([v for v, _ in latest.values()])
        first = items[0][0]
        cells[cell_key] = Cell(s.mean, s.std, s.n, s.ci_low, s.ci_high, {k: v for k, (v, _) in latest.items()},
                               {k: i for k, (_, i) in latest.items()}, dependent,
                               sum(len(runs) - 1 for runs in by_seed.values()),
                               key_of(str(first.checkpoint.get("sha256", "")), setups[id(first)][1]),
                               tuple(_unique(d for r, _ in items for d in _deviations(r, "user"))))
    return cells


def known_label(protocol: str, settings: Mapping[str, Any], version: str | None = None) -> str:
    """Where a protocol card's known deviations are listed: ``protocol (preset P)``, or
    ``protocol vV (preset P)`` when ``version`` is given (a table showing several versions of
    the protocol: a later version may have fixed a deviation of an earlier one)."""
    preset = settings.get("preset")
    return protocol + (f" v{version}" if version else "") + (f" (preset {preset})" if preset else "")


def _known_deviations(entries: list[tuple[Result, Any]]) -> dict[str, Deviations]:
    """:func:`known_label` -> the card deviations its shown results carry (each listed once)."""
    versions: dict[str, set[str]] = {}
    for result, _row in entries:
        versions.setdefault(result.protocol, set()).add(str(result.protocol_version))
    out: dict[str, list[tuple[str, str]]] = {}
    for result, _row in entries:
        known = _deviations(result, "card")
        if known:
            several = len(versions[result.protocol]) > 1
            label = known_label(result.protocol, result.settings, str(result.protocol_version) if several else None)
            out.setdefault(label, [])
            out[label] += [d for d in known if d not in out[label]]
    return {label: tuple(devs) for label, devs in out.items()}


def column_known_label(table: Table, col: str) -> str:
    """The :func:`known_label` under which ``table`` lists the card deviations of column ``col``."""
    info = table.column(col)
    versions = {c.version for c in table.column_info.values() if c.protocol == info.protocol}
    return known_label(info.protocol, info.settings, info.version if len(versions) > 1 else None)


def _ordered_columns(entries: list[tuple[Result, Any]], setups: dict[int, tuple[str, dict]],
                     columns: dict[tuple, Column], protocols: list[str] | None) -> list[str]:
    """Protocol (given order, else first seen) > setup > metric/split > tap (first seen)."""
    keys = _unique(_col_key(r, row, setups) for r, row in entries)
    protos = list(protocols) if protocols else _unique(k[0] for k in keys)
    setup_rank = {s: i for i, s in enumerate(_unique(k[1] for k in keys))}
    group_rank = {g: i for i, g in enumerate(_unique((k[3], k[4]) for k in keys))}
    tap_rank = {t: i for i, t in enumerate(_unique(k[2] for k in keys))}
    keys.sort(key=lambda k: (protos.index(k[0]), setup_rank[k[1]], group_rank[(k[3], k[4])], tap_rank[k[2]]))
    return _unique(columns[k].id for k in keys)


def _unique(items: Iterable) -> list:
    return list(dict.fromkeys(items))


# ----------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------
@dataclass
class DeviationNotes:
    """What every format says about deviations: a mark per cell computed with settings away
    from its preset (``‡1``, one number per distinct list of user deviations, numbered in
    column order), and the protocol cards' known deviations, once per protocol and preset."""

    marks: dict[tuple[str, str], str] = field(default_factory=dict)
    user: list[tuple[str, Deviations]] = field(default_factory=list)  # (mark, its deviations)
    known: dict[str, Deviations] = field(default_factory=dict)  # "protocol (preset P)" -> deviations

    def __bool__(self) -> bool:
        return bool(self.user or self.known)


def deviation_notes(table: Table) -> DeviationNotes:
    """The :class:`DeviationNotes` of ``table``."""
    numbers: dict[Deviations, str] = {}
    notes = DeviationNotes(known=dict(table.known_deviations))
    for col in table.columns:
        for row in table.rows:
            cell = table.cells.get((row, col))
            if cell is None or not cell.deviations:
                continue
            if cell.deviations not in numbers:
                numbers[cell.deviations] = f"{DEVIATION_MARK}{len(numbers) + 1}"
                notes.user.append((numbers[cell.deviations], cell.deviations))
            notes.marks[(row, col)] = numbers[cell.deviations]
    return notes


@dataclass
class Analysis:
    """What every renderer shows: interval per cell, best/tied marks, differences, deviations."""

    table: Table
    reference: str | None
    summaries: dict[tuple[str, str], Summary] = field(default_factory=dict)
    marks: dict[tuple[str, str], str] = field(default_factory=dict)  # "best" | "tied"
    diffs: dict[tuple[str, str], Comparison] = field(default_factory=dict)
    alpha: float = ALPHA
    deviations: DeviationNotes = field(default_factory=DeviationNotes)
    #: how the p-values of ``diffs`` were adjusted for testing them together ("holm") and how
    #: many tested comparisons that family holds
    adjustment: str = "holm"
    family_size: int = 0

    def significant(self, row: str, col: str) -> bool:
        """Whether the difference of (row, col) to the reference is significant."""
        cmp = self.diffs.get((row, col))
        return cmp is not None and cmp.significant(self.alpha)


def analyze(table: Table, reference: str | None = None, alpha: float = ALPHA,
            resamples: int = RESAMPLES) -> Analysis:
    """Intervals, marks, deviation notes and (with ``reference`` or ``table.reference``)
    paired differences.

    A column's top cell is marked ``best`` only when it is significantly better than every
    other cell of the column (not only the runner-up); otherwise the top and every cell not
    significantly worse than it (or not testable against it) are marked ``tied``. A column
    with one cell, or of a :data:`SPREAD_METRICS` metric, gets no mark.

    The differences to the reference are one family of tests: their p-values are adjusted with
    :func:`dcbench.stats.holm` (a table of 20 columns would otherwise show about one
    "significant" difference by chance at alpha = 0.05 even between identical checkpoints).
    """
    ref = reference if reference is not None else table.reference
    ref = None if ref is None else find_row(table, ref)
    out = Analysis(table, ref, alpha=alpha, deviations=deviation_notes(table))
    loaded: dict[int, dict[str, np.ndarray]] = {}

    def trials(row: str, col: str) -> Trials:
        return _trials(table, row, col, loaded)

    for (row, col), cell in table.cells.items():
        tr = trials(row, col)
        # one trial with per-image outcomes: the interval over evaluation images
        single = cell.n == 1 and tr.outcomes
        out.summaries[(row, col)] = cell_summary(tr, resamples=resamples) if single else cell.summary()
    for col in table.columns:
        _mark_column(out, col, trials, resamples)
        if ref is not None and (ref, col) in table.cells:
            for row in table.rows:
                if row != ref and (row, col) in table.cells:
                    out.diffs[(row, col)] = compare_trials(trials(row, col), trials(ref, col), resamples=resamples)
    _adjust(out)
    return out


def _adjust(out: Analysis) -> None:
    """Holm-adjust the p-values of the reference comparisons (see :func:`analyze`)."""
    keys = list(out.diffs)
    adjusted = holm([out.diffs[k].p_value for k in keys])
    out.family_size = sum(out.diffs[k].tested and out.diffs[k].p_value is not None for k in keys)
    for key, p in zip(keys, adjusted):
        if out.diffs[key].p_value is not None:
            out.diffs[key] = replace(out.diffs[key], p_adjusted=p)


def _trials(table: Table, row: str, col: str, loaded: dict[int, dict[str, np.ndarray]]) -> Trials:
    cell = table.cells[(row, col)]
    arrays = {}
    name = table.column(col).outcome
    if table.outcomes is not None and name:
        for seed, rid in cell.result_ids.items():
            if rid is None:
                continue
            if rid not in loaded:
                loaded[rid] = table.outcomes(rid)
            if name in loaded[rid]:
                arrays[seed] = loaded[rid][name]
    return cell.trials(arrays)


def _mark_column(out: Analysis, col: str, trials: Callable[[str, str], Trials], resamples: int) -> None:
    table = out.table
    present = [r for r in table.rows if (r, col) in table.cells]
    if len(present) < 2 or any(re.fullmatch(p, table.column(col).metric) for p in SPREAD_METRICS):
        return
    sign = 1.0 if table.higher_is_better else -1.0
    ranked = sorted(present, key=lambda r: -sign * table.cells[(r, col)].mean)
    top = ranked[0]

    def beats(other: str) -> bool:
        cmp = compare_trials(trials(top, col), trials(other, col), resamples=resamples)
        return cmp.significant(out.alpha) and sign * cmp.diff > 0

    # "best" claims the top is better than every other cell, so each test must reject (an
    # intersection-union test: level alpha without a multiplicity adjustment, Berger 1982).
    # Beating the runner-up alone is not enough: a third cell with a lower mean but wide spread,
    # fewer seeds or no common seeds may not be distinguishable from the top at all.
    not_beaten = [other for other in ranked[1:] if not beats(other)]
    if not not_beaten:
        out.marks[(top, col)] = BEST
        return
    out.marks[(top, col)] = TIED
    for other in not_beaten:
        out.marks[(other, col)] = TIED


