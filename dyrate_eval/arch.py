"""The dimensions of a LLaVA-1.5 model that pruning settings, FLOPs and benchmarks
depend on, read from a config or named (the published 7B / 13B shapes)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import PruningConfigError


@dataclass(frozen=True)
class Arch:
    """The dimensions FLOPs depend on."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    image_size: int
    patch_size: int
    vision_heads: int

    @property
    def vision_head_dim(self) -> int:
        return self.vision_hidden // self.vision_heads

    # LLaVA-1.5 reads every patch token (the class token is dropped before the projector)
    @property
    def n_img(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_config(cls, config, name: str) -> "Arch":
        text, vision = config.text_config, config.vision_config
        return cls(
            name=name,
            hidden=text.hidden_size,
            intermediate=text.intermediate_size,
            layers=text.num_hidden_layers,
            heads=text.num_attention_heads,
            kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            vocab=text.vocab_size,
            vision_hidden=vision.hidden_size,
            vision_intermediate=vision.intermediate_size,
            vision_layers=vision.num_hidden_layers,
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            vision_heads=vision.num_attention_heads,
        )

    def llava_config(self):
        """A LlavaConfig of this shape (for random-weight models; LLaVA's image token
        id sits 64 below the padded vocabulary's end, as in llava-hf's checkpoints)."""
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        vision = CLIPVisionConfig(
            hidden_size=self.vision_hidden,
            intermediate_size=self.vision_intermediate,
            num_hidden_layers=self.vision_layers,
            num_attention_heads=self.vision_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
        )
        text = LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=4096,
        )
        return LlavaConfig(vision_config=vision, text_config=text, image_token_id=self.vocab - 64, vision_feature_layer=-2)


# The published LLaVA-1.5 shapes: Vicuna-v1.5 (Llama-2) decoders, CLIP ViT-L/14 at 336 px.
_CLIP_L_336 = {"vision_hidden": 1024, "vision_intermediate": 4096, "vision_layers": 24, "image_size": 336, "patch_size": 14,
               "vision_heads": 16}
ARCHS = {
    "llava-1.5-7b": Arch("llava-1.5-7b", 4096, 11008, 32, 32, 32, 128, 32064, **_CLIP_L_336),
    "llava-1.5-13b": Arch("llava-1.5-13b", 5120, 13824, 40, 40, 40, 128, 32064, **_CLIP_L_336),
    # For timing on a CPU: the 7B's depth, head size and token counts (576 image tokens)
    # at a sixteenth of its width, so a sample takes seconds on 2 cores.
    "llava-1.5-7b-cpu": Arch(
        "llava-1.5-7b-cpu", 256, 688, 32, 2, 2, 128, 32064,
        vision_hidden=128, vision_intermediate=512, vision_layers=24, image_size=336, patch_size=14, vision_heads=2,
    ),
    # For timing on a CPU at the real width: the 7B's width, heads and 576 image tokens,
    # with 4 of its 32 decoder layers. Pruning changes per-layer costs, so ratios measured
    # at this width transfer; the vision tower keeps CLIP-L's width and is cut in depth by
    # the same factor (3 of 24 layers), so that its share of the work stays the 7B's.
    "llava-1.5-7b-4layers": Arch(
        "llava-1.5-7b-4layers", 4096, 11008, 4, 32, 32, 128, 32064,
        **{**_CLIP_L_336, "vision_layers": 3},
    ),
}


LLAVA_ALLOWED = "a LLaVA-1.5 checkpoint: a folder with its config.json (model_type 'llava') or a hub id such as llava-hf/llava-1.5-7b-hf"


def llava_config(pretrained: str | Path, setting: str = "pretrained"):
    """The config of a LLaVA checkpoint, read before any weights: a missing or empty
    folder, an id that cannot be found and another kind of model fail here with one
    message naming ``setting``."""
    from transformers import AutoConfig

    path = Path(pretrained)
    if path.is_dir() and not (path / "config.json").is_file():
        raise PruningConfigError(f"{setting}={pretrained} is not allowed: the folder holds no config.json; allowed is {LLAVA_ALLOWED}")
    if not path.exists() and (path.is_absolute() or str(pretrained).startswith(".") or str(pretrained).count("/") > 1):
        raise PruningConfigError(f"{setting}={pretrained} is not allowed: there is no such folder; allowed is {LLAVA_ALLOWED}")
    try:
        config = AutoConfig.from_pretrained(pretrained)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0]
        raise PruningConfigError(f"{setting}={pretrained} is not allowed: it cannot be read as a model ({reason}); allowed is {LLAVA_ALLOWED}") from None
    if config.model_type != "llava":
        raise PruningConfigError(f"{setting}={pretrained} is not allowed: it is a {config.model_type!r} model; allowed is {LLAVA_ALLOWED}")
    return config


def load_arch(name_or_path: str | Path) -> Arch:
    """A named shape (``llava-1.5-7b``, ``llava-1.5-13b``) or a model folder's config."""
    if str(name_or_path) in ARCHS:
        return ARCHS[str(name_or_path)]
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise PruningConfigError(
            f"--arch {name_or_path!r} is neither a known shape ({', '.join(ARCHS)}) nor a folder with a config.json"
        )
    return Arch.from_config(llava_config(path, "--arch"), name=str(path))
