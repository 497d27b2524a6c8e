"""The one run reader: lmms-eval result files, the samples logs beside them and the
latency files ``dyrate-eval latency`` writes beside them, checked (which model and
policy wrote them, which run a latency file was measured for, duplicates, half-written
folders and files) before anything is merged; a bad file is refused by name.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from ..errors import PruningConfigError
from ..harness import DEFAULT_METHOD, LMMS_MODELS

_METADATA_SUFFIXES = ("_stderr", "_stderr_clt", "_stderr_clustered")


# run_all.sh evaluates a cell into "<cell>.partial" and renames it when lmms-eval wrote
# its results: whatever sits under such a folder is unfinished or abandoned.
PARTIAL_SUFFIX = ".partial"


def _partial_folder(path: Path) -> str | None:
    return next((part for part in path.parts if part.endswith(PARTIAL_SUFFIX)), None)


def find_result_files(paths: list[str | Path]) -> list[Path]:
    """The results files given or under the given folders; files under an unfinished
    cell's ``*.partial`` folder are never read."""
    files: list[Path] = []
    for path in map(Path, paths):
        if _partial_folder(path):
            raise PruningConfigError(
                f"{path} is inside the unfinished cell {_partial_folder(path)}: it is never read "
                "(rerun run_all.sh to finish that cell)"
            )
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            # (tasks' submission files are not runs: MMBench writes submissions/<task>_results.json)
            files.extend(f for f in sorted(path.glob("**/*_results.json"))
                         if not _partial_folder(f.relative_to(path)) and "submissions" not in f.relative_to(path).parts)
        else:
            raise PruningConfigError(f"results path {path} does not exist")
    if not files:
        raise PruningConfigError(f"no lmms-eval results files (*_results.json) under {', '.join(map(str, paths))}")
    return files


def parse_model_args(model_args: str) -> dict[str, str]:
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


def _results_json(path: Path) -> dict:
    """An lmms-eval results file written by one of this project's models, parsed."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PruningConfigError(f"cannot read results file {path}: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict) or "config" not in data:
        raise PruningConfigError(f"{path} is not an lmms-eval results file (no 'results' and 'config')")
    if data["config"].get("model") not in LMMS_MODELS:
        raise PruningConfigError(
            f"{path} was written by lmms-eval model {data['config'].get('model')!r}, not by one of this project's models "
            f"({', '.join(LMMS_MODELS)}): refused, its method and measurements are unknown"
        )
    return data


def read_results_file(path: Path) -> list[dict]:
    """Rows (one per task) of one lmms-eval results file."""
    data = _results_json(path)
    config = data["config"]
    model_args = parse_model_args(config.get("model_args") or "")
    rows = []
    for task, metrics in data["results"].items():
        row = {
            "file": str(path),
            "model": config.get("model"),
            "pretrained": model_args.get("pretrained", "(embedded)"),
            "method": LMMS_MODELS[config["model"]] or model_args.get("method", DEFAULT_METHOD),
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


@dataclass(frozen=True)
class RunConfiguration:
    """How an lmms-eval run was made, enough to make it again: its lmms-eval model with
    the ``--model_args`` string, and the generation settings each task ran with (with
    ``--gen_kwargs`` applied; groups of tasks have none)."""

    model: str
    model_args: str
    generation_kwargs: dict[str, dict]


def read_run_configuration(path: Path) -> RunConfiguration:
    data = _results_json(path)
    configs = data.get("configs") or {}
    return RunConfiguration(
        model=data["config"]["model"],
        model_args=data["config"].get("model_args") or "",
        generation_kwargs={task: dict(config.get("generation_kwargs") or {}) for task, config in configs.items()},
    )


# What tells one evaluated configuration from another.
RUN_KEY = ["pretrained", "method", "settings", "decoding"]


@functools.lru_cache(maxsize=64)
def _samples_log(path: Path, modified_ns: int) -> list[dict]:
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            samples.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise PruningConfigError(f"cannot read line {number} of samples log {path}: {error}") from None
    return samples


def read_samples(path: Path) -> list[dict]:
    """The samples of an lmms-eval samples log, read once per version of the file: the
    per-kind and the per-objects tables read the same caption logs."""
    return _samples_log(path, path.stat().st_mtime_ns)


def _sample_policy(sample: dict) -> dict | None:
    """The policy the wrappers recorded for a generated sample (None for a loglikelihood
    request's, which carries no measurements)."""
    return next((counts["dyrate"].get("policy") for counts in sample.get("token_counts") or []
                 if isinstance(counts, dict) and isinstance(counts.get("dyrate"), dict)), None)


def _same_setting(recorded, given: str) -> bool:
    if isinstance(recorded, bool):  # lmms-eval passes True for "true" and "True" alike
        return given.lower() == str(recorded).lower()
    try:
        return float(recorded) == float(given)
    except (TypeError, ValueError):
        return str(recorded) == given


def check_samples(results_file: Path, row: dict) -> None:
    """The samples log of one task of a results file (when logged) belongs to that run
    alone: each doc once, and every sample generated with the method and settings the
    results file names. Two runs writing into one output folder break either."""
    path = samples_file(results_file, row["task"])
    if not path.exists():
        return
    samples = read_samples(path)
    counts = collections.Counter(sample.get("doc_id") for sample in samples)
    repeated = sorted(doc_id for doc_id, count in counts.items() if count > 1)
    if repeated:
        raise PruningConfigError(
            f"{path} holds doc ids {', '.join(map(str, repeated[:5]))}{' ...' if len(repeated) > 5 else ''} more than once: "
            "two runs wrote into one output folder; rerun the cell into an empty --output_path"
        )
    settings = parse_model_args(row["settings"])
    for number, sample in enumerate(samples, start=1):
        policy = _sample_policy(sample)
        if policy is None:
            continue
        differing = [key for key, value in settings.items() if key in policy and not isinstance(policy[key], (list, dict))
                     and not _same_setting(policy[key], value)]
        if policy.get("method") != row["method"] or differing:
            raise PruningConfigError(
                f"{path} line {number} was generated with {policy}, but its results file {results_file} ran "
                f"{row['model']} with method {row['method']!r} and settings {row['settings'] or '(none)'}: two runs "
                "wrote into one output folder; rerun each into its own --output_path"
            )


def read_runs(paths: list[str | Path]) -> list[dict]:
    """The rows (a run file and task each) of every results file under ``paths``, each
    checked against its samples log (``check_samples``); two files holding the same task
    for the same configuration are refused, naming both, rather than merged."""
    rows = []
    for path in find_result_files(paths):
        for row in read_results_file(path):
            check_samples(path, row)
            rows.append(row)
    seen: dict[tuple, str] = {}
    for row in rows:
        key = (*(row[column] for column in RUN_KEY), row["task"])
        if key in seen:
            raise PruningConfigError(
                f"{seen[key]} and {row['file']} both hold {row['task']} for the same configuration "
                f"({row['model']}, pretrained={row['pretrained']}, method {row['method']}, settings {row['settings'] or '(none)'}, "
                f"{row['decoding']}): a run made twice; keep one of them"
            )
        seen[key] = row["file"]
    return rows


def results_table(paths: list[str | Path]) -> pd.DataFrame:
    return pd.DataFrame(read_runs(paths))


def samples_file(results_file: Path, task: str) -> Path:
    # lmms-eval writes <stamp>_results.json and <stamp>_samples_<task>.jsonl side by side
    return results_file.with_name(results_file.name.replace("_results.json", f"_samples_{task}.jsonl"))


def _logged_samples_path(results_file: str, task: str, table_name: str) -> Path:
    """The samples log of ``task`` beside a results file, which ``table_name`` reads."""
    path = samples_file(Path(results_file), task)
    if not path.exists():
        raise PruningConfigError(f"{path} is missing: run lmms-eval with --log_samples for the {table_name}")
    return path


# what the report reads from each sample's measurements (see measure.timing.sample_measurements)
MEASURED_FIELDS = {"tflops_language_model", "flops_ratio_language_model", "end_to_end_ms", "batch_size"}


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


class Runs(NamedTuple):
    scores: pd.DataFrame  # a row per run file and task, with its metrics
    measured: pd.DataFrame  # a row per generated sample, with its measurements
    latency: pd.DataFrame  # a row per pair of ``dyrate-eval latency`` (method and original on the same inputs)


def load_runs(paths: list[str | Path]) -> Runs:
    """Scores, measured samples and latency pairs, each row keyed by its run file, model
    label, method, settings, decoding and task. The runs are checked as ``read_runs``
    checks them, their latency files as ``read_latency`` does, and a latency file whose
    run is not among them is refused."""
    score_rows, measured_rows, latency_rows = [], [], []
    files = []
    for file, file_rows in itertools.groupby(read_runs(paths), key=lambda row: row["file"]):
        rows = list(file_rows)
        files.append(Path(file))
        pairs = read_latency(Path(file), rows)  # checked against the run before its rows are relabelled
        records = {row["task"]: read_sample_measurements(samples_file(Path(file), row["task"])) for row in rows}
        searched = searched_schedule([record for task_records in records.values() for record in task_records])
        for row in rows:
            row["model"] = model_label(row["pretrained"])
            row.update(searched)
            score_rows.append(row)
            key = {key: row[key] for key in ("file", "model", "method", "settings", "decoding", "task")}
            measured_rows += [key | record for record in records[row["task"]]]
            latency_rows += [pair | key for pair in pairs if pair["task"] == row["task"]]
    _refuse_unclaimed_latency_files(paths, files)
    return Runs(pd.DataFrame(score_rows), pd.DataFrame(measured_rows), pd.DataFrame(latency_rows))


def searched_schedule(records: list[dict]) -> dict:
    """For a run of a schedule file that a search wrote, the method and settings it is
    shown with: the search (gsearch, psigmoid) and its label, from the policy the run's
    samples record; empty for any other run."""
    policies = [record.get("policy") or {} for record in records]
    searched = next((policy for policy in policies if policy.get("searched_by")), None)
    return {"method": searched["searched_by"], "settings": searched.get("label") or ""} if searched else {}


# -- paired latency (``dyrate-eval latency``) -------------------------------------------------


def latency_file(results_file: Path) -> Path:
    """Where ``dyrate-eval latency`` writes a run's pairs: ``<stamp>_latency.csv`` beside its
    ``<stamp>_results.json``, named as lmms-eval names the samples logs."""
    return results_file.with_name(results_file.name.replace("_results.json", "_latency.csv"))


# The columns of a latency file. Each row names the run it was measured for (checked
# against the results file it sits beside) and the conditions of the pass, then holds one
# pair: the method's times and the original's, on the same inputs.
LATENCY_RUN_COLUMNS = ("results_file", "model", "pretrained", "method", "settings")
LATENCY_CONDITIONS = ("samples", "warmup", "batch_size", "device", "dtype", "threads")
LATENCY_TIMES = ("ttft_ms", "decode_ms_per_token", "end_to_end_ms")
LATENCY_COLUMNS = (*LATENCY_RUN_COLUMNS, "task", "decoding", *LATENCY_CONDITIONS, "sample", "doc_ids", "first",
                   "new_tokens", "new_tokens_original", *LATENCY_TIMES, *(f"{time}_original" for time in LATENCY_TIMES))
_LATENCY_TEXT = (*LATENCY_RUN_COLUMNS, "task", "decoding", "device", "dtype", "doc_ids", "first")
# empty where a generation made no decode step (a one-token answer)
_LATENCY_OPTIONAL = ("decode_ms_per_token", "decode_ms_per_token_original")


def _run_identity(values: dict) -> str:
    return (f"{values['model']} method {values['method']!r}, settings {values['settings'] or '(none)'}, pretrained "
            f"{values['pretrained']}, results file {values['results_file']}")


def read_latency(results_file: Path, rows: list[dict]) -> list[dict]:
    """The pairs of a run's latency file, [] when it has none. Refused, by name, unless it
    was measured for this run (the results file's name, model, method and settings) on the
    tasks the run generated for, with each task's decoding, and holds every pair it
    announces per task (a half-written or cut file is not read)."""
    path = latency_file(results_file)
    if not path.exists():
        return []
    try:
        table = pd.read_csv(path, dtype={column: str for column in _LATENCY_TEXT}, keep_default_na=False,
                            na_values={column: [""] for column in _LATENCY_OPTIONAL})
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise PruningConfigError(f"cannot read latency file {path}: {error}") from None
    missing = [column for column in LATENCY_COLUMNS if column not in table]
    if missing:
        raise PruningConfigError(f"{path} is not a `dyrate-eval latency` file (no {', '.join(missing)})")
    expected = {"results_file": results_file.name, **{key: rows[0][key] for key in LATENCY_RUN_COLUMNS[1:]}}
    found = {key: sorted(set(table[key])) for key in LATENCY_RUN_COLUMNS}
    rerun = f"rerun `dyrate-eval latency --force {results_file.parent}`"
    if any(found[key] != [value] for key, value in expected.items()):
        shown = {key: " / ".join(values) for key, values in found.items()}
        raise PruningConfigError(
            f"{path} was measured for {_run_identity(shown)}, but sits beside {results_file}, which ran "
            f"{_run_identity(expected)}: it belongs to another run; {rerun}"
        )
    numeric = [column for column in LATENCY_COLUMNS if column not in _LATENCY_TEXT]
    unusable = [column for column in numeric if not pd.api.types.is_numeric_dtype(table[column])
                or (column not in _LATENCY_OPTIONAL and table[column].isna().any())]
    if unusable:
        raise PruningConfigError(f"{path} has rows without a number in {', '.join(unusable)}: half-written or edited; {rerun}")
    configured = set(read_run_configuration(results_file).generation_kwargs)
    if set(table["task"]) != configured:
        raise PruningConfigError(
            f"{path} holds tasks {', '.join(sorted(set(table['task'])))}, but {results_file} generated for "
            f"{', '.join(sorted(configured))}: it was measured for another run; {rerun}"
        )
    decodings = {row["task"]: row["decoding"] for row in rows}
    for task, pairs in table.groupby("task"):
        announced = pairs["samples"].unique()
        if len(announced) != 1 or len(pairs) != announced[0]:
            raise PruningConfigError(
                f"{path} holds {len(pairs)} pairs of {task} where it announces {', '.join(map(str, announced))}: "
                f"half-written or cut; {rerun}"
            )
        if set(pairs["decoding"]) != {decodings[task]}:
            raise PruningConfigError(
                f"{path} timed {task} with {', '.join(sorted(set(pairs['decoding'])))} decoding, but {results_file} ran it "
                f"{decodings[task]}: it belongs to another run; {rerun}"
            )
    return table.to_dict("records")


def _refuse_unclaimed_latency_files(paths: list[str | Path], results_files: list[Path]) -> None:
    """A latency file under the given folders whose results file was not read: copied or
    left behind, it belongs to a run nobody asked for."""
    claimed = {latency_file(file) for file in results_files}
    for path in map(Path, paths):
        if not path.is_dir():
            continue
        for found in sorted(path.glob("**/*_latency.csv")):
            if not _partial_folder(found.relative_to(path)) and found not in claimed:
                raise PruningConfigError(
                    f"{found} is a latency file without its run: no results file "
                    f"{found.name.replace('_latency.csv', '_results.json')} was read beside it; put it back beside the "
                    "run it was measured for, or delete it"
                )
