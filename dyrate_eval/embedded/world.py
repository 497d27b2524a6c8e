"""A procedural world of coloured shapes: scenes, their images, captions and questions.

Everything is deterministic from a seed, so the embedded model's training data and its
held-out tasks can be regenerated exactly. A scene holds one to four objects, each a
(colour, shape, size) at a position, on a plain or textured background; no two objects
share both colour and shape, so every question names one object unambiguously.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

CANVAS = 168  # pixels: a 12 x 12 grid of 14-pixel patches
COLOURS = {
    "red": (215, 45, 45),
    "green": (50, 165, 60),
    "blue": (45, 85, 215),
    "yellow": (235, 205, 45),
    "purple": (135, 65, 175),
    "orange": (240, 135, 35),
    "pink": (240, 125, 190),
    "cyan": (45, 195, 205),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = {"small": 34, "large": 54}  # side of the bounding box, pixels
BACKGROUNDS = {"gray": (128, 128, 128), "black": (25, 25, 25), "white": (235, 235, 235), "brown": (110, 80, 55)}
TEXTURES = ("plain", "stripes", "checks", "noise")
NUMBERS = ("zero", "one", "two", "three", "four")
LETTERS = "ABCD"
MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    size: str
    x: int  # centre, pixels
    y: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def box(self) -> tuple[int, int, int, int]:
        half = SIZES[self.size] // 2
        return self.x - half, self.y - half, self.x + half, self.y + half


@dataclass(frozen=True)
class Scene:
    scene_id: int
    background: str
    texture: str
    things: tuple[Thing, ...]


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int = 6) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def sample_scene(scene_id: int, seed: int = 0) -> Scene:
    """Scene ``scene_id`` of the world drawn from ``seed`` (each scene has its own stream)."""
    rng = random.Random(f"{seed}:{scene_id}")
    count = rng.randint(1, 4)
    things: list[Thing] = []
    while len(things) < count:
        colour, shape, size = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(SIZES))
        if any(t.colour == colour and t.shape == shape for t in things):
            continue
        half = SIZES[size] // 2
        for _ in range(50):  # rejection sampling of a free spot
            thing = Thing(colour, shape, size, rng.randint(half + 2, CANVAS - half - 3), rng.randint(half + 2, CANVAS - half - 3))
            if not any(_overlaps(thing.box(), other.box()) for other in things):
                things.append(thing)
                break
        else:
            count -= 1  # no room left: a scene with fewer objects
    return Scene(scene_id, rng.choice(list(BACKGROUNDS)), rng.choice(TEXTURES), tuple(things))


def _background(scene: Scene) -> Image.Image:
    base = np.array(BACKGROUNDS[scene.background], dtype=np.int16)
    pixels = np.broadcast_to(base, (CANVAS, CANVAS, 3)).copy()
    yy, xx = np.mgrid[0:CANVAS, 0:CANVAS]
    if scene.texture == "stripes":
        pixels[(xx // 8) % 2 == 0] += 22
    elif scene.texture == "checks":
        pixels[((xx // 14) + (yy // 14)) % 2 == 0] += 22
    elif scene.texture == "noise":
        pixels += np.random.default_rng(scene.scene_id).integers(-18, 19, size=pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _draw(draw: ImageDraw.ImageDraw, thing: Thing, fill) -> None:
    x0, y0, x1, y1 = thing.box()
    if thing.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif thing.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif thing.shape == "triangle":
        draw.polygon([(thing.x, y0), (x1, y1), (x0, y1)], fill=fill)
    elif thing.shape == "diamond":
        draw.polygon([(thing.x, y0), (x1, thing.y), (thing.x, y1), (x0, thing.y)], fill=fill)
    elif thing.shape == "cross":
        arm = (x1 - x0) // 6
        draw.rectangle((thing.x - arm, y0, thing.x + arm, y1), fill=fill)
        draw.rectangle((x0, thing.y - arm, x1, thing.y + arm), fill=fill)


def render(scene: Scene) -> tuple[Image.Image, np.ndarray]:
    """The scene's image and its object mask: (CANVAS, CANVAS) ints, 0 for background,
    i + 1 where object i is drawn."""
    image = _background(scene)
    mask_image = Image.new("L", (CANVAS, CANVAS), 0)
    draw, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask_image)
    for index, thing in enumerate(scene.things):
        _draw(draw, thing, COLOURS[thing.colour])
        _draw(draw_mask, thing, index + 1)
    return image, np.array(mask_image)


def _listing(things) -> str:
    names = [f"a {t.size} {t.name}" for t in things]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _horizontal(a: Thing, b: Thing) -> str | None:
    """'left' or 'right' when a is clearly beside b, else None."""
    if abs(a.x - b.x) < 20:
        return None
    return "left" if a.x < b.x else "right"


def _vertical(a: Thing, b: Thing) -> str | None:
    if abs(a.y - b.y) < 20:
        return None
    return "above" if a.y < b.y else "below"


def background_phrase(scene: Scene) -> str:
    return f"{scene.background} background" if scene.texture == "plain" else f"{scene.background} {scene.texture} background"


def captions(scene: Scene) -> list[str]:
    """Several reference captions in different phrasings, as caption benchmarks have."""
    things = sorted(scene.things, key=lambda t: t.x)
    count = NUMBERS[len(things)]
    plural = "shape" if len(things) == 1 else "shapes"
    background = background_phrase(scene)
    result = [
        f"{_listing(things)} on a {background}.",
        f"there {'is' if len(things) == 1 else 'are'} {count} {plural} on a {background}: {_listing(things)}.",
        f"a {background} with {_listing(things)}.",
        f"an image of {count} {plural}, {_listing(things)}, from left to right.",
    ]
    if len(things) >= 2:
        side = _horizontal(things[0], things[-1])
        if side:
            result.append(f"a {things[0].name} to the {side} of a {things[-1].name} on a {background}.")
    return [text[0].upper() + text[1:] for text in result]


_OBJECT_MENTION = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")
# the one reference phrasing that names two objects whatever the scene holds
_RELATION = re.compile(r"\bto the (?:left|right) of\b")


def caption_content(scene: Scene, caption: str) -> dict:
    """What a caption says right about its scene, read with the world's vocabulary.

    ``count_error``: objects mentioned minus objects in the scene (None for the
    "X to the left of Y" phrasing, which names two whatever the scene holds);
    ``objects_recalled``: the share of the scene's objects the caption names (colour and
    shape; a caption naming one object three times recalls one); ``wrong_objects``: the
    distinct objects named that the scene does not hold; ``background_right``: whether
    it names the background's colour and texture (None when it names no background)."""
    text = caption.lower()
    mentions = _OBJECT_MENTION.findall(text)
    named, present = set(mentions), {(thing.colour, thing.shape) for thing in scene.things}
    return {
        "count_error": None if _RELATION.search(text) else len(mentions) - len(present),
        "objects_recalled": len(named & present) / len(present),
        "wrong_objects": len(named - present),
        "background_right": bool(re.search(rf"\b{background_phrase(scene)}\b", text)) if "background" in text else None,
    }


def short_questions(scene: Scene, rng: random.Random) -> list[dict]:
    """Short-answer questions: colour, shape, count and relative position."""
    things = scene.things
    shape_counts = Counter(t.shape for t in things)
    colour_counts = Counter(t.colour for t in things)
    questions = [{"kind": "count", "question": "How many shapes are there in the image?", "answer": NUMBERS[len(things)]}]
    for thing in things:
        if shape_counts[thing.shape] == 1:
            questions.append({"kind": "colour", "question": f"What colour is the {thing.shape}?", "answer": thing.colour})
        if colour_counts[thing.colour] == 1:
            questions.append({"kind": "shape", "question": f"What shape is the {thing.colour} object?", "answer": thing.shape})
    for a in things:
        for b in things:
            if a is b:
                continue
            side, level = _horizontal(a, b), _vertical(a, b)
            if side:
                questions.append({"kind": "position", "question": f"Is the {a.name} to the left or to the right of the {b.name}?", "answer": side})
            if level:
                questions.append({"kind": "position", "question": f"Is the {a.name} above or below the {b.name}?", "answer": level})
    rng.shuffle(questions)
    return questions


def pope_questions(scene: Scene, rng: random.Random, popular: list[str]) -> list[dict]:
    """Yes/no object questions, POPE-style: every object present is asked about once per
    split, with as many absent objects drawn at random, by frequency (``popular``, most
    frequent object names first) and adversarially (same colour or same shape as a
    present object)."""
    present = {t.name for t in scene.things}
    absent = [f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in present]
    near = [name for name in absent if any(name.split()[0] == t.colour or name.split()[1] == t.shape for t in scene.things)]
    negatives = {
        "random": rng.sample(absent, len(present)),
        "popular": [name for name in popular if name not in present][: len(present)],
        "adversarial": rng.sample(near, min(len(present), len(near))),
    }
    questions = []
    for split, names in negatives.items():
        asked = [(name, "yes") for name in sorted(present)] + [(name, "no") for name in names]
        rng.shuffle(asked)
        questions += [{"split": split, "object": name, "question": f"Is there a {name} in the image?", "answer": answer} for name, answer in asked]
    return questions


def mcq_questions(scene: Scene, rng: random.Random) -> list[dict]:
    """Multiple choice with four lettered options (colour, shape or count)."""
    questions = []
    for item in short_questions(scene, rng):
        if item["kind"] == "position":
            continue
        pool = {"colour": list(COLOURS), "shape": list(SHAPES), "count": list(NUMBERS[1:])}[item["kind"]]
        options = [item["answer"]] + rng.sample([o for o in pool if o != item["answer"]], 3)
        rng.shuffle(options)
        lines = "\n".join(f"{letter}. {option}" for letter, option in zip(LETTERS, options))
        questions.append({
            "kind": item["kind"],
            "question": f"{item['question']}\n{lines}\n{MCQ_INSTRUCTION}",
            "options": options,
            "answer": LETTERS[options.index(item["answer"])],
        })
    return questions


def object_frequencies(scene_ids, seed: int = 0) -> list[str]:
    """Object names by how often they occur in the given scenes, most frequent first."""
    counts = Counter(t.name for scene_id in scene_ids for t in sample_scene(scene_id, seed).things)
    return [name for name, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]
