"""A tiny random-weight LLaVA-1.5-shaped model with an offline tokenizer and processor.

Used by the tests and by the smoke task: it exercises every code path of the real
architecture (CLIP tower, two-layer GELU projector, Llama decoder with grouped-query
attention, the LLaVA processor's image-token expansion) in well under a second, with
nothing downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers, decoders
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from ..prompts import IMAGE_PLACEHOLDER, SYSTEM_PROMPT

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_PLACEHOLDER]
_BASE_CORPUS = [
    SYSTEM_PROMPT,
    "USER: ASSISTANT: What is the colour of the square? Answer the question using a single word or phrase.",
    "Provide a one-sentence caption for the provided image. A red circle and a blue square on a white background.",
    "Is there a green triangle in the image? yes no How many shapes are there? one two three four left right above below",
]


def build_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in-process, Llama-style specials (BOS added)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return llava_tokenizer(tokenizer)


def llava_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """``tokenizer`` with LLaVA-1.5's special tokens, padding on the left for generation."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_PLACEHOLDER},
        padding_side="left",
    )


def build_processor(tokenizer, image_size: int, patch_size: int) -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
    )


def build_llava(
    tokenizer,
    *,
    image_size: int,
    patch_size: int,
    vision: dict,
    text: dict,
    init_range: float = 0.02,
    seed: int = 0,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random-weight LLaVA-1.5-architecture model and its processor.

    ``vision`` sizes the CLIP tower (hidden_size, intermediate_size, num_hidden_layers,
    num_attention_heads) and ``text`` the Llama decoder (the same plus
    num_key_value_heads). The projector is LLaVA-1.5's two-layer GELU MLP; the features
    are the tower's penultimate layer without the class token, as in LLaVA-1.5.
    """
    processor = build_processor(tokenizer, image_size, patch_size)
    vision_config = CLIPVisionConfig(**vision, image_size=image_size, patch_size=patch_size, projection_dim=vision["hidden_size"])
    text_config = LlamaConfig(
        **text,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        initializer_range=init_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        initializer_range=init_range,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, processor


def build_tiny_llava(
    *,
    image_size: int = 112,
    patch_size: int = 14,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    init_range: float = 0.1,
    seed: int = 0,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random-weight LLaVA-1.5-shaped model, (image_size/patch_size)^2 image tokens.

    ``init_range`` is larger than the usual 0.02 so that attention is peaked and
    rankings of image tokens are clear-cut, as in a trained model.
    """
    return build_llava(
        build_tokenizer(_BASE_CORPUS, vocab_size=400),
        image_size=image_size,
        patch_size=patch_size,
        vision={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
        text={
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads,
        },
        init_range=init_range,
        seed=seed,
    )


def save_tiny_llava(out_dir: str | Path, **kwargs) -> Path:
    out_dir = Path(out_dir)
    model, processor = build_tiny_llava(**kwargs)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
