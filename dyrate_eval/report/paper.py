"""The aggregator (SPEC section 7): lmms-eval runs in, the paper's tables and figures out.

``dyrate-eval report RUN_DIR... --out results/`` reads every ``*_results.json`` under the
given folders, the samples logs beside them (each sample's FLOPs and kept tokens,
written by the wrappers), the runs' latency files (``dyrate-eval latency``: each run's
method timed against the original on the same prompts) and any ``trace.json``
(``dyrate-eval trace``), and writes CSV + markdown tables and PNG figures. Measured rows
and the numbers the DyRate paper reports ("reported" rows, from
``reported/dyrate_paper.csv``) sit in the same tables, told apart by the ``source``
column. A missing cell is written as "missing" (empty in the CSV), never as zero; every
table lists the files that fed it.
"""

from __future__ import annotations

import re
from functools import cache
from io import StringIO
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import PruningConfigError
from .figures import attention_figure, kept_tokens_figure, pareto_figure, rates_figure, read_traces
from ..measure.latency import SUMMARY_COLUMNS, summarize_pairs
from .runs import LATENCY_CONDITIONS, Runs, latency_file, load_runs
from .tables import MEASURED_SOURCE, REPORTED_SOURCE, method_rank, write_table

REPORTED_FILE = Path(__file__).with_name("reported") / "dyrate_paper.csv"

# column -> ((task, metric), scale): lmms-eval's fractions become the paper's percentages
# (CIDEr x 100 as well); the embedded tasks keep lmms-eval's own units.
BENCHMARK_COLUMNS = {
    "GQA": (("gqa", "exact_match"), 100),
    "VizWiz": (("vizwiz_vqa_val", "exact_match"), 100),
    "SQA-IMG": (("scienceqa_img", "exact_match"), 100),
    "TextVQA": (("textvqa_val", "exact_match"), 100),
    "POPE": (("pope", "pope_accuracy"), 100),
    "MMB": (("mmbench_en_dev", "gpt_eval_score"), 1),
    "MME perception": (("mme", "mme_perception_score"), 1),
    "shapes vqa EM": (("shapes_vqa", "exact_match"), 1),
    "shapes pope acc": (("shapes_pope", "accuracy"), 1),
    "shapes mcq acc": (("shapes_mcq", "accuracy"), 1),
}
CAPTION_COLUMNS = {
    "NoCaps CIDEr": (("nocaps_val", "nocaps_CIDEr"), 100),
    "Flickr30k CIDEr": (("flickr30k_test", "flickr_CIDEr"), 100),
    "shapes caption CIDEr": (("shapes_caption", "shapes_CIDEr"), 1),
}
# a task scored another way than the paper's, shown in the column of the task it stands
# in for: MMBench's rule-based scorer where no OpenAI key is set for its GPT judge
STAND_INS = {"mmbench_en_dev_static": "mmbench_en_dev"}
BENCHMARK_TASKS = {task for (task, _), _ in BENCHMARK_COLUMNS.values()} | set(STAND_INS)
CAPTION_TASKS = {task for (task, _), _ in CAPTION_COLUMNS.values()}
# methods that choose their rate themselves (the paper's "Auto R" column)
AUTO_RATE_METHODS = {"dyrate"}
# the paper's ablation: one rate for every step, a rate growing with depth, DyRate
ABLATION_METHODS = ("fixed_prune", "depth_prune", "dyrate")
KEY = ["source", "model", "method", "settings"]


@cache
def _reported_long() -> pd.DataFrame:
    lines = [line for line in REPORTED_FILE.read_text().splitlines() if not line.startswith("#")]
    return pd.read_csv(StringIO("\n".join(lines)), keep_default_na=False, dtype={"value": float})


def reported_rows(table: str) -> pd.DataFrame:
    """The paper's numbers for ``table``, wide (a row per model, method and settings)."""
    long = _reported_long()
    long = long[long["table"] == table]
    if long.empty:
        return pd.DataFrame(columns=KEY)
    wide = long.pivot_table(index=["model", "method", "settings"], columns="column", values="value", sort=False).reset_index()
    wide.columns.name = None
    wide.insert(0, "source", REPORTED_SOURCE)
    return wide


# -- building tables --------------------------------------------------------------------------


def _flops_column(measured: pd.DataFrame, tasks: set[str], keys: list[str]) -> pd.DataFrame:
    """TFLOPs % (language model, against the unpruned model on the same prompts and
    lengths)."""
    rows = measured[measured["task"].isin(tasks)] if not measured.empty else measured
    if rows.empty:
        return pd.DataFrame(columns=keys)
    rows = rows.assign(tflops_lm_original=rows["tflops_language_model"] / rows["flops_ratio_language_model"])
    grouped = rows.groupby(keys, sort=False)
    return (100 * grouped["tflops_language_model"].sum() / grouped["tflops_lm_original"].sum()).rename("TFLOPs %").reset_index()


def _latency_columns(latency: pd.DataFrame, tasks: set[str], keys: list[str]) -> pd.DataFrame:
    """The paired latency (``dyrate-eval latency``) over the table's tasks, and the batch
    it was measured at."""
    rows = latency[latency["task"].isin(tasks)] if not latency.empty else latency
    if rows.empty:
        return pd.DataFrame(columns=keys)
    return pd.DataFrame([{**dict(zip(keys, key)), **summarize_pairs(pairs), "batch": pairs["batch_size"].max()}
                         for key, pairs in rows.groupby(keys, sort=False)])


def _score_columns(scores: pd.DataFrame, columns: dict, keys: list[str]) -> pd.DataFrame:
    wide = None
    for label, ((task, metric), scale) in columns.items():
        rows = scores[scores["task"] == task] if not scores.empty else scores
        if rows.empty or metric not in rows:
            continue
        column = rows.groupby(keys, sort=False)[metric].last().mul(scale).rename(label)
        wide = column.to_frame() if wide is None else wide.join(column, how="outer")
    return pd.DataFrame(columns=keys) if wide is None else wide.reset_index()


def _measured_table(runs: Runs, columns: dict, tasks: set[str], keys: list[str], source: str) -> pd.DataFrame:
    table = _score_columns(runs.scores, columns, keys)
    for costs in (_flops_column(runs.measured, tasks, keys), _latency_columns(runs.latency, tasks, keys)):
        if not costs.empty:
            table = table.merge(costs, on=keys, how="outer") if not table.empty else costs
    if table.empty:
        return table
    table.insert(0, "source", source)
    return table


def _with_mme_total(scores: pd.DataFrame) -> pd.DataFrame:
    """MME total = perception + cognition, as a metric of the mme rows."""
    if scores.empty or "mme_perception_score" not in scores:
        return scores
    scores = scores.copy()
    scores["mme_total_score"] = scores["mme_perception_score"] + scores.get("mme_cognition_score", np.nan)
    return scores


def _stand_ins_replaced(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.replace({"task": STAND_INS}) if not frame.empty else frame


def _order(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Reported rows first, then measured; methods in the registry's order; every
    listed column present (missing ones stay empty)."""
    for column in columns:
        if column not in table:
            table[column] = np.nan
    table = table.assign(
        _source=table["source"] != REPORTED_SOURCE,
        _model=table["model"].map(lambda m: (int(m[:-1]), "") if re.fullmatch(r"\d+B", m) else (10**6, m)),
        _method=table["method"].map(method_rank),
    )
    sort = ["_source", "_model", "_method", "settings"] + (["decoding"] if "decoding" in table else [])
    return table.sort_values(sort, kind="stable").drop(columns=["_source", "_model", "_method"])[columns].reset_index(drop=True)


def table_sources(table: pd.DataFrame, runs: Runs, tasks: set[str]) -> list[str]:
    """The run files behind a table's measured rows, and their latency files."""
    measured = table[table["source"] != REPORTED_SOURCE]
    if measured.empty or runs.scores.empty:
        return []
    keys = ["model", "method", "settings"] + (["decoding"] if "decoding" in table else [])
    files = sorted(set(runs.scores[runs.scores["task"].isin(tasks)].merge(measured[keys].drop_duplicates(), on=keys)["file"]))
    timed = set(runs.latency["file"]) if not runs.latency.empty else set()
    return files + [str(latency_file(Path(file))) for file in files if file in timed]


def _greedy(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["decoding"] == "greedy"] if not frame.empty else frame


def build_tables(runs: Runs, source: str = MEASURED_SOURCE) -> dict[str, pd.DataFrame]:
    """The paper's tables; ``source`` labels the rows measured in ``runs``."""
    runs = Runs(_with_mme_total(_stand_ins_replaced(runs.scores)), _stand_ins_replaced(runs.measured),
                _stand_ins_replaced(runs.latency))
    greedy = Runs(*map(_greedy, runs))
    benchmark_columns = {**BENCHMARK_COLUMNS, "MME total": (("mme", "mme_total_score"), 1)}
    keys = ["model", "method", "settings"]
    cost = ["TFLOPs %", *SUMMARY_COLUMNS, "batch"]
    tables = {}

    table1 = pd.concat([reported_rows("table1_benchmarks"),
                        _measured_table(greedy, benchmark_columns, BENCHMARK_TASKS, keys, source)])
    tables["table1_benchmarks"] = _order(table1, KEY + list(benchmark_columns) + cost)

    captions = _measured_table(greedy, CAPTION_COLUMNS, CAPTION_TASKS, keys, source)
    table2 = pd.concat([reported_rows("table2_captioning"), captions])
    table2["Auto R"] = table2["method"].map(lambda m: "yes" if m in AUTO_RATE_METHODS else "no")
    tables["table2_captioning"] = _order(table2, KEY + ["TFLOPs %", *SUMMARY_COLUMNS, *CAPTION_COLUMNS, "Auto R", "batch"])

    # decoding strategies: every method setting that was also run with another decoding
    decoding_keys = keys + ["decoding"]
    table3 = _measured_table(runs, CAPTION_COLUMNS, CAPTION_TASKS, decoding_keys, source)
    if not table3.empty:
        varied = table3.groupby(keys)["decoding"].transform("nunique") > 1
        table3 = table3[varied]
    reported3 = reported_rows("table3_decoding").rename(columns={"settings": "decoding"}).assign(settings="")
    tables["table3_decoding"] = _order(pd.concat([reported3, table3]), KEY + ["decoding", *CAPTION_COLUMNS, *cost])

    table4 = captions[captions["method"].isin({"original", "fastv", "dyrate"})] if not captions.empty else captions
    tables["table4_flops_target"] = _order(pd.concat([reported_rows("table4_flops_target"), table4]),
                                           KEY + [*CAPTION_COLUMNS, *cost])

    table5 = captions[captions["method"].isin(ABLATION_METHODS)] if not captions.empty else captions
    tables["table5_ablation"] = _order(table5 if not table5.empty else pd.DataFrame(columns=KEY),
                                       KEY + [*CAPTION_COLUMNS, *cost])
    return tables


def _drop_empty_score_columns(table: pd.DataFrame, keep: set[str]) -> pd.DataFrame:
    """Score columns with no value in any row (benchmarks nobody ran or reported) are
    left out; a column with some values keeps its empty cells, shown as missing."""
    return table[[c for c in table.columns if c in keep or table[c].notna().any()]]


def write_bench_summary(bench_file: Path, out_dir: Path) -> None:
    """``bench_<folder>.csv/.md``: the medians and ratios of a ``dyrate-eval bench --out`` file."""
    from ..measure.bench import BENCH_COLUMNS, summarize_bench

    try:
        rows = pd.read_csv(bench_file)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise PruningConfigError(f"cannot read benchmark file {bench_file}: {error}") from None
    missing = {"method", *BENCH_COLUMNS} - set(rows.columns)
    if missing:
        raise PruningConfigError(f"{bench_file} is not a `dyrate-eval bench --out` file (no {', '.join(sorted(missing))})")
    summary = summarize_bench(rows)
    name = f"bench_{bench_file.parent.name}"
    note = (f"Medians over {rows['sample'].nunique()} samples per method (warm-up excluded), interleaved in one process "
            "sample by sample. `X ratio`: the median of the per-sample ratios method / original, for the times with "
            "their interquartile range; `~` marks a ratio whose spread is larger than its effect.\n\n")
    write_table(summary, out_dir, name, [str(bench_file)], note)


# -- the command ------------------------------------------------------------------------------


def latency_note(latency: pd.DataFrame) -> str:
    """How the tables' latency columns were measured, with the conditions the latency
    files record."""
    how = (
        "Latency (`dyrate-eval latency`): each run's method and the original generate the same prompts of the run's tasks "
        "one after the other, in one process, the order swapping from sample to sample, with the run's generation "
        "settings (each answers at its own length); warm-up samples are not counted. `latency`: end to end; `TTFT`: up to "
        "the first token (vision tower and prefill); `decode`: per generated token after the first (one-token answers "
        "have none). `X ratio`: the median of the per-sample ratios method / original [interquartile range]; `~` marks "
        "a ratio whose spread is larger than its effect (the IQR is wider than the median's distance from 1). `X (ms)`: "
        "the method's median / the original's, in the same pass; `answer tokens` likewise (end to end includes a change of "
        "answer length). The original's row: the original timed against itself, the noise floor. `batch`: prompts per "
        "generate call. Reported rows: the paper's end-to-end ms."
    )
    if latency.empty:
        return f"{how} No run has a latency file: every measured latency is missing (./run_all.sh's latency pass).\n\n"
    counts = latency.drop_duplicates("file").groupby(list(LATENCY_CONDITIONS), sort=False).size()
    measured = "; ".join(
        f"{runs} run{'s' if runs > 1 else ''}: {samples} samples per task after {warmup} warm-up, batch {batch}, {device}, "
        f"{dtype}, {threads} CPU thread{'s' if threads > 1 else ''}"
        for (samples, warmup, batch, device, dtype, threads), runs in counts.items())
    return f"{how} Measured: {measured}.\n\n"


def write_report(paths: list[str | Path], out_dir: str | Path, source: str = MEASURED_SOURCE) -> dict[str, pd.DataFrame]:
    """Every table and figure of the report into ``out_dir``, the runs' rows labelled
    ``source``; returns the tables."""
    runs = load_runs(paths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = build_tables(runs, source)
    table_tasks = {name: CAPTION_TASKS for name in tables} | {"table1_benchmarks": BENCHMARK_TASKS}
    latency = latency_note(runs.latency)
    notes = {
        "table1_benchmarks": "Greedy decoding. TFLOPs %: the language model's FLOPs against the unpruned model on the same "
        "prompts and answer lengths, from each sample's executed plan. MMB: lmms-eval's GPT-judged score (mmbench_en_dev), "
        "or its rule-based score (mmbench_en_dev_static) for runs made without an OpenAI key: the run files say which. "
        "MME: the paper's one MME column mixes LLaVA's perception score (1510.7) with what look like perception + "
        "cognition totals for SparseVLM (1721) and VisionZip (1834); those two stand under MME total, apart from the "
        "perception scores. Rows of method 'other VLM' are other models as the paper lists them. "
        f"{latency}",
        "table2_captioning": f"Greedy decoding; TFLOPs % and latency from the caption tasks. {latency}",
        "table3_decoding": f"Method settings run with more than one decoding strategy. {latency}",
        "table4_flops_target": f"DyRate trained for two FLOPs targets against FastV (rows appear as those runs exist). {latency}",
        "table5_ablation": f"Methods {', '.join(ABLATION_METHODS)} (rows appear as those runs exist). {latency}",
    }
    keep = set(KEY) | {"decoding", "TFLOPs %", *SUMMARY_COLUMNS, "batch", "Auto R"}
    for name, table in tables.items():
        sources = table_sources(table, runs, table_tasks[name])
        write_table(_drop_empty_score_columns(table, keep), out_dir, name, sources, notes[name])
    pareto_figure(tables, out_dir / "pareto.png", [*BENCHMARK_COLUMNS, *CAPTION_COLUMNS])
    for bench_file in [f for path in map(Path, paths) if path.is_dir() for f in sorted(path.glob("**/bench.csv"))]:
        write_bench_summary(bench_file, out_dir)
    if not rates_figure(runs.measured, out_dir / "fig3_dyrate_rates.png"):
        print("no run with per-step rates (method dyrate) among the runs: no fig3_dyrate_rates.png")
    traces = read_traces(paths)
    if traces:
        attention_figure(traces, out_dir / "fig2_attention_by_step.png")
        kept_tokens_figure(traces, out_dir / "fig4_kept_tokens.png")
    else:
        print("no trace.json among the runs: fig2/fig4 need `dyrate-eval trace --out RUN_DIR/trace`")
    return tables
