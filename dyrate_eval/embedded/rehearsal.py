"""The paper's grid rehearsed offline: a checkpoint in the llava-hf LLaVA-1.5 layout and
mini versions of the paper's nine benchmarks, placed where a real run would have them
after its downloads.

A real run (``./run_all.sh --paper``) loads ``llava-hf/llava-1.5-7b-hf`` and lets
lmms-eval's own tasks download their data sets into the Hugging Face datasets cache. The
rehearsal writes both states itself: a model folder with LLaVA-1.5's processor, special
tokens, ids and chat template, and a private ``HF_HOME`` whose datasets cache holds each
benchmark under the hub name, configuration and split its task reads, in the columns its
``process_docs``, prompts and ``process_results`` use. With ``HF_HUB_OFFLINE=1`` and that
``HF_HOME``, lmms-eval's task definitions run unchanged, down to their dataset paths.

The model is the embedded one (``dyrate_eval/embedded_llava``) moved into LLaVA-1.5's
layout, so that its answers are short and its scores mean something: the vocabulary is
renumbered to LLaVA-1.5's ids (``<image>`` 32000, ``<pad>`` 32001, 32064 embedding
rows), the vision tower takes 336-pixel images in 14-pixel patches (576 image tokens; its
position embeddings interpolated from the 12 x 12 grid it was trained on) and the images
of the benchmarks are scenes of the shapes world. The tokenizer stays the embedded
model's byte-level BPE (Llama's SentencePiece vocabulary cannot be downloaded here).
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path

import torch

from ..embedded import EMBEDDED_MODEL_DIR
from ..prompts import IMAGE_PLACEHOLDER
from ..embedded.tasks import CAPTION_PROMPT
from ..embedded.world import COLOURS, LETTERS, SHAPES, Scene, captions, mcq_questions, pope_questions, render, sample_scene, short_questions

REHEARSAL_SEED = 2  # the embedded model trains on world seed 0 and is evaluated on seed 1
# LLaVA-1.5's ids and image geometry (llava-hf/llava-1.5-7b-hf)
IMAGE_TOKEN_ID = 32000
PAD_TOKEN_ID = 32001
VOCAB_ROWS = 32064
IMAGE_SIZE = 336
PATCH_SIZE = 14
# LLaVA-1.5's conversation format as a chat template (the processor's, for users who
# call apply_chat_template; the wrappers write the same prompt with prompts.llava_prompt)
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'][0]['text'] + ' ' }}"
    "{% else %}{{ message['role'].upper() + ': ' }}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{{ ' ' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


# -- the checkpoint -------------------------------------------------------------------------


def _renumbered_tokenizer(source: Path):
    """The embedded tokenizer with LLaVA-1.5's ids: its own tokens keep their ids, the
    ids up to 32000 are filled with unused tokens, then ``<image>`` and ``<pad>``."""
    from tokenizers import Tokenizer

    from ..embedded.model import llava_tokenizer

    spec = json.loads((source / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    source_size = len(vocab)
    moved = {"<pad>": PAD_TOKEN_ID, IMAGE_PLACEHOLDER: IMAGE_TOKEN_ID}
    old_ids = {token: vocab.pop(token) for token in moved}
    for token_id in [*old_ids.values(), *range(source_size, IMAGE_TOKEN_ID)]:
        vocab[f"<unused{token_id}>"] = token_id
    vocab.update(moved)
    for added in spec["added_tokens"]:
        added["id"] = moved.get(added["content"], added["id"])
    tokenizer = llava_tokenizer(Tokenizer.from_str(json.dumps(spec)))
    return tokenizer, {old_ids[token]: new_id for token, new_id in moved.items()}


def _renumber_rows(weight: torch.Tensor, moved: dict[int, int]) -> torch.Tensor:
    """(VOCAB_ROWS, d): the source's rows at their new ids; every unused id gets the
    ``<unk>`` row, which the model never predicts."""
    rows = weight[0].expand(VOCAB_ROWS, -1).clone()
    rows[: weight.shape[0]] = weight
    for old_id, new_id in moved.items():
        rows[new_id] = weight[old_id]
        rows[old_id] = weight[0]
    return rows


def _interpolated_positions(weight: torch.Tensor, patches_per_side: int) -> torch.Tensor:
    """CLIP position embeddings (1 + g*g, d) resized to a ``patches_per_side`` grid."""
    grid = int((weight.shape[0] - 1) ** 0.5)
    patch_rows = weight[1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(patch_rows, size=(patches_per_side,) * 2, mode="bicubic", align_corners=False)
    return torch.cat([weight[:1], resized.permute(0, 2, 3, 1).reshape(patches_per_side**2, -1)])


def write_checkpoint(out: str | Path, source: str | Path = EMBEDDED_MODEL_DIR) -> Path:
    """Write the rehearsal checkpoint: a LLaVA-1.5 folder (config, safetensors weights,
    tokenizer, processor, chat template) holding the ``source`` model's weights."""
    from transformers import LlavaForConditionalGeneration

    from ..embedded.model import build_processor

    out, source = Path(out), Path(source)
    model = LlavaForConditionalGeneration.from_pretrained(source, dtype=torch.float32)
    tokenizer, moved = _renumbered_tokenizer(source)
    config = model.config
    config.image_token_id = IMAGE_TOKEN_ID
    config.image_seq_length = (IMAGE_SIZE // PATCH_SIZE) ** 2
    config.vision_config.image_size = IMAGE_SIZE
    config.text_config.vocab_size = VOCAB_ROWS
    config.text_config.pad_token_id = PAD_TOKEN_ID
    state = model.state_dict()
    for name, weight in state.items():
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            state[name] = _renumber_rows(weight, moved)
        elif name.endswith("position_embedding.weight"):
            state[name] = _interpolated_positions(weight, IMAGE_SIZE // PATCH_SIZE)
    rehearsal = LlavaForConditionalGeneration(config)
    rehearsal.load_state_dict(state)
    rehearsal.generation_config.pad_token_id = PAD_TOKEN_ID
    rehearsal.to(torch.float16).save_pretrained(out)
    processor = build_processor(tokenizer, IMAGE_SIZE, PATCH_SIZE)
    processor.chat_template = CHAT_TEMPLATE
    processor.save_pretrained(out)
    return out


# -- the mini benchmarks ---------------------------------------------------------------------


def _scenes(first: int, count: int) -> list[Scene]:
    return [sample_scene(scene_id, REHEARSAL_SEED) for scene_id in range(first, first + count)]


def _image(scene: Scene):
    return render(scene)[0]


def _short_question(scene: Scene, salt: str) -> dict:
    return short_questions(scene, random.Random(f"{salt}:{scene.scene_id}"))[0]


def _gqa(count: int) -> dict[str, list[dict]]:
    """GQA: instructions and images in two configurations joined by imageId (the task's
    process_docs reads the images' configuration from the hub by name)."""
    scenes = _scenes(0, count)
    instructions = []
    for scene in scenes:
        item = _short_question(scene, "gqa")
        instructions.append({"id": f"r{scene.scene_id}", "imageId": f"img{scene.scene_id}", "question": item["question"],
                             "answer": item["answer"], "fullAnswer": item["answer"]})
    images = [{"id": f"img{scene.scene_id}", "image": _image(scene)} for scene in scenes]
    return {"testdev_balanced_instructions": instructions, "testdev_balanced_images": images}


def _ten_answers(answer: str) -> list[str]:
    """VizWiz and TextVQA give ten human answers per question."""
    return [answer] * 10


def _vizwiz(count: int) -> list[dict]:
    rows = []
    for scene in _scenes(1000, count):
        item = _short_question(scene, "vizwiz")
        rows.append({"question_id": f"VizWiz_val_{scene.scene_id:08d}.jpg", "image": _image(scene),
                     "question": item["question"], "answers": _ten_answers(item["answer"]), "category": "other"})
    return rows


def _textvqa(count: int) -> list[dict]:
    rows = []
    for scene in _scenes(2000, count):
        item = _short_question(scene, "textvqa")
        rows.append({"question_id": scene.scene_id, "image_id": f"t{scene.scene_id}", "image": _image(scene),
                     "question": item["question"], "answers": _ten_answers(item["answer"]), "ocr_tokens": []})
    return rows


def _scienceqa(count: int) -> list[dict]:
    rows = []
    for scene in _scenes(3000, count):
        item = mcq_questions(scene, random.Random(f"sqa:{scene.scene_id}"))[0]
        rows.append({"image": _image(scene), "question": item["question"].split("\n")[0], "choices": item["options"],
                     "answer": LETTERS.index(item["answer"]), "hint": "", "task": "closed choice",
                     "subject": "shapes", "category": item["kind"]})
    return rows


def _pope(count: int) -> list[dict]:
    rows = []
    for scene in _scenes(4000, (count + 1) // 2):
        questions = pope_questions(scene, random.Random(f"pope:{scene.scene_id}"), popular=[])
        image = _image(scene)
        for item in [q for q in questions if q["split"] == "random"][:2]:
            rows.append({"question_id": str(len(rows)), "question": item["question"], "answer": item["answer"],
                         "image": image, "image_source": f"p{scene.scene_id}", "category": "random"})
    return rows[:count]


def _mmbench(count: int) -> list[dict]:
    rows = []
    for index, scene in enumerate(_scenes(5000, count)):
        item = mcq_questions(scene, random.Random(f"mmb:{scene.scene_id}"))[0]
        options = dict(zip(LETTERS, item["options"]))
        rows.append({"index": index, "question": item["question"].split("\n")[0], "hint": "nan", **options,
                     "answer": item["answer"], "category": f"{item['kind']}_recognition", "L2-category": "coarse_perception",
                     "source": "shapes", "split": "dev", "image": _image(scene)})
    return rows


def _mme(count: int) -> list[dict]:
    """MME: two yes/no questions per image (its aggregation asserts the pairs), perception
    and cognition categories alternating so that any even --limit holds both."""
    rows = []
    for scene in _scenes(6000, (count + 1) // 2):
        image, things = _image(scene), scene.things
        present = things[0]
        absent = next(f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in {t.name for t in things})
        if scene.scene_id % 2 == 0:
            category = "existence"
            pair = [(f"Is there a {present.name} in the image?", "Yes"), (f"Is there a {absent} in the image?", "No")]
        else:
            category = "numerical_calculation"
            pair = [(f"Is the number of shapes in the image plus one equal to {len(things) + 1}?", "Yes"),
                    (f"Is the number of shapes in the image plus one equal to {len(things) + 2}?", "No")]
        for question, answer in pair:
            rows.append({"question_id": f"{category}/{scene.scene_id}.png", "question": f"{question} Please answer yes or no.",
                         "answer": answer, "category": category, "image": image})
    return rows[: count + count % 2]


def _nocaps(count: int) -> list[dict]:
    return [{"image": _image(scene), "image_id": scene.scene_id, "image_file_name": f"{scene.scene_id}.jpg",
             "domain": "in-domain", "annotations_captions": captions(scene)} for scene in _scenes(7000, count)]


def _flickr30k(count: int) -> list[dict]:
    return [{"image": _image(scene), "img_id": str(scene.scene_id), "filename": f"{scene.scene_id}.jpg",
             "caption": captions(scene)} for scene in _scenes(8000, count)]


# lmms-eval task -> (hub data set, {configuration (None: default): rows}, split)
def _benchmarks(count: int) -> dict[str, tuple[str, dict, str]]:
    return {
        "gqa": ("lmms-lab-encoder/GQA", _gqa(count), "testdev"),
        "vizwiz_vqa_val": ("lmms-lab-encoder/VizWiz-VQA", {None: _vizwiz(count)}, "val"),
        "scienceqa_img": ("lmms-lab-encoder/ScienceQA", {"ScienceQA-IMG": _scienceqa(count)}, "test"),
        "textvqa_val": ("lmms-lab-encoder/textvqa", {None: _textvqa(count)}, "validation"),
        "pope": ("lmms-lab-encoder/POPE", {None: _pope(count)}, "test"),
        "mmbench_en_dev": ("lmms-lab-encoder/MMBench", {"en": _mmbench(count)}, "dev"),
        "mme": ("lmms-lab-encoder/MME", {None: _mme(count)}, "test"),
        "nocaps_val": ("lmms-lab-encoder/NoCaps", {None: _nocaps(count)}, "validation"),
        "flickr30k_test": ("lmms-lab-encoder/flickr30k", {None: _flickr30k(count)}, "test"),
    }


def _cache_as_downloaded(datasets_cache: Path, repo: str, configuration: str | None, split: str, rows: list[dict]) -> None:
    """Write ``rows`` into the datasets cache as ``load_dataset(repo, configuration,
    split=split)`` leaves them after a download, which offline mode then loads."""
    from datasets import Dataset
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.parquet.parquet import Parquet

    namespace, name = repo.split("/")
    name = camelcase_to_snakecase(name)  # how the cache spells a hub name (NoCaps: no_caps)
    configuration = configuration or "default"
    with tempfile.TemporaryDirectory() as work:
        data = Path(work) / f"{split}.parquet"
        Dataset.from_list(rows).to_parquet(str(data))
        builder = Parquet(cache_dir=work, dataset_name=name, config_name=configuration,
                          data_files={split: [str(data)]}, hash="rehearsal")
        builder.download_and_prepare()
        target = datasets_cache / f"{namespace}___{name}" / configuration / "0.0.0" / "rehearsal"
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(builder.cache_dir, target)


def write_benchmarks(hf_home: str | Path, docs: int) -> dict[str, int]:
    """The nine mini benchmarks, ``docs`` items each, in ``HF_HOME``'s datasets cache
    (with images encoded by ``datasets``' Image feature, as on the hub); returns the
    number of items per task."""
    datasets_cache = Path(hf_home) / "datasets"
    written = {}
    for task, (repo, configurations, split) in _benchmarks(docs).items():
        for configuration, rows in configurations.items():
            _cache_as_downloaded(datasets_cache, repo, configuration, split, rows)
        written[task] = len(next(iter(configurations.values())))
    return written


def write_caption_training_data(out: str | Path, count: int) -> Path:
    """Captions of other scenes as the JSON-lines file ``train-predictor --data`` reads:
    DyRate's predictor for the rehearsal checkpoint is trained on them."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for scene in _scenes(9000, count):
        name = f"images/{scene.scene_id}.png"
        _image(scene).save(out / name)
        lines.append(json.dumps({"image": name, "prompt": CAPTION_PROMPT, "answer": captions(scene)[0]}))
    data = out / "captions.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data
