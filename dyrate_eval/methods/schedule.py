"""Any per-layer keep schedule, fixed at prefill: what G-Search and P-Sigmoid write
(``dyrate_eval/search/``), by hand or from a file."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..arch import Arch
from ..core.policy import PruningPolicy
from ..core.settings import POSITIONS_SETTING, Setting
from ..errors import PruningConfigError

SCHEDULE_ALLOWED = (
    "a JSON schedule file or keep counts separated by '/' (e.g. 144/144/72/72/36/36), one per decoder "
    "layer, non-increasing, the first equal to the image tokens (layer 0 is never pruned)"
)
# The searches that write schedule files (dyrate_eval/search/); a run of such a file
# is reported as its search, not as a hand-written schedule.
SCHEDULE_SEARCHES = ("gsearch", "psigmoid")
_INLINE_COUNTS = re.compile(r"\d+(/\d+)*")
# A count as someone may mistype it inline ("-5", "72.5"): such a string is read as
# inline counts and its bad count named, not looked up as a file.
_NUMBER = re.compile(r"[-+]?\d+(\.\d*)?")


@dataclass(frozen=True)
class KeepSchedule:
    """Image tokens each decoder layer keeps (``counts[l]`` for layer l); for a file a
    search wrote, the search (``searched_by``) and a short ``label`` of its settings."""

    counts: tuple[int, ...]
    searched_by: str | None = None
    label: str | None = None


def _schedule_error(raw: Any, reason: str) -> PruningConfigError:
    return PruningConfigError(
        f"schedule={raw!r} is not allowed for method 'schedule': schedule must be {SCHEDULE_ALLOWED} ({reason})"
    )


def _read_schedule_file(raw: Any) -> tuple[Any, Any, Any]:
    """(counts, searched_by, label) from a JSON file: a list of counts, or an object with
    a "schedule" list (what the searches write, with "searched_by" and "label")."""
    try:
        text = Path(raw).read_text()
    except OSError as error:
        raise _schedule_error(raw, f"no such readable file ({error.strerror}); counts given inline are separated by '/'") from None
    try:
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _schedule_error(raw, f"cannot read it as JSON: {error}") from None
    if isinstance(data, list):
        return data, None, None
    if not isinstance(data, dict) or not isinstance(data.get("schedule"), list):
        raise _schedule_error(raw, "the file holds neither a list of counts nor an object with a 'schedule' list")
    searched_by, label = data.get("searched_by"), data.get("label")
    if not all(value is None or isinstance(value, str) for value in (searched_by, label)):
        raise _schedule_error(raw, "the file's 'searched_by' and 'label' must be strings")
    return data["schedule"], searched_by, label


def _looks_inline(raw: str) -> bool:
    """Counts separated by '/' with a mistyped count, rather than a file's path: no such
    file, no .json name, and some part a number."""
    return "/" in raw and not raw.endswith(".json") and not Path(raw).exists() and any(map(_NUMBER.fullmatch, raw.split("/")))


def _inline_count(raw: str, index: int, part: str) -> int:
    try:
        return int(part)
    except ValueError:
        raise _schedule_error(raw, f"layer {index}'s count {part!r} is not a whole number of image tokens") from None


def _parse_schedule(raw: Any, arch: Arch) -> KeepSchedule:
    """A list of counts (Python), counts separated by '/' (lmms-eval splits model_args at
    commas) or a JSON file; checked against the model's depth and image tokens."""
    searched_by = label = None
    if isinstance(raw, (list, tuple)):
        counts = list(raw)
    elif isinstance(raw, str) and _INLINE_COUNTS.fullmatch(raw):
        counts = [int(count) for count in raw.split("/")]
    elif isinstance(raw, str) and _looks_inline(raw):
        counts = [_inline_count(raw, index, part) for index, part in enumerate(raw.split("/"))]
    elif isinstance(raw, (str, Path)):
        counts, searched_by, label = _read_schedule_file(raw)
    else:
        raise _schedule_error(raw, f"got a {type(raw).__name__}")
    if not all(isinstance(count, int) and not isinstance(count, bool) for count in counts):
        raise _schedule_error(raw, "every count must be a whole number of image tokens")
    if len(counts) != arch.layers:
        raise _schedule_error(raw, f"got {len(counts)} counts for {arch.layers} decoder layers")
    for layer, count in enumerate(counts):
        if not 0 <= count <= arch.n_img:
            raise _schedule_error(raw, f"layer {layer} keeps {count}, outside 0..{arch.n_img}, the model's image tokens")
    if counts[0] != arch.n_img:
        raise _schedule_error(raw, f"layer 0 keeps {counts[0]}, but it always sees all {arch.n_img} image tokens")
    for layer in range(1, arch.layers):
        if counts[layer] > counts[layer - 1]:
            raise _schedule_error(raw, f"layer {layer} keeps {counts[layer]}, more than layer {layer - 1}'s {counts[layer - 1]}")
    return KeepSchedule(tuple(counts), searched_by, label)


def _schedule_required(arch: Arch) -> KeepSchedule:
    """No default: a schedule is the whole setting of the method."""
    raise PruningConfigError(
        f"method 'schedule' needs schedule=: {SCHEDULE_ALLOWED}; this model has {arch.layers} decoder layers "
        f"and {arch.n_img} image tokens"
    )


class Schedule(PruningPolicy):
    """Any per-layer keep schedule, fixed at prefill for the whole generation: layer l
    sees ``schedule[l]`` image tokens; where the count drops, the tokens are ranked by the
    previous layer's attention from the last prompt token (what G-Search and P-Sigmoid
    write; FastV and VTW are special cases). Counts are for the model's image tokens per
    sample (LLaVA-1.5's fixed count)."""

    name = "schedule"
    settings = (Setting("schedule", SCHEDULE_ALLOWED, _parse_schedule, _schedule_required), POSITIONS_SETTING)

    def describe(self):
        described = {"method": self.name, "schedule": list(self.schedule.counts), "positions": self.positions}
        if self.schedule.searched_by:
            described |= {"searched_by": self.schedule.searched_by, "label": self.schedule.label}
        return described

    def keep_before_layer(self, layer, step, view):
        counts = self.schedule.counts
        if step == 0 and counts[layer] < counts[layer - 1]:
            return torch.full_like(view.n_img, counts[layer])
        return None
