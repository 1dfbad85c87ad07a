"""Leaderboards: results -> a checkpoint x column table -> terminal/md/csv/latex/html/json.

The public face of two modules: :mod:`dcbench.table` builds the table and its statistics
(comparability keys, n, intervals, best/tied marks, paired differences, deviation notes,
headline metrics) and :mod:`dcbench.render` writes it in every format. Import from here.
"""
from __future__ import annotations

from dcbench.render import (FORMATS, HTML_SCRIPT, HTML_STYLE, csv_text, deviation_lines, html_table, legend,
                            one_line, render, render_terminal)
from dcbench.table import (ALL, BEST, DEVIATION_MARK, HEADLINE, HEADLINE_METRICS, TIED, Analysis, Cell, Column,
                           DeviationNotes, Table, analyze, build_table, deviation_notes, filter_results, find_row,
                           protocol_headlines)

__all__ = ["ALL", "Analysis", "BEST", "Cell", "Column", "DEVIATION_MARK", "DeviationNotes", "FORMATS", "HEADLINE",
           "HEADLINE_METRICS", "HTML_SCRIPT", "HTML_STYLE", "TIED", "Table", "analyze", "build_table", "csv_text",
           "deviation_lines", "deviation_notes", "filter_results", "find_row", "html_table", "legend", "one_line",
           "protocol_headlines", "render", "render_terminal"]
