"""Pruning methods as small policies on the shared core.

A policy answers one question for the executor in ``hf_llava``: before decoder layer
``layer`` at generation step ``step``, how many image tokens should each sample keep?
``None`` means "no change". The executor does the rest (ranking by attention score,
physically removing tokens, recording the plan), so a policy holds no tensors of the
model and touches no transformers code.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from .arch import Arch
from .embedded import EMBEDDED_MODEL_DIR, EMBEDDED_PREDICTOR
from .errors import PruningConfigError
from .predictor import RatePredictor


@dataclass(frozen=True)
class Setting:
    """One user-facing setting of a method: its parse/check rule and its default."""

    name: str
    allowed: str  # human-readable allowed values, used in error messages
    parse: Callable[[Any, Arch], Any]  # (raw value, model shape) -> value; raises ValueError if not allowed
    default: Callable[[Arch], Any]  # model shape -> default value


def _parse_layer(value: Any, arch: Arch) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError
    number = float(value)
    if not number.is_integer() or not 1 <= number <= arch.layers - 1:
        raise ValueError
    return int(number)


def _parse_rate(value: Any, arch: Arch) -> float:
    if isinstance(value, bool):
        raise ValueError
    number = float(value)
    if not (0.0 <= number <= 1.0) or math.isnan(number):
        raise ValueError
    return number


def layer_setting(default: Callable[[Arch], int]) -> Setting:
    return Setting("K", "an integer in 1..num_layers-1", _parse_layer, default)


RATE_SETTING = Setting("R", "a number in [0, 1]", _parse_rate, lambda arch: 0.5)


def choice_setting(name: str, choices: tuple[str, ...], default: str) -> Setting:
    """A setting that takes one of ``choices``."""

    def parse(value: Any, arch: Arch) -> str:
        if value not in choices:
            raise ValueError
        return value

    return Setting(name, " or ".join(choices), parse, lambda arch: default)


SELECTIONS = ("attention", "random")
# Random selection of the same count is the control that tells whether the attention
# ranking carries information on a model.
SELECTION_SETTING = choice_setting("selection", SELECTIONS, "attention")


@dataclass
class StepView:
    """What a policy may look at when deciding: per-sample image counts, and for a
    policy that observes this layer, what the step's query attends to."""

    n_img: torch.Tensor  # (B,) image tokens in each sample's prompt
    # (B, heads, len(plan.GROUPS)): the step's attention at the previous layer, per head,
    # summed over the system, image, instruction and response tokens
    group_attention: torch.Tensor | None = None


class PruningPolicy:
    """Base of every method. Subclasses set ``name`` and ``settings`` and override
    ``keep_before_layer``."""

    name: ClassVar[str]
    settings: ClassVar[tuple[Setting, ...]] = ()
    # A progressive policy's drops are for good: the dropped tokens leave the KV cache of
    # the later layers. Otherwise every image token stays cached and each selection is
    # made among all of them, the others hidden from attention for that step (mode=mask).
    progressive: bool = True
    # FLOPs of one observed decision beyond the scoring row (DyRate's predictor)
    decision_flops: int = 0
    # Whether every prompt must hold an image: a method that selects image tokens has
    # nothing to select from in a text-only prompt
    needs_image: ClassVar[bool] = True

    def __init__(self, arch: Arch, values: dict[str, Any]):
        self.arch = arch
        self.num_layers = arch.layers
        for setting in self.settings:
            setattr(self, setting.name, values[setting.name])

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, **{s.name: getattr(self, s.name) for s in self.settings}}

    def keep_before_layer(self, layer: int, step: int, view: StepView) -> torch.Tensor | None:
        """Image tokens to keep per sample from ``layer`` on, or None to keep the current set."""
        return None

    def observes(self, layer: int, step: int) -> bool:
        """Whether ``keep_before_layer`` at this layer and step looks at
        ``StepView.group_attention`` (the executor computes it only then)."""
        return False

    @property
    def ranks_by_attention(self) -> bool:
        """Whether the executor ranks image tokens by the attention it measures; when
        not, ``selection_scores`` ranks them."""
        return True

    def selection_scores(self, candidates: torch.Tensor) -> torch.Tensor:
        """Scores ranking the (B, N) ``candidates`` for keeping (higher is kept first)."""
        raise NotImplementedError(f"{self.name} ranks image tokens by attention")


class Original(PruningPolicy):
    """No pruning: the reference every ratio is taken against."""

    name = "original"
    needs_image = False  # it selects nothing: a text-only prompt runs as the unmodified model runs it


class FastV(PruningPolicy):
    """At prefill, after layer K-1, keep the top (1-R) share of image tokens for all
    layers >= K and for the whole generation. ``selection=random`` keeps a random set
    of the same size instead (a control for the attention ranking)."""

    name = "fastv"
    settings = (layer_setting(lambda arch: 2), RATE_SETTING, SELECTION_SETTING)

    def __init__(self, arch, values):
        super().__init__(arch, values)
        # seeded once per model: a rerun of the same requests drops the same tokens
        self._random = torch.Generator().manual_seed(0)

    def keep_before_layer(self, layer, step, view):
        if step == 0 and layer == self.K:
            return torch.round((1.0 - self.R) * view.n_img.double()).long()
        return None

    @property
    def ranks_by_attention(self):
        return self.selection == "attention"

    def selection_scores(self, candidates):
        return torch.rand(candidates.shape, generator=self._random).to(candidates.device)


class VTW(PruningPolicy):
    """Visual-token withdrawal: layers >= K see no image tokens, in prefill and decode.

    The default K is half the depth: 16 of 32 layers (7B) and 20 of 40 (13B), VTW's
    published choices for LLaVA-1.5.
    """

    name = "vtw"
    settings = (layer_setting(lambda arch: arch.layers // 2),)

    def keep_before_layer(self, layer, step, view):
        if step == 0 and layer == self.K:
            return torch.zeros_like(view.n_img)
        return None


MODES = ("progressive", "mask")
MODE_SETTING = choice_setting("mode", MODES, "progressive")


def _parse_predictor(value: Any, arch: Arch) -> RatePredictor:
    """A predictor folder, or a predictor already built (the bench's random one)."""
    predictor = value if isinstance(value, RatePredictor) else RatePredictor.load(value)
    predictor.check_fits(arch, predictor.source if isinstance(value, RatePredictor) else str(value))
    return predictor


def _default_predictor(arch: Arch) -> RatePredictor:
    """The predictor shipped with the embedded model; every other model needs its own."""
    if arch.name and Path(arch.name).resolve() == EMBEDDED_MODEL_DIR.resolve():
        return _parse_predictor(EMBEDDED_PREDICTOR, arch)
    raise PruningConfigError(
        f"method 'dyrate' needs predictor=DIR: no trained predictor ships for {arch.name or 'this model'}; "
        f"train one with `dyrate-eval train-predictor --pretrained {arch.name or 'MODEL'} --out DIR` "
        "and pass predictor=DIR"
    )


PREDICTOR_SETTING = Setting("predictor", "a folder written by `dyrate-eval train-predictor`", _parse_predictor, _default_predictor)


class DyRate(PruningPolicy):
    """A learned predictor picks the pruning rate anew at every generation step, from the
    step's attention per head on the system, image, instruction and response tokens at
    layer K-1 (K and the rates come with the predictor); layers >= K keep the top
    (1 - rate) share of image tokens by that step's attention, among those still kept
    (progressive: evicted tokens leave the KV cache for good) or, with mode=mask, among
    all of them."""

    name = "dyrate"
    settings = (PREDICTOR_SETTING, MODE_SETTING)

    def __init__(self, arch, values):
        super().__init__(arch, values)
        self.K = self.predictor.K
        self.decision_flops = self.predictor.flops
        self.predictor.requires_grad_(False)  # it only infers here: no autograd bookkeeping at every step
        # the keep count of each rate for the image counts of the generation running
        # (the executor hands the same counts to every step of one generation)
        self._counts_for: torch.Tensor | None = None
        self._keep_counts: torch.Tensor | None = None

    @property
    def progressive(self) -> bool:
        return self.mode == "progressive"

    def describe(self):
        return {"method": self.name, "predictor": self.predictor.source, "mode": self.mode, "K": self.K,
                "rates": list(self.predictor.rates)}

    def observes(self, layer, step):
        return layer == self.K

    def keep_before_layer(self, layer, step, view):
        if layer != self.K:
            return None
        device = view.group_attention.device
        if self.predictor.feature_mean.device != device:  # moved once, not at every step
            self.predictor.to(device)
        if view.n_img is not self._counts_for:
            self._counts_for, self._keep_counts = view.n_img, self.predictor.keep_counts(view.n_img)
        rate = self.predictor(view.group_attention).argmax(-1, keepdim=True)
        return self._keep_counts.gather(1, rate.to(self._keep_counts.device))[:, 0]


class FixedPrune(PruningPolicy):
    """DyRate's ablation baseline: one rate R at every step, applied at layer K as DyRate
    applies its rates. Progressive, the prefill's selection holds (FastV at the same K
    and R); with mode=mask every step keeps the top share by its own attention."""

    name = "fixed_prune"
    settings = (layer_setting(lambda arch: 2), RATE_SETTING, MODE_SETTING)

    @property
    def progressive(self) -> bool:
        return self.mode == "progressive"

    def keep_before_layer(self, layer, step, view):
        if layer == self.K and (step == 0 or not self.progressive):
            return torch.round((1.0 - self.R) * view.n_img.double()).long()
        return None


class DepthPrune(PruningPolicy):
    """DyRate's other ablation baseline: a rate that grows with depth and holds for the
    whole generation. Layer l >= K drops the share min(1, 2R (l-K+1) / (L-K+1)) of the
    image tokens (L layers; each drop ranked by the previous layer's attention of the
    last prompt token), so the layers >= K drop R on average, as FixedPrune does at each
    of them (exactly while 2R (L-K) <= L-K+1; above that the deepest layers drop all)."""

    name = "depth_prune"
    settings = (layer_setting(lambda arch: 2), RATE_SETTING)

    def layer_rate(self, layer: int) -> float:
        return min(1.0, 2 * self.R * (layer - self.K + 1) / (self.num_layers - self.K + 1))

    def keep_before_layer(self, layer, step, view):
        if step == 0 and layer >= self.K:
            return torch.round((1.0 - self.layer_rate(layer)) * view.n_img.double()).long()
        return None


SCHEDULE_ALLOWED = (
    "a JSON schedule file or keep counts separated by '/' (e.g. 144/144/72/72/36/36), one per decoder "
    "layer, non-increasing, the first equal to the image tokens (layer 0 is never pruned)"
)
# The searches that write schedule files (dyrate_eval/schedules.py); a run of such a file
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
    settings = (Setting("schedule", SCHEDULE_ALLOWED, _parse_schedule, _schedule_required),)

    def describe(self):
        described = {"method": self.name, "schedule": list(self.schedule.counts)}
        if self.schedule.searched_by:
            described |= {"searched_by": self.schedule.searched_by, "label": self.schedule.label}
        return described

    def keep_before_layer(self, layer, step, view):
        counts = self.schedule.counts
        if step == 0 and counts[layer] < counts[layer - 1]:
            return torch.full_like(view.n_img, counts[layer])
        return None


METHODS: dict[str, type[PruningPolicy]] = {
    policy.name: policy for policy in (Original, FastV, VTW, DyRate, FixedPrune, DepthPrune, Schedule)
}

# The lmms-eval models and the method each runs: None means chosen with method=,
# defaulting to DEFAULT_METHOD. The wrappers and the results reader both use this.
DEFAULT_METHOD = "dyrate"
LMMS_MODELS: dict[str, str | None] = {
    "dyrate_llava": None,
    "original_llava": "original",
    "fastv_llava": "fastv",
    "vtw_llava": "vtw",
}


def parse_settings(pairs: list[str], *, label: str = "setting {pair!r}", example: str = "K=2") -> dict[str, str]:
    """``["K=2", "R=0.5"]`` -> ``{"K": "2", "R": "0.5"}``; a pair without ``=`` is
    refused with a message built from ``label`` and ``example``."""
    settings = {}
    for pair in pairs:
        if "=" not in pair:
            raise PruningConfigError(f"{label.format(pair=pair)} must look like NAME=VALUE, e.g. {example}")
        key, value = pair.split("=", 1)
        settings[key] = value
    return settings


def make_policy(method: str, arch: Arch, **raw_settings: Any) -> PruningPolicy:
    """Validate a method and its settings against a model's shape and build its policy.

    Every problem raises ``PruningConfigError`` naming the setting and the allowed values.
    """
    if method not in METHODS:
        raise PruningConfigError(
            f"unknown method {method!r}: allowed methods are {', '.join(METHODS)}"
        )
    policy_class = METHODS[method]
    known = {s.name: s for s in policy_class.settings}
    unknown = [name for name in raw_settings if name not in known]
    if unknown:
        takes = ", ".join(known) if known else "no settings"
        raise PruningConfigError(
            f"method {method!r} does not take setting {unknown[0]!r}; it takes: {takes}"
        )
    values = {}
    for name, setting in known.items():
        if name not in raw_settings or raw_settings[name] is None:
            values[name] = setting.default(arch)
            continue
        raw = raw_settings[name]
        try:
            values[name] = setting.parse(raw, arch)
        except PruningConfigError:
            raise
        except (ValueError, TypeError):
            depth_note = f" (this model has {arch.layers} decoder layers)" if "num_layers" in setting.allowed else ""
            allowed = setting.allowed.replace("num_layers-1", str(arch.layers - 1))
            raise PruningConfigError(
                f"{name}={raw!r} is not allowed for method {method!r}: {name} must be {allowed}{depth_note}"
            ) from None
    return policy_class(arch, values)
