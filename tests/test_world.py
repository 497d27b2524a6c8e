"""The procedural world: deterministic, and every answer agrees with what is drawn."""

import random

import numpy as np

from dyrate_eval.world import (
    COLOURS, LETTERS, captions, mcq_questions, object_frequencies, pope_questions, render, sample_scene, short_questions,
)

SCENES = range(60)


def test_same_seed_same_scene_and_image():
    for scene_id in (0, 7, 41):
        first, second = sample_scene(scene_id, seed=3), sample_scene(scene_id, seed=3)
        assert first == second
        assert np.array_equal(np.array(render(first)[0]), np.array(render(second)[0]))
    assert [sample_scene(i, seed=1) for i in SCENES] != [sample_scene(i, seed=2) for i in SCENES]


def test_objects_are_drawn_in_their_colour_and_unambiguous():
    counts = set()
    for scene_id in SCENES:
        scene = sample_scene(scene_id)
        counts.add(len(scene.things))
        assert len({thing.name for thing in scene.things}) == len(scene.things)
        image, mask = render(scene)
        pixels = np.array(image)
        for index, thing in enumerate(scene.things):
            drawn = pixels[mask == index + 1]
            assert len(drawn) > 100, f"scene {scene_id}: {thing.name} is hidden"
            assert (drawn == COLOURS[thing.colour]).all(axis=1).mean() == 1.0
    assert counts == {1, 2, 3, 4}


def test_short_answers_follow_the_scene():
    for scene_id in SCENES:
        scene = sample_scene(scene_id)
        for item in short_questions(scene, random.Random(scene_id)):
            words = item["question"].rstrip("?").split()
            if item["kind"] == "colour":
                assert item["answer"] == next(t.colour for t in scene.things if t.shape == words[-1])
            elif item["kind"] == "shape":
                assert item["answer"] == next(t.shape for t in scene.things if t.colour == words[-2])
            elif item["kind"] == "position" and "left" in words:
                a = next(t for t in scene.things if t.name == " ".join(words[2:4]))
                b = next(t for t in scene.things if t.name == " ".join(words[-2:]))
                assert (item["answer"] == "left") == (a.x < b.x)


def test_pope_negatives_are_absent_and_balanced():
    popular = object_frequencies(range(200))
    for scene_id in SCENES:
        scene = sample_scene(scene_id)
        present = {thing.name for thing in scene.things}
        questions = pope_questions(scene, random.Random(scene_id), popular)
        for split in ("random", "popular", "adversarial"):
            items = [q for q in questions if q["split"] == split]
            assert all((q["object"] in present) == (q["answer"] == "yes") for q in items)
            assert sum(q["answer"] == "yes" for q in items) == len(present)
        for q in questions:
            if q["split"] == "adversarial" and q["answer"] == "no":
                colour, shape = q["object"].split()
                assert any(t.colour == colour or t.shape == shape for t in scene.things)


def test_mcq_letter_points_at_the_true_answer():
    for scene_id in SCENES:
        scene = sample_scene(scene_id)
        for item in mcq_questions(scene, random.Random(scene_id)):
            chosen = item["options"][LETTERS.index(item["answer"])]
            assert len(set(item["options"])) == 4
            if item["kind"] == "colour":
                shape = item["question"].split("?")[0].split()[-1]
                assert chosen == next(t.colour for t in scene.things if t.shape == shape)


def test_captions_name_every_object():
    for scene_id in SCENES:
        scene = sample_scene(scene_id)
        references = captions(scene)
        assert len(references) >= 4
        for thing in scene.things:
            assert all(thing.name in caption.replace("small ", "").replace("large ", "") for caption in references[:4])
