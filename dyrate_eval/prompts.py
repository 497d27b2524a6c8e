"""LLaVA-1.5's conversation format (the ``vicuna_v1`` template of the original LLaVA
code, which FastV, VTW and DyRate evaluated with)."""

IMAGE_PLACEHOLDER = "<image>"
SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def llava_prompt(question: str, num_images: int = 1) -> str:
    """One user turn with its images in front, ending where the assistant answers."""
    if IMAGE_PLACEHOLDER not in question and num_images:
        question = "\n".join([IMAGE_PLACEHOLDER] * num_images + [question])
    return f"{SYSTEM_PROMPT} USER: {question} ASSISTANT:"
