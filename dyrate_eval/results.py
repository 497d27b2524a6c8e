"""Reading lmms-eval result files into one table: a row per run and task.

The full report (the paper's tables and figures) builds on this; here is only what
every report needs: finding the files, checking they are lmms-eval results, and the
scores with the method settings that produced them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .errors import PruningConfigError
from .methods import DEFAULT_METHOD, LMMS_MODELS, METHODS

_METADATA_SUFFIXES = ("_stderr", "_stderr_clt", "_stderr_clustered")


def find_result_files(paths: list[str | Path]) -> list[Path]:
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(sorted(path.glob("**/*_results.json")))
        else:
            raise PruningConfigError(f"results path {path} does not exist")
    if not files:
        raise PruningConfigError(f"no lmms-eval results files (*_results.json) under {', '.join(map(str, paths))}")
    return files


def _parse_model_args(model_args: str) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in model_args.split(",") if "=" in item]
    return {key.strip(): value.strip() for key, value in pairs}


def decoding_label(generation_kwargs: dict) -> str:
    """greedy, beam-N, top-p or sampling, from a task's generation settings."""
    beams = int(generation_kwargs.get("num_beams") or 1)
    if beams > 1:
        return f"beam-{beams}"
    if generation_kwargs.get("do_sample") or float(generation_kwargs.get("temperature") or 0) > 0:
        return "top-p" if generation_kwargs.get("top_p") not in (None, 1, 1.0) else "sampling"
    return "greedy"


def read_results_file(path: Path) -> list[dict]:
    """Rows (one per task) of one lmms-eval results file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PruningConfigError(f"cannot read results file {path}: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict) or "config" not in data:
        raise PruningConfigError(f"{path} is not an lmms-eval results file (no 'results' and 'config')")
    config = data["config"]
    model_args = _parse_model_args(config.get("model_args") or "")
    rows = []
    for task, metrics in data["results"].items():
        row = {
            "file": str(path),
            "model": config.get("model"),
            "pretrained": model_args.get("pretrained", "(embedded)"),
            "method": LMMS_MODELS.get(config.get("model")) or model_args.get("method", DEFAULT_METHOD),
            "settings": ",".join(f"{k}={v}" for k, v in model_args.items() if k not in ("pretrained", "method")),
            "decoding": decoding_label((data.get("configs", {}).get(task) or {}).get("generation_kwargs") or {}),
            "task": task,
        }
        for key, value in metrics.items():
            name, _, filter_name = key.partition(",")
            if filter_name and not name.endswith(_METADATA_SUFFIXES) and isinstance(value, (int, float)):
                row[name] = value
        rows.append(row)
    return rows


def results_table(paths: list[str | Path]) -> pd.DataFrame:
    rows = [row for path in find_result_files(paths) for row in read_results_file(path)]
    return pd.DataFrame(rows)


# What tells one evaluated configuration from another.
RUN_KEY = ["pretrained", "method", "settings", "decoding"]
# The headline score columns of the embedded shapes tasks: (task, metric) -> column.
SHAPES_SCORES = {
    ("shapes_caption", "shapes_CIDEr"): "caption CIDEr",
    ("shapes_caption", "shapes_Bleu_4"): "caption BLEU-4",
    ("shapes_vqa", "exact_match"): "vqa EM",
    ("shapes_pope", "accuracy"): "pope acc",
    ("shapes_pope", "f1"): "pope F1",
    ("shapes_pope", "yes_ratio"): "pope yes-ratio",
    ("shapes_mcq", "accuracy"): "mcq acc",
}
# Per-item breakdowns: task -> (doc field grouped by, per-sample metric in the samples log).
SHAPES_BREAKDOWN = {"shapes_vqa": ("kind", "exact_match"), "shapes_mcq": ("kind", "accuracy"), "shapes_pope": ("split", "accuracy")}


def _method_order(table: pd.DataFrame) -> pd.DataFrame:
    order = {name: index for index, name in enumerate(METHODS)}
    return table.sort_values(["method", "settings", "decoding"], key=lambda col: col.map(order) if col.name == "method" else col, kind="stable")


def shapes_scores(table: pd.DataFrame) -> pd.DataFrame:
    """One row per model and method setting, the shapes tasks' headline scores as columns
    (missing cells stay empty)."""
    columns = {}
    for (task, metric), label in SHAPES_SCORES.items():
        rows = table[table["task"] == task]
        if metric in rows:
            columns[label] = rows.set_index(RUN_KEY)[metric]
    wide = pd.DataFrame(columns).reset_index()
    return _method_order(wide)[[*RUN_KEY, *[c for c in SHAPES_SCORES.values() if c in wide]]]


def samples_file(results_file: Path, task: str) -> Path:
    # lmms-eval writes <stamp>_results.json and <stamp>_samples_<task>.jsonl side by side
    return results_file.with_name(results_file.name.replace("_results.json", f"_samples_{task}.jsonl"))


def shapes_breakdown(table: pd.DataFrame) -> pd.DataFrame:
    """Scores per question kind (vqa, mcq) and per negative-sampling split (pope), from
    the samples logs (runs need --log_samples) joined with the tasks' docs."""
    from .shapes_tasks import BUILDERS

    docs = {f"shapes_{name}": {doc["doc_id"]: doc for doc in build()} for name, build in BUILDERS.items()}
    records = []
    for key, rows in table.groupby(RUN_KEY, sort=False):
        record = dict(zip(RUN_KEY, key))
        for file, task in zip(rows["file"], rows["task"]):
            if task not in SHAPES_BREAKDOWN:
                continue
            field, metric = SHAPES_BREAKDOWN[task]
            samples = samples_file(Path(file), task)
            if not samples.exists():
                raise PruningConfigError(f"{samples} is missing: run lmms-eval with --log_samples for the per-kind table")
            scores: dict[str, list[float]] = {}
            for line in samples.read_text().splitlines():
                sample = json.loads(line)
                value = sample[metric]
                if isinstance(value, dict):  # pope keeps the prediction for its aggregate metrics
                    value = float(value["prediction"] == value["truth"])
                scores.setdefault(docs[task][sample["doc_id"]][field], []).append(float(value))
            short = task.removeprefix("shapes_")
            for group in sorted(scores):
                record[f"{short} {group}"] = sum(scores[group]) / len(scores[group])
        records.append(record)
    return _method_order(pd.DataFrame(records))


def _write_table(table: pd.DataFrame, out_dir: Path, name: str, sources: list[str]) -> None:
    table.to_csv(out_dir / f"{name}.csv", index=False)
    listing = "\n".join(f"- {file}" for file in sorted(set(sources)))
    (out_dir / f"{name}.md").write_text(
        table.to_markdown(index=False, floatfmt=".4f", missingval="missing") + f"\n\nRun files:\n{listing}\n"
    )


def write_summary(paths: list[str | Path], out_dir: str | Path, name: str = "summary") -> pd.DataFrame:
    """``<name>.csv`` and ``<name>.md``: scores per run and task, with the files read.
    Runs of the shapes tasks also get ``<name>_scores`` (a row per method setting) and
    ``<name>_by_kind`` (per question kind and yes/no split)."""
    table = results_table(paths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_table(table.drop(columns=["file"]), out_dir, name, table["file"].tolist())
    shapes = table[table["task"].isin({task for task, _ in SHAPES_SCORES})]
    if not shapes.empty:
        _write_table(shapes_scores(shapes), out_dir, f"{name}_scores", shapes["file"].tolist())
        _write_table(shapes_breakdown(shapes), out_dir, f"{name}_by_kind", shapes["file"].tolist())
    return table
