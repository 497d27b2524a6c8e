"""The report's figures: the accuracy / FLOPs pareto front, the attention on each token
group per generation step (fig2), DyRate's chosen rates per step (fig3) and the kept
image tokens per step (fig4)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from adjustText import adjust_text  # noqa: E402

from ..core.plan import GROUPS  # noqa: E402
from ..errors import PruningConfigError  # noqa: E402
from ..measure.trace import TRACE_FILE  # noqa: E402
from .tables import REPORTED_SOURCE, method_rank  # noqa: E402

# adjustText iterations for the pareto labels (enough for them to settle apart)
LABEL_ITERATIONS = 300


def _short_settings(settings: dict) -> str:
    """Settings as a figure label: values that are paths by their file or folder name."""
    return " ".join(f"{key}={Path(value).name if '/' in str(value) else value}" for key, value in settings.items())


def point_label(settings: str) -> str:
    """A run's settings ("K=2,R=0.5") as a short point label; the calibration task of
    searched schedules is left out."""
    pairs = (item.partition("=") for item in filter(None, settings.split(",")))
    return _short_settings({key: value for key, _, value in pairs if key != "task"})


def pareto_figure(tables: dict[str, pd.DataFrame], path: Path, score_columns: list[str]) -> None:
    """Score against TFLOPs % for every method: one panel per score column (of
    ``score_columns``) that has measured or reported points with a TFLOPs share."""
    panels = []
    for name in ("table1_benchmarks", "table2_captioning"):
        table = tables[name]
        for column in score_columns:
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
            colour = plt.cm.tab10(method_rank(method) % 10)
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
