"""The embedded tasks' data: held-out scenes of the procedural world, written as the
JSON-lines files that the lmms-eval tasks in ``tasks/shapes`` read.

Evaluation scenes are drawn with ``EVAL_SEED``; the embedded model trains on scenes of
another seed, so no held-out scene is seen in training. Images are not stored: each doc
carries its scene, and the task renders it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..embedded.world import Scene, Thing, captions, mcq_questions, object_frequencies, pope_questions, sample_scene, short_questions

EVAL_SEED = 1
# Scene id ranges per task (disjoint, so the tasks do not share images).
SCENE_RANGES = {
    "caption": range(0, 200),
    "vqa": range(1000, 1300),
    "pope": range(2000, 2150),  # two questions per scene: 300 questions
    "mcq": range(3000, 3300),
}
VQA_KINDS = ("colour", "shape", "count", "position")
# Prompts of the tasks (the YAML files repeat the post-prompt; a test keeps them equal).
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
SHORT_ANSWER_POST_PROMPT = "\nAnswer the question using a single word or phrase."


def scene_record(scene: Scene) -> dict:
    return {
        "scene_id": scene.scene_id,
        "background": scene.background,
        "texture": scene.texture,
        "things": [{"colour": t.colour, "shape": t.shape, "size": t.size, "x": t.x, "y": t.y} for t in scene.things],
    }


def scene_from_doc(doc: dict) -> Scene:
    things = tuple(Thing(t["colour"], t["shape"], t["size"], int(t["x"]), int(t["y"])) for t in doc["things"])
    return Scene(int(doc["scene_id"]), doc["background"], doc["texture"], things)


def _caption_docs():
    for doc_id, scene_id in enumerate(SCENE_RANGES["caption"]):
        scene = sample_scene(scene_id, EVAL_SEED)
        yield {"doc_id": doc_id, **scene_record(scene), "captions": captions(scene)}


def _vqa_docs():
    for doc_id, scene_id in enumerate(SCENE_RANGES["vqa"]):
        scene = sample_scene(scene_id, EVAL_SEED)
        rng = random.Random(f"vqa:{scene_id}")
        questions = short_questions(scene, rng)
        wanted = VQA_KINDS[doc_id % len(VQA_KINDS)]  # balance the question kinds
        item = next((q for q in questions if q["kind"] == wanted), questions[0])
        yield {"doc_id": doc_id, **scene_record(scene), **item}


def _pope_docs():
    popular = object_frequencies(range(2000), EVAL_SEED)
    splits = ("random", "popular", "adversarial")
    doc_id = 0
    for index, scene_id in enumerate(SCENE_RANGES["pope"]):
        scene = sample_scene(scene_id, EVAL_SEED)
        rng = random.Random(f"pope:{scene_id}")
        split = splits[index % len(splits)]
        items = [q for q in pope_questions(scene, rng, popular) if q["split"] == split]
        for answer in ("yes", "no"):  # one of each: balanced like POPE
            item = next((q for q in items if q["answer"] == answer), None)
            if item is not None:
                yield {"doc_id": doc_id, **scene_record(scene), **item}
                doc_id += 1


def _mcq_docs():
    for doc_id, scene_id in enumerate(SCENE_RANGES["mcq"]):
        scene = sample_scene(scene_id, EVAL_SEED)
        rng = random.Random(f"mcq:{scene_id}")
        item = rng.choice(mcq_questions(scene, rng))
        yield {"doc_id": doc_id, **scene_record(scene), **item}


BUILDERS = {"caption": _caption_docs, "vqa": _vqa_docs, "pope": _pope_docs, "mcq": _mcq_docs}


def write_task_data(out_dir: str | Path) -> dict[str, int]:
    """Write ``<task>.jsonl`` for every embedded task; returns the item counts."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, build in BUILDERS.items():
        docs = list(build())
        (out_dir / f"{name}.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        counts[name] = len(docs)
    return counts
