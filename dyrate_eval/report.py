"""The aggregator (SPEC section 7): lmms-eval runs in, the paper's tables and figures out.

``dyrate-eval report RUN_DIR... --out results/`` reads every ``*_results.json`` under the
given folders, the samples logs beside them (each sample's FLOPs, latency and kept
tokens, written by the wrappers) and any ``trace.json`` (``dyrate-eval trace``), and
writes CSV + markdown tables and PNG figures. Measured rows and the numbers the DyRate
paper reports ("reported" rows, from ``reported/dyrate_paper.csv``) sit in the same
tables, told apart by the ``source`` column. A missing cell is written as "missing"
(empty in the CSV), never as zero; every table lists the files that fed it.
"""

from __future__ import annotations

import itertools
import json
import re
from functools import cache
from io import StringIO
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from adjustText import adjust_text  # noqa: E402

from .errors import PruningConfigError  # noqa: E402
from .methods import METHODS, SCHEDULE_SEARCHES  # noqa: E402
from .results import read_runs, read_samples, samples_file  # noqa: E402
from .plan import GROUPS  # noqa: E402
from .trace import TRACE_FILE  # noqa: E402

REPORTED_FILE = Path(__file__).with_name("reported") / "dyrate_paper.csv"
REPORTED_SOURCE = "reported (DyRate paper)"
MEASURED_SOURCE = "measured"

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
# adjustText iterations for the pareto labels (enough for them to settle apart)
LABEL_ITERATIONS = 300
# rows and figure colours in this order; searched schedules are shown as their search
METHOD_ORDER = [*METHODS, *SCHEDULE_SEARCHES]
# what the report reads from each sample's measurements (see measure.sample_measurements)
MEASURED_FIELDS = {"tflops_language_model", "flops_ratio_language_model", "end_to_end_ms", "batch_size"}


# -- reading runs -----------------------------------------------------------------------------


def model_label(pretrained: str) -> str:
    """'7B' / '13B' for LLaVA checkpoints (the paper's rows), else the folder's name."""
    if pretrained == "(embedded)":
        return "embedded"
    size = re.search(r"(\d+)b\b", Path(pretrained).name.lower())
    return f"{size.group(1)}B" if size else Path(pretrained).name


def read_sample_measurements(samples_file: Path) -> list[dict]:
    """The wrappers' per-sample records in an lmms-eval samples log (empty when the run
    was made without --log_samples)."""
    if not samples_file.exists():
        return []
    records = []
    for number, sample in enumerate(read_samples(samples_file), start=1):
        for counts in sample.get("token_counts") or []:
            if isinstance(counts, dict) and isinstance(counts.get("dyrate"), dict):
                missing = MEASURED_FIELDS - set(counts["dyrate"])
                if missing:
                    raise PruningConfigError(
                        f"{samples_file} line {number}: the measurements lack {', '.join(sorted(missing))} "
                        "(written by another version of dyrate-eval): rerun that cell"
                    )
                records.append({"doc_id": sample.get("doc_id"), **counts["dyrate"]})
    return records


def load_runs(paths: list[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(scores, measurements): a row per run file and task with its metrics, decoding
    and model label; and a row per measured sample, keyed the same way. The runs are
    checked as ``results.read_runs`` checks them."""
    score_rows, measured_rows = [], []
    for file, file_rows in itertools.groupby(read_runs(paths), key=lambda row: row["file"]):
        rows = list(file_rows)
        records = {row["task"]: read_sample_measurements(samples_file(Path(file), row["task"])) for row in rows}
        searched = searched_schedule([record for task_records in records.values() for record in task_records])
        for row in rows:
            row["model"] = model_label(row["pretrained"])
            row.update(searched)
            score_rows.append(row)
            for record in records[row["task"]]:
                measured_rows.append({key: row[key] for key in ("file", "model", "method", "settings", "decoding", "task")} | record)
    return pd.DataFrame(score_rows), pd.DataFrame(measured_rows)


def searched_schedule(records: list[dict]) -> dict:
    """For a run of a schedule file that a search wrote, the method and settings it is
    shown with: the search (gsearch, psigmoid) and its label, from the policy the run's
    samples record; empty for any other run."""
    policies = [record.get("policy") or {} for record in records]
    searched = next((policy for policy in policies if policy.get("searched_by")), None)
    return {"method": searched["searched_by"], "settings": searched.get("label") or ""} if searched else {}


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


def _cost_columns(measured: pd.DataFrame, tasks: set[str], keys: list[str]) -> pd.DataFrame:
    """TFLOPs % (language model, against the unpruned model on the same prompts and
    lengths), mean end-to-end latency and the batch size."""
    rows = measured[measured["task"].isin(tasks)] if not measured.empty else measured
    if rows.empty:
        return pd.DataFrame(columns=keys)
    rows = rows.assign(tflops_lm_original=rows["tflops_language_model"] / rows["flops_ratio_language_model"])
    grouped = rows.groupby(keys, sort=False)
    return pd.DataFrame({
        "TFLOPs %": 100 * grouped["tflops_language_model"].sum() / grouped["tflops_lm_original"].sum(),
        "latency (ms)": grouped["end_to_end_ms"].mean(),
        "batch": grouped["batch_size"].max(),
    }).reset_index()


def _score_columns(scores: pd.DataFrame, columns: dict, keys: list[str]) -> pd.DataFrame:
    wide = None
    for label, ((task, metric), scale) in columns.items():
        rows = scores[scores["task"] == task] if not scores.empty else scores
        if rows.empty or metric not in rows:
            continue
        column = rows.groupby(keys, sort=False)[metric].last().mul(scale).rename(label)
        wide = column.to_frame() if wide is None else wide.join(column, how="outer")
    return pd.DataFrame(columns=keys) if wide is None else wide.reset_index()


def _measured_table(scores: pd.DataFrame, measured: pd.DataFrame, columns: dict, tasks: set[str], keys: list[str],
                    source: str) -> pd.DataFrame:
    table = _score_columns(scores, columns, keys)
    costs = _cost_columns(measured, tasks, keys)
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
    order = {name: index for index, name in enumerate(METHOD_ORDER)}
    table = table.assign(
        _source=table["source"] != REPORTED_SOURCE,
        _model=table["model"].map(lambda m: (int(m[:-1]), "") if re.fullmatch(r"\d+B", m) else (10**6, m)),
        _method=table["method"].map(lambda m: order.get(m, len(order))),
    )
    sort = ["_source", "_model", "_method", "settings"] + (["decoding"] if "decoding" in table else [])
    return table.sort_values(sort, kind="stable").drop(columns=["_source", "_model", "_method"])[columns].reset_index(drop=True)


def table_sources(table: pd.DataFrame, scores: pd.DataFrame, tasks: set[str]) -> list[str]:
    """The run files behind a table's measured rows."""
    measured = table[table["source"] != REPORTED_SOURCE]
    if measured.empty or scores.empty:
        return []
    keys = ["model", "method", "settings"] + (["decoding"] if "decoding" in table else [])
    rows = scores[scores["task"].isin(tasks)].merge(measured[keys].drop_duplicates(), on=keys)
    return sorted(set(rows["file"]))


def build_tables(scores: pd.DataFrame, measured: pd.DataFrame, source: str = MEASURED_SOURCE) -> dict[str, pd.DataFrame]:
    """The paper's tables; ``source`` labels the rows measured in ``scores`` and ``measured``."""
    scores = _with_mme_total(_stand_ins_replaced(scores))
    measured = _stand_ins_replaced(measured)
    benchmark_columns = {**BENCHMARK_COLUMNS, "MME total": (("mme", "mme_total_score"), 1)}
    greedy_scores = scores[scores["decoding"] == "greedy"] if not scores.empty else scores
    greedy_measured = measured[measured["decoding"] == "greedy"] if not measured.empty else measured
    keys = ["model", "method", "settings"]
    cost = ["TFLOPs %", "latency (ms)", "batch"]
    tables = {}

    table1 = pd.concat([reported_rows("table1_benchmarks"),
                        _measured_table(greedy_scores, greedy_measured, benchmark_columns, BENCHMARK_TASKS, keys, source)])
    tables["table1_benchmarks"] = _order(table1, KEY + list(benchmark_columns) + cost)

    captions = _measured_table(greedy_scores, greedy_measured, CAPTION_COLUMNS, CAPTION_TASKS, keys, source)
    table2 = pd.concat([reported_rows("table2_captioning"), captions])
    table2["Auto R"] = table2["method"].map(lambda m: "yes" if m in AUTO_RATE_METHODS else "no")
    tables["table2_captioning"] = _order(table2, KEY + ["TFLOPs %", "latency (ms)", *CAPTION_COLUMNS, "Auto R", "batch"])

    # decoding strategies: every method setting that was also run with another decoding
    decoding_keys = keys + ["decoding"]
    table3 = _measured_table(scores, measured, CAPTION_COLUMNS, CAPTION_TASKS, decoding_keys, source)
    if not table3.empty:
        varied = table3.groupby(keys)["decoding"].transform("nunique") > 1
        table3 = table3[varied]
    reported3 = reported_rows("table3_decoding").rename(columns={"settings": "decoding"}).assign(settings="")
    tables["table3_decoding"] = _order(pd.concat([reported3, table3]), KEY + ["decoding", *CAPTION_COLUMNS, "TFLOPs %"])

    table4 = captions[captions["method"].isin({"original", "fastv", "dyrate"})] if not captions.empty else captions
    tables["table4_flops_target"] = _order(pd.concat([reported_rows("table4_flops_target"), table4]),
                                           KEY + [*CAPTION_COLUMNS, "TFLOPs %"])

    table5 = captions[captions["method"].isin(ABLATION_METHODS)] if not captions.empty else captions
    tables["table5_ablation"] = _order(table5 if not table5.empty else pd.DataFrame(columns=KEY),
                                       KEY + [*CAPTION_COLUMNS, "TFLOPs %"])
    return tables


def _drop_empty_score_columns(table: pd.DataFrame, keep: set[str]) -> pd.DataFrame:
    """Score columns with no value in any row (benchmarks nobody ran or reported) are
    left out; a column with some values keeps its empty cells, shown as missing."""
    return table[[c for c in table.columns if c in keep or table[c].notna().any()]]


def write_table(table: pd.DataFrame, out_dir: Path, name: str, sources: list[str], note: str = "") -> None:
    table.to_csv(out_dir / f"{name}.csv", index=False)
    listing = "\n".join(f"- {file}" for file in sorted(set(sources))) or "- (no measured runs)"
    shown = table.round({"TFLOPs %": 2, "latency (ms)": 1}).round(4)
    shown = shown.astype(object).where(shown.notna(), None)  # tabulate writes None as missingval
    body = shown.to_markdown(index=False, floatfmt="g", missingval="missing") if not table.empty else "(no rows)"
    (out_dir / f"{name}.md").write_text(f"{body}\n\n{note}Run files:\n{listing}\n")


# -- figures ----------------------------------------------------------------------------------


def _short_settings(settings: dict) -> str:
    """Settings as a figure label: values that are paths by their file or folder name."""
    return " ".join(f"{key}={Path(value).name if '/' in str(value) else value}" for key, value in settings.items())


def point_label(settings: str) -> str:
    """A run's settings ("K=2,R=0.5") as a short point label; the calibration task of
    searched schedules is left out."""
    pairs = (item.partition("=") for item in filter(None, settings.split(",")))
    return _short_settings({key: value for key, _, value in pairs if key != "task"})


def pareto_figure(tables: dict[str, pd.DataFrame], path: Path) -> None:
    """Score against TFLOPs % for every method: one panel per score column that has
    measured or reported points with a TFLOPs share."""
    panels = []
    for name in ("table1_benchmarks", "table2_captioning"):
        table = tables[name]
        for column in [*BENCHMARK_COLUMNS, *CAPTION_COLUMNS]:
            if column in table:
                points = table[table[column].notna() & table["TFLOPs %"].notna()]
                if not points.empty:
                    panels.append((column, points))
    columns = max(1, min(3, len(panels)))
    rows = max(1, -(-len(panels) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), squeeze=False)
    for axis in axes.flat[len(panels):]:
        axis.axis("off")
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no runs with both a score and a FLOPs share", ha="center", va="center")
    for axis, (column, points) in zip(axes.flat, panels):
        labels = []
        for (source, model, method), group in points.groupby(["source", "model", "method"], sort=False):
            colour = plt.cm.tab10(METHOD_ORDER.index(method) % 10 if method in METHOD_ORDER else 9)
            reported = source == REPORTED_SOURCE
            axis.scatter(group["TFLOPs %"], group[column], label=f"{method} ({model}{', reported' if reported else ''})",
                         marker="s" if reported else "o", facecolors="none" if reported else colour, edgecolors=colour)
            labels += [axis.text(point["TFLOPs %"], point[column], point_label(point["settings"]), fontsize=6, alpha=0.8)
                       for _, point in group.iterrows() if point["settings"]]
        axis.set_xlabel("TFLOPs % of the original (language model)")
        axis.set_ylabel(column)
        axis.set_title(column)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6)
        # runs at nearly the same FLOPs share and score would write their labels over each
        # other; a fixed number of iterations (adjustText's default is a time limit) draws
        # the same figure on every run
        adjust_text(labels, ax=axis, iter_lim=LABEL_ITERATIONS, arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5})
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def read_traces(paths: list[str | Path]) -> list[tuple[Path, dict]]:
    traces = []
    for path in map(Path, paths):
        for file in ([path] if path.is_file() and path.name == TRACE_FILE else sorted(path.glob(f"**/{TRACE_FILE}")) if path.is_dir() else []):
            try:
                trace = json.loads(file.read_text())
                trace["examples"][0]["attention_by_step"]
            except (OSError, json.JSONDecodeError, KeyError, IndexError, TypeError) as error:
                raise PruningConfigError(f"{file} is not a trace written by `dyrate-eval trace`: {error!r}") from None
            traces.append((file, trace))
    return traces


def attention_figure(traces: list[tuple[Path, dict]], path: Path) -> None:
    """The paper's Fig. 2: the unpruned model's attention per token group across
    generation steps, mean over the traced examples (steps some examples did not reach
    average the ones that did)."""
    figure, axis = plt.subplots(figsize=(7, 4))
    for group in GROUPS:
        per_step: dict[int, list[float]] = {}
        for _, trace in traces:
            for example in trace["examples"]:
                for step, shares in enumerate(example["attention_by_step"]):
                    per_step.setdefault(step, []).append(shares[group])
        steps = sorted(per_step)
        axis.plot(steps, [np.mean(per_step[s]) for s in steps], marker=".", label=group)
    models = ", ".join(sorted({Path(trace["pretrained"]).name for _, trace in traces}))
    axis.set_xlabel("generation step (0 = prefill's last token)")
    axis.set_ylabel("share of attention")
    axis.set_title(f"Attention per token group, unpruned ({models})")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def kept_tokens_figure(traces: list[tuple[Path, dict]], path: Path, steps_shown: int = 4) -> None:
    """The paper's Fig. 4: per example image, the image tokens the last layer still sees
    at a few generation steps (dropped patches greyed out)."""
    from PIL import Image

    examples = [(file, trace, example) for file, trace in traces for example in trace["examples"]]
    figure, axes = plt.subplots(len(examples), steps_shown, figsize=(2.6 * steps_shown, 2.8 * len(examples)), squeeze=False)
    for row, (file, trace, example) in enumerate(examples):
        image = np.asarray(Image.open(file.parent / example["image"]).convert("RGB"), dtype=np.float32) / 255
        grid = trace["grid"]
        history = example["kept_slots_by_step"]
        # the rate set is in the trace's policy too; a row names the method and its settings
        settings = {k: v for k, v in trace["policy"].items() if k not in ("method", "rates")}
        policy = f"{trace['policy'].get('method', '')} {_short_settings(settings)}"
        shown = sorted(set(np.linspace(0, len(history) - 1, steps_shown).round().astype(int)))
        for column, axis in enumerate(axes[row]):
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_frame_on(False)
            if column >= len(shown):
                continue
            step = shown[column]
            kept = np.zeros(grid * grid, dtype=bool)
            kept[history[step]] = True
            cell_h, cell_w = image.shape[0] / grid, image.shape[1] / grid
            mask = np.kron(kept.reshape(grid, grid), np.ones((int(np.ceil(cell_h)), int(np.ceil(cell_w)))))[: image.shape[0], : image.shape[1]]
            axis.imshow(image * (0.25 + 0.75 * mask[..., None]))
            rates = example.get("rate_by_step") or []
            chosen = f", rate {rates[step]:g}" if step < len(rates) and rates[step] is not None else ""
            axis.set_title(f"step {step}: {int(kept.sum())}/{grid * grid} kept{chosen}", fontsize=8)
            if column == 0:
                axis.set_ylabel(f"{example.get('name', '')}\n{policy}", fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def rates_figure(measured: pd.DataFrame, path: Path) -> bool:
    """DyRate's choices across generation steps, from the samples logs of greedy runs:
    per run and task, the mean chosen rate, the image tokens the deepest layers keep and
    the observation layer's share of attention on the image, each step averaged over the
    samples that reached it. Returns False when no run made per-step choices."""
    if measured.empty or "rate_by_step" not in measured:
        return False
    rows = measured[measured["rate_by_step"].notna() & (measured["decoding"] == "greedy")]
    if rows.empty:
        return False
    panels = (
        ("rate_by_step", lambda value: value, "chosen rate"),
        ("kept_image_last_layer_by_step", lambda value: value, "image tokens kept (deepest layer)"),
        ("group_attention_by_step", lambda value: value[GROUPS.index("image")], "attention on the image (layer K-1)"),
    )
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for (model, method, settings, task), group in rows.groupby(["model", "method", "settings", "task"], sort=False):
        label = f"{task} ({model}{', ' + settings if settings else ''})"
        for axis, (key, pick, _) in zip(axes, panels):
            per_step: dict[int, list[float]] = {}
            for values in group[key]:
                for step, value in enumerate(values):
                    if value is not None:
                        per_step.setdefault(step, []).append(pick(value))
            steps = sorted(per_step)
            axis.plot(steps, [np.mean(per_step[step]) for step in steps], marker=".", label=label)
    for axis, (_, _, title) in zip(axes, panels):
        axis.set_xlabel("generation step (0 = prefill)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_bench_summary(bench_file: Path, out_dir: Path) -> None:
    """``bench_<folder>.csv/.md``: the medians and ratios of a ``dyrate-eval bench --out`` file."""
    from .bench import BENCH_COLUMNS, summarize_bench

    try:
        rows = pd.read_csv(bench_file)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise PruningConfigError(f"cannot read benchmark file {bench_file}: {error}") from None
    missing = {"method", *BENCH_COLUMNS} - set(rows.columns)
    if missing:
        raise PruningConfigError(f"{bench_file} is not a `dyrate-eval bench --out` file (no {', '.join(sorted(missing))})")
    summary = summarize_bench(rows)
    name = f"bench_{bench_file.parent.name}"
    note = f"Medians over {rows['sample'].nunique()} samples per method (warm-up excluded), interleaved in one process.\n\n"
    write_table(summary, out_dir, name, [str(bench_file)], note)


# -- the command ------------------------------------------------------------------------------


def write_report(paths: list[str | Path], out_dir: str | Path, source: str = MEASURED_SOURCE) -> dict[str, pd.DataFrame]:
    """Every table and figure of the report into ``out_dir``, the runs' rows labelled
    ``source``; returns the tables."""
    scores, measured = load_runs(paths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = build_tables(scores, measured, source)
    table_tasks = {name: CAPTION_TASKS for name in tables} | {"table1_benchmarks": BENCHMARK_TASKS}
    notes = {
        "table1_benchmarks": "Greedy decoding. TFLOPs %: the language model's FLOPs against the unpruned model on the same "
        "prompts and answer lengths, from each sample's executed plan. Latency: mean end-to-end time of a sample's "
        "generate call (with `batch` samples per call). MMB: lmms-eval's GPT-judged score (mmbench_en_dev), or its "
        "rule-based score (mmbench_en_dev_static) for runs made without an OpenAI key: the run files say which.\n\n",
        "table2_captioning": "Greedy decoding; TFLOPs % and latency from the caption tasks' samples.\n\n",
        "table3_decoding": "Method settings run with more than one decoding strategy.\n\n",
        "table4_flops_target": "DyRate trained for two FLOPs targets against FastV (rows appear as those runs exist).\n\n",
        "table5_ablation": f"Methods {', '.join(ABLATION_METHODS)} (rows appear as those runs exist).\n\n",
    }
    keep = set(KEY) | {"decoding", "TFLOPs %", "latency (ms)", "batch", "Auto R"}
    for name, table in tables.items():
        sources = table_sources(table, scores, table_tasks[name])
        write_table(_drop_empty_score_columns(table, keep), out_dir, name, sources, notes[name])
    pareto_figure(tables, out_dir / "pareto.png")
    for bench_file in [f for path in map(Path, paths) if path.is_dir() for f in sorted(path.glob("**/bench.csv"))]:
        write_bench_summary(bench_file, out_dir)
    if not rates_figure(measured, out_dir / "fig3_dyrate_rates.png"):
        print("no run with per-step rates (method dyrate) among the runs: no fig3_dyrate_rates.png")
    traces = read_traces(paths)
    if traces:
        attention_figure(traces, out_dir / "fig2_attention_by_step.png")
        kept_tokens_figure(traces, out_dir / "fig4_kept_tokens.png")
    else:
        print("no trace.json among the runs: fig2/fig4 need `dyrate-eval trace --out RUN_DIR/trace`")
    return tables
