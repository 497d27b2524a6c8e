import os
from importlib import metadata

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from PIL import Image

from dyrate_eval.prompts import llava_prompt
from dyrate_eval.embedded.model import save_tiny_llava


def pytest_report_header(config):
    import transformers  # the one that imports: check_versions.sh may lay another over the installed one

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "lmms-eval": metadata.version("lmms-eval")}
    return "dyrate-eval tested on " + ", ".join(f"{name} {version}" for name, version in versions.items())


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random-weight LLaVA saved as a standard HF folder (4 layers, 64 image tokens)."""
    return save_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="session")
def processor(tiny_dir):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(tiny_dir)
    proc.tokenizer.padding_side = "left"
    return proc


def load_model(tiny_dir, attn="sdpa"):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(tiny_dir, attn_implementation=attn).eval()


@pytest.fixture
def model(tiny_dir):
    return load_model(tiny_dir)


def make_image(seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(96, 96, 3, generator=generator) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


QUESTIONS = [
    "What is the colour of the square?",
    "Provide a one-sentence caption for the provided image. Is there a green triangle in the image?",
]


@pytest.fixture
def make_inputs(processor):
    def build(indices=(0,)):
        return processor(
            images=[make_image(i) for i in indices],
            text=[llava_prompt(QUESTIONS[i % len(QUESTIONS)]) for i in indices],
            return_tensors="pt",
            padding=True,
        )

    return build
