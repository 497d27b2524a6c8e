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


def write_table(table: pd.DataFrame, out_dir: Path, name: str, sources: list[str], note: str = "") -> None:
    table.to_csv(out_dir / f"{name}.csv", index=False)
    listing = "\n".join(f"- {file}" for file in sorted(set(sources))) or "- (no measured runs)"
    shown = table.round({"TFLOPs %": 2, "latency (ms)": 1}).round(4)
    shown = shown.astype(object).where(shown.notna(), None)  # tabulate writes None as missingval
    body = shown.to_markdown(index=False, floatfmt="g", missingval="missing") if not table.empty else "(no rows)"
    (out_dir / f"{name}.md").write_text(f"{body}\n\n{note}Run files:\n{listing}\n")
