"""Reading lmms-eval result files into one table: a row per run and task.

The full report (the paper's tables and figures) builds on this; here is only what
every report needs: finding the files, checking they are lmms-eval results, and the
scores with the method settings that produced them.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
from pathlib import Path

import pandas as pd

from .errors import PruningConfigError
from .methods import DEFAULT_METHOD, LMMS_MODELS, METHODS

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
    if config.get("model") not in LMMS_MODELS:
        raise PruningConfigError(
            f"{path} was written by lmms-eval model {config.get('model')!r}, not by one of this project's models "
            f"({', '.join(LMMS_MODELS)}): refused, its method and measurements are unknown"
        )
    model_args = _parse_model_args(config.get("model_args") or "")
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


def _object_count(doc: dict) -> str:
    count = len(doc["things"])
    return f"{count} object" + ("s" if count > 1 else "")


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
    settings = _parse_model_args(row["settings"])
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


def _per_sample(metric: str):
    def scores(path: Path) -> list[float]:
        values = [sample[metric] for sample in read_samples(path)]
        # pope keeps the prediction for its aggregate metrics
        return [float(v["prediction"] == v["truth"]) if isinstance(v, dict) else float(v) for v in values]

    return scores


def caption_cider_per_sample(samples: list[dict]) -> list[float]:
    """Each caption's CIDEr-D, from the references and prediction the caption task logs.
    pycocoevalcap takes its document frequencies from the references alone, so these
    average to the run's CIDEr and a group's mean is its share of it."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    entries = [sample["shapes_CIDEr"] for sample in samples]
    tokenizer = PTBTokenizer()
    references = tokenizer.tokenize({i: [{"caption": c} for c in e["references"]] for i, e in enumerate(entries)})
    predictions = tokenizer.tokenize({i: [{"caption": e["prediction"]}] for i, e in enumerate(entries)})
    _, scores = Cider().compute_score(references, predictions)
    by_index = dict(zip(references, scores))  # Cider scores in the order of the references' keys
    return [float(by_index[i]) for i in range(len(entries))]


@functools.lru_cache(maxsize=64)
def _caption_ciders(path: Path, modified_ns: int) -> list[float]:
    return caption_cider_per_sample(read_samples(path))


def caption_ciders(path: Path) -> list[float]:
    """``caption_cider_per_sample`` of a caption samples log, computed once per version
    of the file (the tokenizer starts a JVM)."""
    return _caption_ciders(path, path.stat().st_mtime_ns)


# Per-item breakdowns: task -> (what groups an item, from its doc; the items' scores,
# from the samples log's path). Captions group by how many objects the scene has.
SHAPES_BREAKDOWN = {
    "shapes_caption": (_object_count, caption_ciders),
    "shapes_vqa": (lambda doc: doc["kind"], _per_sample("exact_match")),
    "shapes_mcq": (lambda doc: doc["kind"], _per_sample("accuracy")),
    "shapes_pope": (lambda doc: doc["split"], _per_sample("accuracy")),
}


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


def _logged_samples_path(results_file: str, task: str, table_name: str) -> Path:
    """The samples log of ``task`` beside a results file, which ``table_name`` reads."""
    path = samples_file(Path(results_file), task)
    if not path.exists():
        raise PruningConfigError(f"{path} is missing: run lmms-eval with --log_samples for the {table_name}")
    return path


@functools.lru_cache(maxsize=None)
def _task_docs(task: str) -> dict[int, dict]:
    """The docs of an embedded task ("shapes_caption", ...) by doc_id, generated once:
    every per-item table joins its samples with them."""
    from .shapes_tasks import BUILDERS

    return {doc["doc_id"]: doc for doc in BUILDERS[task.removeprefix("shapes_")]()}


def shapes_breakdown(table: pd.DataFrame) -> pd.DataFrame:
    """Scores per question kind (vqa, mcq), per negative-sampling split (pope) and caption
    CIDEr per number of objects in the scene, from the samples logs (runs need
    --log_samples) joined with the tasks' docs."""
    records = []
    for key, rows in table.groupby(RUN_KEY, sort=False):
        record = dict(zip(RUN_KEY, key))
        for file, task in zip(rows["file"], rows["task"]):
            if task not in SHAPES_BREAKDOWN:
                continue
            group_of, scores_of = SHAPES_BREAKDOWN[task]
            samples_path = _logged_samples_path(file, task, "per-kind table")
            scores: dict[str, list[float]] = {}
            for sample, score in zip(read_samples(samples_path), scores_of(samples_path)):
                scores.setdefault(group_of(_task_docs(task)[sample["doc_id"]]), []).append(score)
            short = task.removeprefix("shapes_")
            for group in sorted(scores):
                record[f"{short} {group}"] = sum(scores[group]) / len(scores[group])
        records.append(record)
    return _method_order(pd.DataFrame(records))


def caption_content_table(table: pd.DataFrame) -> pd.DataFrame:
    """Per run, what its captions say right (``world.caption_content``, averaged): the
    share whose object count is right and the mean count error (positive: too many),
    the share of each scene's objects named, wrong objects per caption and the share
    naming the background right (of the captions that name one). Read from the caption
    samples logs and the task's docs."""
    from .shapes_tasks import scene_from_doc
    from .world import caption_content

    scenes = {doc_id: scene_from_doc(doc) for doc_id, doc in _task_docs("shapes_caption").items()}
    records = []
    for key, rows in table[table["task"] == "shapes_caption"].groupby(RUN_KEY, sort=False):
        samples_path = _logged_samples_path(rows["file"].iloc[0], "shapes_caption", "caption content table")
        contents = pd.DataFrame([caption_content(scenes[s["doc_id"]], s["shapes_CIDEr"]["prediction"]) for s in read_samples(samples_path)])
        counted = contents["count_error"].dropna()
        records.append({
            **dict(zip(RUN_KEY, key)),
            "captions": len(contents),
            "count right": float((counted == 0).mean()),
            "count error": float(counted.mean()),
            "objects named": float(contents["objects_recalled"].mean()),
            "wrong objects": float(contents["wrong_objects"].mean()),
            "background right": float(contents["background_right"].dropna().astype(float).mean()),
        })
    return _method_order(pd.DataFrame(records, columns=[*RUN_KEY, "captions", "count right", "count error", "objects named", "wrong objects", "background right"]))


def _caption_costs_by_objects(file: str) -> pd.DataFrame:
    """Per number of objects: the captions' summed CIDEr, count, and language-model
    TFLOPs pruned and unpruned (from the wrappers' per-sample measurements)."""
    path = _logged_samples_path(file, "shapes_caption", "per-objects table")
    docs = _task_docs("shapes_caption")
    rows = []
    for sample, cider in zip(read_samples(path), caption_ciders(path)):
        measured = next(c["dyrate"] for c in sample["token_counts"] if isinstance(c, dict) and "dyrate" in c)
        tflops = measured["tflops_language_model"]
        rows.append({"objects": _object_count(docs[sample["doc_id"]]), "cider": cider, "count": 1,
                     "tflops": tflops, "tflops_original": tflops / measured["flops_ratio_language_model"]})
    return pd.DataFrame(rows).groupby("objects").sum()


def caption_rate_by_objects(table: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """What one FastV rate per kind of scene could buy over one rate for all.

    From the greedy caption runs of the original model and of attention-ranked FastV at
    one K with several R: every assignment of those R to the scenes by their number of
    objects, scored with the runs' own per-caption CIDEr and FLOPs. For the FLOPs share
    of each single-R run, the best assignment spending no more: a ceiling for any policy
    that sets the prefill rate from how many objects an image holds, as a learned
    per-image rate (DyRate) might. Returns the table (empty without such runs) and the
    run files it read."""
    captions = table[(table["task"] == "shapes_caption") & (table["decoding"] == "greedy")]
    original: dict[float, str] = {}  # R = 0
    fastv: dict[str, dict[float, str]] = {}  # K -> R -> file
    for method, settings, file in zip(captions["method"], captions["settings"], captions["file"]):
        args = _parse_model_args(settings)
        if method == "original":
            original[0.0] = file
        elif method == "fastv" and args.get("selection", "attention") == "attention" and {"K", "R"} <= set(args):
            fastv.setdefault(args["K"], {})[float(args["R"])] = file
    rows, files = [], []
    for k, by_rate in fastv.items():
        by_rate = dict(sorted({**original, **by_rate}.items()))
        if len(by_rate) < 2:
            continue
        costs = {rate: _caption_costs_by_objects(file) for rate, file in by_rate.items()}
        if len({tuple(c["count"].items()) for c in costs.values()}) > 1:
            raise PruningConfigError(
                f"the caption runs of the original and FastV K={k} ({', '.join(by_rate.values())}) did not caption "
                "the same scenes (another --limit?): the per-objects table compares them sample for sample"
            )
        files += by_rate.values()
        rates = list(costs)
        groups = list(costs[rates[0]].index)
        count = costs[rates[0]]["count"].sum()

        def total(assignment):
            parts = [costs[rate].loc[group] for group, rate in zip(groups, assignment)]
            return sum(p["cider"] for p in parts) / count, 100 * sum(p["tflops"] for p in parts) / sum(p["tflops_original"] for p in parts)

        assignments = [(a, *total(a)) for a in itertools.product(rates, repeat=len(groups))]
        for rate in rates:
            cider, share = total([rate] * len(groups))
            best, best_cider, best_share = max((a for a in assignments if a[2] <= share + 1e-9), key=lambda a: a[1])
            rows.append({
                "K": k, "R": rate, "TFLOPs %": share, "caption CIDEr": cider,
                "best per-objects CIDEr": best_cider, "its TFLOPs %": best_share,
                "its R by objects": ", ".join(f"{g}: {r:g}" for g, r in zip(groups, best)),
            })
    return pd.DataFrame(rows), files


def _write_table(table: pd.DataFrame, out_dir: Path, name: str, sources: list[str]) -> None:
    table.to_csv(out_dir / f"{name}.csv", index=False)
    listing = "\n".join(f"- {file}" for file in sorted(set(sources)))
    (out_dir / f"{name}.md").write_text(
        table.to_markdown(index=False, floatfmt=".4f", missingval="missing") + f"\n\nRun files:\n{listing}\n"
    )


def write_summary(paths: list[str | Path], out_dir: str | Path, name: str = "summary") -> pd.DataFrame:
    """``<name>.csv`` and ``<name>.md``: scores per run and task, with the files read.
    Runs of the shapes tasks also get ``<name>_scores`` (a row per method setting) and
    ``<name>_by_kind`` (per question kind, yes/no split and objects per captioned scene),
    ``<name>_caption_content`` (what the captions get right) and, with FastV caption runs
    at several R, ``<name>_caption_rate_by_objects``."""
    table = results_table(paths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_table(table.drop(columns=["file"]), out_dir, name, table["file"].tolist())
    shapes = table[table["task"].isin({task for task, _ in SHAPES_SCORES})]
    if not shapes.empty:
        _write_table(shapes_scores(shapes), out_dir, f"{name}_scores", shapes["file"].tolist())
        _write_table(shapes_breakdown(shapes), out_dir, f"{name}_by_kind", shapes["file"].tolist())
        captions = shapes[shapes["task"] == "shapes_caption"]
        if not captions.empty:
            _write_table(caption_content_table(captions), out_dir, f"{name}_caption_content", captions["file"].tolist())
        headroom, files = caption_rate_by_objects(shapes)
        if not headroom.empty:
            _write_table(headroom, out_dir, f"{name}_caption_rate_by_objects", files)
    return table
