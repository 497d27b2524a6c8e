from PIL import Image, ImageDraw

CANVAS = 168


def doc_to_visual(doc):
    """A square of the doc's colour on a grey background, at the doc's position."""
    image = Image.new("RGB", (CANVAS, CANVAS), (128, 128, 128))
    x, y, size = doc["x"], doc["y"], doc["size"]
    ImageDraw.Draw(image).rectangle([x, y, x + size, y + size], fill=doc["answer"])
    return [image]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {"pre_prompt": "", "post_prompt": ""}
    return f"{kwargs['pre_prompt']}{doc['question']}{kwargs['post_prompt']}"
