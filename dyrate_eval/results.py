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
from .methods import DEFAULT_METHOD, LMMS_MODELS

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
            "pretrained": model_args.get("pretrained", "(default)"),
            "method": LMMS_MODELS.get(config.get("model")) or model_args.get("method", DEFAULT_METHOD),
            "settings": ",".join(f"{k}={v}" for k, v in model_args.items() if k not in ("pretrained", "method")),
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


def write_summary(paths: list[str | Path], out_dir: str | Path, name: str = "summary") -> pd.DataFrame:
    """``<name>.csv`` and ``<name>.md`` (scores per method and task, plus the files read)."""
    table = results_table(paths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / f"{name}.csv", index=False)
    shown = table.drop(columns=["file"])
    sources = "\n".join(f"- {file}" for file in sorted(set(table["file"])))
    (out_dir / f"{name}.md").write_text(
        shown.to_markdown(index=False, floatfmt=".4f", missingval="missing") + f"\n\nRun files:\n{sources}\n"
    )
    return table
