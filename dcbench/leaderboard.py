"""Leaderboards: results -> a checkpoint x column table -> terminal/md/csv/latex/html/json.

Identity first. A column is one metric on one tap of one *setup* (protocol, version, every
setting but the seed, dataset fingerprint: :func:`dcbench.results.setup_key`), so every cell
of a column is comparable and a cell is exactly one comparability key: its trials are the
seeds of one experiment. Two setups of one protocol are two columns whose header names what
differs (``linear [epochs=2]`` / ``linear [epochs=5]``, ``knn [data=ab12cd]``); nothing is ever
averaged across setups. A re-run of one key and seed is kept in the store; the cell uses the
latest and counts the others as ``duplicates``.

:func:`build_table` aggregates, :func:`analyze` adds the statistics of :mod:`dcbench.stats`
(confidence intervals, the best/tied marks, paired differences against a reference row) and
:func:`render` / :func:`render_terminal` write them. Rows are checkpoints.

Readable by default: ``metrics=("headline",)`` keeps the protocol's headline metric
(:data:`HEADLINE_METRICS`); the terminal and Markdown print one block per protocol and
metric with taps as columns; html and latex group their headers (protocol > tap).
"""
from __future__ import annotations

import csv
import fnmatch
import html
import io
import json
import re
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dcbench.errors import UsageError
from dcbench.settings import parse_assignments
from dcbench.results import Result, key_of, outcome_key, setup_identity, setup_key
from dcbench.stats import ALPHA, RESAMPLES, Comparison, Summary, Trials, cell_summary, compare_trials, summarize

__all__ = ["ALL", "Analysis", "Cell", "Column", "FORMATS", "HEADLINE", "HEADLINE_METRICS", "Table", "analyze",
           "build_table", "filter_results", "find_row", "html_table", "legend", "render", "render_terminal"]

FORMATS = ("md", "csv", "latex", "html", "json")
HEADLINE = "headline"
ALL = "all"
#: the headline metric of a protocol: the first pattern (regex, full match) that matches a
#: metric it emitted selects every metric it matches (probes top1 / kNN top1_k20, VOC cls and
#: SVM mAP, revisited retrieval mAP Medium, detection AP50, segmentation mIoU, low-shot mAP
#: per k); otherwise the first metric the protocol emitted
HEADLINE_METRICS = ("top1_k20", r"top1_k\d+", "top1", "mAP", "mAP_medium", "AP50", "mIoU", r"mAP_k\d+_mean")
_DECIMALS = 1  # percentages are reported to one decimal, as in the papers
_MISSING = "-"
_PM = " ± "
BEST, TIED = "best", "tied"
_SIG = "†"
_TIED_MARK = "≈"


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
                outcomes: Callable[[int], dict[str, np.ndarray]] | None = None) -> Table:
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
    by result id for the bootstrap.
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
    entries = list(_entries(results, selection, _metric_filter(results, metrics), taps))
    columns = _columns(entries, setups, variants, seed_dependent or (lambda _p: True))
    cells = _cells(entries, labels, setups, columns)
    order = _ordered_columns(entries, setups, columns, protocols)
    rows = [r for r in row_order if any((r, c) in cells for c in order)]
    unverified = {labels[_ckpt_id(r)] for r in results if r.unverified}
    info = {c.id: c for c in columns.values()}
    row_sha = {label: ident[1] for ident, label in labels.items() if label in rows}
    return Table(columns=order, rows=rows, cells=cells, column_info=info, unverified=unverified,
                 row_sha=row_sha, outcomes=outcomes)


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
        differ = sorted({k for i in all_idents for k in i["settings"]
                         if len({_short(j["settings"].get(k)) for j in all_idents}) > 1})
        versions = len({i["protocol_version"] for i in all_idents}) > 1
        datas = len({i["data_fingerprint"] for i in all_idents}) > 1
        for key, ident in idents.items():
            parts = [f"v{ident['protocol_version']}"] if versions else []
            parts += [f"{k}={_short(ident['settings'].get(k))}" for k in differ]
            parts += [f"data={str(ident['data_fingerprint'])[:6]}"] if datas else []
            labels[key] = ", ".join(parts) or f"setup={key[:6]}"
    return labels


def _metric_filter(results: list[Result], metrics: Sequence[str] | None) -> Callable[[str, str], bool]:
    """(protocol, metric) -> shown?"""
    if not metrics or ALL in metrics:
        return lambda _p, _m: True
    patterns = [m for m in metrics if m != HEADLINE]
    headline = _headlines(results) if HEADLINE in metrics else {}

    def keep(protocol: str, metric: str) -> bool:
        return metric in headline.get(protocol, ()) or any(fnmatch.fnmatchcase(metric, p) for p in patterns)
    return keep


def _headlines(results: list[Result]) -> dict[str, set[str]]:
    """protocol -> its headline metric names (see :data:`HEADLINE_METRICS`)."""
    emitted: dict[str, list[str]] = {}
    for r in results:
        names = emitted.setdefault(r.protocol, [])
        names.extend(m.metric for m in r.metrics if m.metric not in names)
    out = {}
    for protocol, names in emitted.items():
        for pattern in HEADLINE_METRICS:
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
    splits: dict[tuple, set] = {}
    for result, row in entries:
        splits.setdefault(_col_key(result, row, setups)[:4], set()).add(row.split)
    columns: dict[tuple, Column] = {}
    for result, row in entries:
        key = _col_key(result, row, setups)
        if key in columns:
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


def _cells(entries: list[tuple[Result, Any]], labels: dict, setups: dict[int, tuple[str, dict]],
           columns: dict[tuple, Column]) -> dict[tuple[str, str], Cell]:
    trials: dict[tuple[str, str], dict[Any, list[tuple[float, int | None]]]] = {}
    keys: dict[tuple[str, str], str] = {}
    dependent: dict[str, bool] = {}
    for result, row in entries:
        col = columns[_col_key(result, row, setups)]
        cell_key = (labels[_ckpt_id(result)], col.id)
        # a seed-independent protocol has one trial whatever the seed: every run re-runs it
        seed = _seed(result, row) if col.seed_dependent else None
        trials.setdefault(cell_key, {}).setdefault(seed, []).append((float(row.value), result.id))
        if cell_key not in keys:
            keys[cell_key] = key_of(str(result.checkpoint.get("sha256", "")), setups[id(result)][1])
        dependent[col.id] = col.seed_dependent
    cells = {}
    for cell_key, by_seed in trials.items():
        latest = {seed: runs[-1] for seed, runs in by_seed.items()}  # store order: oldest first
        s = summarize([v for v, _ in latest.values()])
        cells[cell_key] = Cell(s.mean, s.std, s.n, s.ci_low, s.ci_high, {k: v for k, (v, _) in latest.items()},
                               {k: i for k, (_, i) in latest.items()}, dependent[cell_key[1]],
                               sum(len(runs) - 1 for runs in by_seed.values()), keys[cell_key])
    return cells


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
class Analysis:
    """The statistics every renderer shows: interval per cell, best/tied marks, differences."""

    table: Table
    reference: str | None
    summaries: dict[tuple[str, str], Summary] = field(default_factory=dict)
    marks: dict[tuple[str, str], str] = field(default_factory=dict)  # "best" | "tied"
    diffs: dict[tuple[str, str], Comparison] = field(default_factory=dict)
    alpha: float = ALPHA

    def significant(self, row: str, col: str) -> bool:
        """Whether the difference of (row, col) to the reference is significant."""
        cmp = self.diffs.get((row, col))
        return cmp is not None and cmp.significant(self.alpha)


def analyze(table: Table, reference: str | None = None, alpha: float = ALPHA,
            resamples: int = RESAMPLES) -> Analysis:
    """Intervals, marks and (with ``reference`` or ``table.reference``) paired differences.

    A column's top cell is marked ``best`` only when it is significantly better than the
    runner-up; otherwise every cell not significantly different from the top (or not
    testable against it) is marked ``tied``. A column with one cell gets no mark.
    """
    ref = reference if reference is not None else table.reference
    ref = None if ref is None else find_row(table, ref)
    out = Analysis(table, ref, alpha=alpha)
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
    return out


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
    if len(present) < 2:
        return
    sign = 1.0 if table.higher_is_better else -1.0
    ranked = sorted(present, key=lambda r: -sign * table.cells[(r, col)].mean)
    top = ranked[0]

    def beats(other: str) -> bool:
        cmp = compare_trials(trials(top, col), trials(other, col), resamples=resamples)
        return cmp.significant(out.alpha) and sign * cmp.diff > 0

    if beats(ranked[1]):
        out.marks[(top, col)] = BEST
        return
    out.marks[(top, col)] = TIED
    for other in ranked[1:]:
        if not beats(other):
            out.marks[(other, col)] = TIED


# ----------------------------------------------------------------------------------------
# text pieces shared by the renderers
# ----------------------------------------------------------------------------------------
def _num(x: float) -> str:
    return f"{x:.{_DECIMALS}f}"


def _signed(x: float) -> str:
    return f"{x:+.{_DECIMALS}f}"


def _value_text(cell: Cell, pm: str = _PM, with_n: bool = True) -> str:
    """``41.2 ± 0.3 n=3`` (std only when several trials); ``33.3 n=1``; n left out when the
    block's heading states it for every cell."""
    spread = f"{pm}{_num(cell.std)}" if cell.n > 1 and cell.std is not None else ""
    return f"{_num(cell.mean)}{spread}" + (f" n={cell.n}" if with_n else "")


def _diff_text(cmp: Comparison, alpha: float, sig: str = _SIG) -> str:
    """``+3.1 [+1.2, +5.0]†`` (interval when tested, † when significant)."""
    text = _signed(cmp.diff)
    if cmp.ci_low is not None and cmp.ci_high is not None:
        text += f" [{_signed(cmp.ci_low)}, {_signed(cmp.ci_high)}]"
    return text + (sig if cmp.significant(alpha) else "")


def legend(analysis: Analysis, best: str = "bold", tied: str = _TIED_MARK, sig: str = _SIG) -> str:
    """The one-line legend of every format."""
    pct = f"{100 * (1 - analysis.alpha):g}%"
    text = (f"mean{_PM}sample std over n trials (seeds); {best} = best, significantly better than the "
            f"runner-up (p < {analysis.alpha:g}); {tied} = tied for best (not significantly different "
            f"from the top, or not testable)")
    if analysis.reference is not None:
        text += (f"; Δ = difference to {analysis.reference} [{pct} CI], {sig} = significant "
                 f"(paired bootstrap over images, else paired t over seeds)")
    return text


def _group_note(col: Column) -> str:
    return "" if col.seed_dependent else " — n=1 (seed-independent: one trial, no spread over seeds)"


def _groups(table: Table) -> list[tuple[str, list[str]]]:
    """(group heading, its column ids) in column order."""
    out: dict[str, list[str]] = {}
    for col in table.columns:
        info = table.column(col)
        out.setdefault(info.group + _group_note(info), []).append(col)
    return list(out.items())


def _cell_text(analysis: Analysis, row: str, col: str, best: Callable[[str], str],
               esc: Callable[[str], str] = lambda s: s, tied: str = _TIED_MARK, with_n: bool = True) -> str | None:
    """The cell's value text, escaped by ``esc``, the best cell wrapped by ``best``."""
    cell = analysis.table.cells.get((row, col))
    if cell is None:
        return None
    text = esc(_value_text(cell, with_n=with_n))
    mark = analysis.marks.get((row, col))
    return best(text) if mark == BEST else f"{text} {tied}" if mark == TIED else text


def _ref_label(analysis: Analysis) -> str:
    return f"Δ vs {analysis.reference}"


# ----------------------------------------------------------------------------------------
# renderers
# ----------------------------------------------------------------------------------------
def render(table: Table, fmt: str, reference: str | None = None, analysis: Analysis | None = None) -> str:
    """Render ``table`` as ``md``, ``csv``, ``latex``, ``html`` or ``json`` with n, intervals,
    best/tied marks and, with ``reference`` (or ``table.reference``), every row's difference
    to that row. Raises ValueError for an unknown format or reference row."""
    renderers = {"md": _render_md, "csv": _render_csv, "latex": _render_latex,
                 "html": _render_html, "json": _render_json}
    if fmt not in renderers:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return renderers[fmt](analysis or analyze(table, reference))


def _blocks(analysis: Analysis, best: Callable[[str], str], esc: Callable[[str], str] = lambda s: s,
            indent: str = "  ") -> list[tuple[str, list[list[str]]]]:
    """Per group: heading and lines (header, rows, difference rows) of plain strings."""
    table = analysis.table
    out = []
    for heading, cols in _groups(table):
        ns = {cell.n for (_, c), cell in table.cells.items() if c in cols}
        uniform = len(ns) == 1
        if uniform and table.column(cols[0]).seed_dependent:
            heading += f" — n={ns.pop()} per cell"  # said once instead of in every cell
        lines = [["checkpoint"] + [esc(table.column(c).short) for c in cols]]
        for row in table.rows:
            if not any((row, c) in table.cells for c in cols):
                continue
            label = row + (" (reference)" if row == analysis.reference else "")
            lines.append([esc(label)] + [_cell_text(analysis, row, c, best, esc, with_n=not uniform) or _MISSING
                                         for c in cols])
            diffs = [analysis.diffs.get((row, c)) for c in cols]
            if any(d is not None for d in diffs):
                lines.append([indent + esc(_ref_label(analysis))]
                             + [esc(_diff_text(d, analysis.alpha)) if d else "" for d in diffs])
        out.append((esc(heading), lines))
    return out


def render_terminal(table: Table, reference: str | None = None, analysis: Analysis | None = None) -> str:
    """Aligned text, one block per protocol and metric (taps as columns), as ``dcbench compare``
    prints it; ``*`` marks the best cell, ``≈`` cells tied for best."""
    if not table.rows:
        return "no results"
    analysis = analysis or analyze(table, reference)
    parts = []
    for heading, lines in _blocks(analysis, lambda s: s + " *"):
        widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]

        def fmt(line: list[str]) -> str:
            return "  ".join([line[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(line[1:], widths[1:])]).rstrip()

        parts.append("\n".join([heading, fmt(lines[0]), "  ".join("-" * w for w in widths)]
                               + [fmt(line) for line in lines[1:]]))
    return "\n\n".join(parts + [textwrap.fill(legend(analysis, best="*"), 110)])


_MD_SPECIAL = "\\`*_[]<>|~"


def _md_escape(text: str) -> str:
    return "".join("\\" + ch if ch in _MD_SPECIAL else ch for ch in text)


def _render_md(analysis: Analysis) -> str:
    parts = []
    for heading, lines in _blocks(analysis, lambda s: f"**{s}**", _md_escape, indent="↳ "):
        body = ["| " + " | ".join(lines[0]) + " |", "|" + "|".join([" --- "] + [" ---: "] * (len(lines[0]) - 1)) + "|"]
        body += ["| " + " | ".join(line) + " |" for line in lines[1:]]
        parts.append(f"**{heading}**\n\n" + "\n".join(body))
    parts.append(_md_escape(legend(analysis)))
    return "\n\n".join(parts) + "\n"


def _records(analysis: Analysis) -> list[dict[str, Any]]:
    """One plain dict per cell: what csv and json export."""
    table = analysis.table
    items = []
    for row in table.rows:
        for col in table.columns:
            cell = table.cells.get((row, col))
            if cell is None:
                continue
            info, s = table.column(col), analysis.summaries[(row, col)]
            item = {"checkpoint": row, "column": col, "protocol": info.protocol, "setup": info.variant,
                    "tap": info.tap, "metric": info.metric, "split": info.split, "n": cell.n,
                    "seeds": [k for k in cell.values if k is not None], "mean": cell.mean, "std": cell.std,
                    "ci_low": s.ci_low, "ci_high": s.ci_high, "ci_method": s.method,
                    "seed_dependent": cell.seed_dependent, "duplicates": cell.duplicates,
                    "mark": analysis.marks.get((row, col)), "best": analysis.marks.get((row, col)) == BEST,
                    "unverified": row in table.unverified, "key": cell.key, "setup_key": info.setup,
                    "protocol_version": info.version, "settings": info.settings,
                    "data_fingerprint": info.data_fingerprint}
            if analysis.reference is not None:
                item.update(_diff_fields(analysis, row, col))
            items.append(item)
    return items


def _diff_fields(analysis: Analysis, row: str, col: str) -> dict[str, Any]:
    cmp = analysis.diffs.get((row, col))
    if cmp is None:
        return {"reference": analysis.reference, "diff": 0.0 if row == analysis.reference else None,
                "diff_ci_low": None, "diff_ci_high": None, "p_value": None, "significant": None, "test": None}
    p = None if cmp.p_value is None or np.isnan(cmp.p_value) else cmp.p_value
    return {"reference": analysis.reference, "diff": cmp.diff, "diff_ci_low": cmp.ci_low,
            "diff_ci_high": cmp.ci_high, "p_value": p, "significant": cmp.significant(analysis.alpha) if cmp.tested
            else None, "test": cmp.method}


_CSV_FIELDS = ["checkpoint", "column", "protocol", "setup", "tap", "metric", "split", "n", "mean", "std", "ci_low",
               "ci_high", "ci_method", "mark", "seed_dependent", "duplicates", "unverified", "key",
               "protocol_version", "data_fingerprint", "settings"]
_CSV_DIFF = ["reference", "diff", "diff_ci_low", "diff_ci_high", "p_value", "significant", "test"]


def _render_csv(analysis: Analysis) -> str:
    """Tidy: one line per cell, every statistic a column."""
    fields = _CSV_FIELDS + (_CSV_DIFF if analysis.reference is not None else [])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(fields)
    for item in _records(analysis):
        writer.writerow([_csv_value(item.get(f)) for f in fields])
    return buf.getvalue()


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return value


def _render_json(analysis: Analysis) -> str:
    return json.dumps(_records(analysis), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}",
                  "±": r"$\pm$", "≈": r"$\approx$", "†": r"\dag{}", "Δ": r"$\Delta$", "·": r"$\cdot$",
                  "—": "---"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text)


def _render_latex(analysis: Analysis) -> str:
    table = analysis.table
    groups = _groups(table)
    ncols = 1 + len(table.columns)
    lines = [r"% requires \usepackage{booktabs}", r"\begin{tabular}{l" + "r" * len(table.columns) + "}", r"\toprule"]
    spans, rules, start = [""], [], 2
    for heading, cols in groups:
        spans.append(rf"\multicolumn{{{len(cols)}}}{{c}}{{{_latex_escape(heading)}}}")
        rules.append(rf"\cmidrule(lr){{{start}-{start + len(cols) - 1}}}")
        start += len(cols)
    lines += [" & ".join(spans) + r" \\", " ".join(rules),
              " & ".join(["Checkpoint"] + [_latex_escape(table.column(c).short) for c in table.columns]) + r" \\",
              r"\midrule"]
    for row in table.rows:
        cells = [_latex_escape(row)]
        for col in table.columns:
            text = _cell_text(analysis, row, col, lambda s: r"\textbf{" + s + "}", _latex_escape,
                              _latex_escape(_TIED_MARK))
            if text is None:
                cells.append("--")
                continue
            cmp = analysis.diffs.get((row, col))
            cells.append(text + (f" ({_latex_escape(_diff_text(cmp, analysis.alpha))})" if cmp else ""))
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule",
              rf"\multicolumn{{{ncols}}}{{l}}{{\footnotesize {_latex_escape(legend(analysis))}}} \\",
              r"\end{tabular}"]
    return "\n".join(lines) + "\n"


HTML_STYLE = """
.dcb-scroll { overflow-x: auto; max-width: 100%; }
table.dcb { border-collapse: collapse; }
table.dcb th, table.dcb td { padding: 0.3em 0.7em; border-bottom: 1px solid #ddd; white-space: nowrap; }
table.dcb th { background: #f4f4f4; }
table.dcb th.group { text-align: center; border-left: 2px solid #fff; }
table.dcb th.sort { cursor: pointer; user-select: none; }
table.dcb th.asc::after { content: " \\25B2"; } table.dcb th.desc::after { content: " \\25BC"; }
table.dcb td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.dcb td.ref { font-style: italic; }
table.dcb .delta { display: block; color: #666; font-size: 0.85em; }
table.dcb .n { color: #888; font-size: 0.85em; }
p.legend { color: #555; font-size: 0.9em; }
"""

# Sorts by the clicked header (th.sort with data-col); numbers use data-value, missing sort last.
HTML_SCRIPT = """
(function () {
  var table = document.getElementById("leaderboard");
  if (!table) { return; }
  var heads = table.querySelectorAll("th.sort");
  Array.prototype.forEach.call(heads, function (th) {
    th.addEventListener("click", function () {
      var i = parseInt(th.getAttribute("data-col"), 10), asc = !th.classList.contains("asc");
      Array.prototype.forEach.call(heads, function (h) { h.classList.remove("asc", "desc"); });
      th.classList.add(asc ? "asc" : "desc");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[i].getAttribute("data-value"), y = b.cells[i].getAttribute("data-value");
        if (i === 0) { return (asc ? 1 : -1) * x.localeCompare(y); }
        if (x === "" || y === "") { return (x === "") - (y === ""); }
        return (asc ? 1 : -1) * (parseFloat(x) - parseFloat(y));
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
})();
"""


def html_table(analysis: Analysis) -> str:
    """The leaderboard as an html fragment: a scrolling container with the grouped table and
    its legend (the page of :func:`render` and the report embed it)."""
    table, esc = analysis.table, html.escape
    groups = _groups(table)
    top = ['<th class="sort" rowspan="2" data-col="0">checkpoint</th>'] + [
        f'<th class="group" colspan="{len(cols)}">{esc(heading)}</th>' for heading, cols in groups]
    taps = [f'<th class="sort" data-col="{i + 1}">{esc(table.column(c).short)}</th>'
            for i, c in enumerate(table.columns)]
    body = "\n".join(_html_row(analysis, row) for row in table.rows)
    return (f'<div class="dcb-scroll">\n<table class="dcb" id="leaderboard">\n'
            f"<thead><tr>{''.join(top)}</tr><tr>{''.join(taps)}</tr></thead>\n<tbody>\n{body}\n</tbody>\n"
            f'</table>\n</div>\n<p class="legend">{esc(legend(analysis))}</p>\n')


def _render_html(analysis: Analysis) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<title>dcbench leaderboard</title>\n"
            "<style>body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }"
            f"{HTML_STYLE}</style>\n</head>\n<body>\n<h1>dcbench leaderboard</h1>\n"
            f"{html_table(analysis)}<script>{HTML_SCRIPT}</script>\n</body>\n</html>\n")


def _html_row(analysis: Analysis, row: str) -> str:
    esc, table = html.escape, analysis.table
    cls = ' class="ref"' if row == analysis.reference else ""
    parts = [f'<td data-value="{esc(row)}"{cls}>{esc(row)}</td>']
    for col in table.columns:
        cell = table.cells.get((row, col))
        if cell is None:
            parts.append(f'<td class="num" data-value="">{_MISSING}</td>')
            continue
        spread = f"{_PM}{_num(cell.std)}" if cell.n > 1 and cell.std is not None else ""
        value = esc(_num(cell.mean) + spread)
        mark = analysis.marks.get((row, col))
        value = f"<strong>{value}</strong>" if mark == BEST else value + f" {_TIED_MARK}" if mark == TIED else value
        s = analysis.summaries[(row, col)]
        title = f' title="95% CI {_num(s.ci_low)}..{_num(s.ci_high)} ({s.method})"' if s.ci_low is not None else ""
        value += f' <span class="n">n={cell.n}</span>'
        cmp = analysis.diffs.get((row, col))
        if cmp is not None:
            value += f'<span class="delta">Δ {esc(_diff_text(cmp, analysis.alpha))}</span>'
        parts.append(f'<td class="num" data-value="{cell.mean!r}"{title}>{value}</td>')
    return "<tr>" + "".join(parts) + "</tr>"
