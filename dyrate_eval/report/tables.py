"""The one table writer: CSV for machines, markdown for people, with the run files that
fed the table listed under it; and the one order of methods in every table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..methods import METHOD_ORDER

# the source column: numbers a paper reports, and the rows these runs measured
REPORTED_SOURCE = "reported (DyRate paper)"
MEASURED_SOURCE = "measured"


def method_rank(method: str) -> int:
    """A method's place in tables and figure legends: the registry's order, then the
    searches shown under their own names, then anything else."""
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def method_sorted(table: pd.DataFrame, then: list[str]) -> pd.DataFrame:
    """``table`` sorted by method (``method_rank``), then by the columns ``then``."""
    return table.sort_values(["method", *then], key=lambda col: col.map(method_rank) if col.name == "method" else col,
                             kind="stable")


def _number(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def paired_latency_shown(table: pd.DataFrame) -> pd.DataFrame:
    """Paired latency columns (``measure.latency.summarize_pairs``) as people read them:
    each ratio with its interquartile range, ``~`` before a ratio whose spread is larger
    than its effect, and the method's time (and answer length) beside the original's.
    Tables without them are returned as they are."""
    shown = table.copy()
    for ratio in [column for column in table if f"{column} q1" in table and f"{column} q3" in table]:
        noisy = table[f"{ratio.removesuffix(' ratio')} noisy"]
        shown[ratio] = [None if pd.isna(median) else f"{'~' if flag is True else ''}{median:.2f} [{low:.2f}-{high:.2f}]"
                        for median, low, high, flag in zip(table[ratio], table[f"{ratio} q1"], table[f"{ratio} q3"], noisy)]
        shown = shown.drop(columns=[f"{ratio} q1", f"{ratio} q3", f"{ratio.removesuffix(' ratio')} noisy"])
    for column in [name for name in table if f"original {name}" in table]:
        # rows without the original's (the paper's) keep their own
        shown[column] = [None if pd.isna(own) else _number(own) if pd.isna(original) else f"{_number(own)} / {_number(original)}"
                         for own, original in zip(table[column], table[f"original {column}"])]
        shown = shown.drop(columns=[f"original {column}"])
    return shown


def write_table(table: pd.DataFrame, out_dir: Path, name: str, sources: list[str], note: str = "") -> None:
    table.to_csv(out_dir / f"{name}.csv", index=False)
    listing = "\n".join(f"- {file}" for file in sorted(set(sources))) or "- (no measured runs)"
    shown = paired_latency_shown(table).round({"TFLOPs %": 2}).round(4)
    shown = shown.astype(object).where(shown.notna(), None)  # tabulate writes None as missingval
    body = shown.to_markdown(index=False, floatfmt="g", missingval="missing") if not table.empty else "(no rows)"
    (out_dir / f"{name}.md").write_text(f"{body}\n\n{note}Run files:\n{listing}\n")
