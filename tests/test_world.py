"""The procedural world: deterministic, and every answer agrees with what is drawn."""

import random

import numpy as np

from dyrate_eval.embedded.world import (
    COLOURS, LETTERS, Scene, Thing, caption_content, captions, mcq_questions, object_frequencies, pope_questions, render,
    sample_scene, short_questions,
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


def test_caption_content_reads_the_references_as_right():
    for scene_id in SCENES:
        scene = sample_scene(scene_id)
        for caption in captions(scene)[:3]:  # the listing phrasings
            assert caption_content(scene, caption) == {"count_error": 0, "objects_recalled": 1.0, "wrong_objects": 0, "background_right": True}
        # "an image of N shapes, ..., from left to right" names no background
        assert caption_content(scene, captions(scene)[3]) == {"count_error": 0, "objects_recalled": 1.0, "wrong_objects": 0, "background_right": None}
        for caption in captions(scene)[4:]:  # "X to the left of Y": no count read from it
            assert caption_content(scene, caption)["count_error"] is None


def test_caption_content_scores_what_a_caption_gets_wrong():
    things = (Thing("red", "circle", "small", 30, 30), Thing("blue", "square", "large", 90, 90), Thing("green", "cross", "small", 140, 40))
    scene = Scene(0, "black", "stripes", things)
    repeated = "A black stripes background with a small red circle, a small red circle, a small red circle and a large pink diamond."
    assert caption_content(scene, repeated) == {"count_error": 1, "objects_recalled": 1 / 3, "wrong_objects": 1, "background_right": True}
    # the plain background's phrase is not read inside the textured one's, nor the reverse
    assert not caption_content(scene, "A red circle on a black background.")["background_right"]
    plain = Scene(0, "black", "plain", things)
    assert not caption_content(plain, "A red circle on a black stripes background.")["background_right"]
    assert caption_content(plain, "A red circle on a black background.")["count_error"] == -2
