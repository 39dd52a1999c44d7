"""Image prompts for the loops that sample and score (rl, distill): token ids that carry their images.

The loops pass prompts around as token ids (`list[int]`): the engine samples from them, the learner
scores completions after them, distillation appends completions to them. A prompt with image parts
(a composite model's data, see posttrain.chat) becomes an `ImagePrompt`: its ids (each image already
expanded into the processor's soft tokens) as a list, so every path that takes ids takes it
unchanged, plus the image parts it was made from. Its pixel values are made when a forward needs
them, not kept: Gemma 3's processor makes 896 x 896 x 3 floats (9.6 MB) of each image, and a
prompt set holds thousands of images.

`image_forward_inputs` gives a batch's `pixel_values` (its rows' images, in row order, as the model
scatters them over the image tokens) and `token_type_ids` (1 on soft tokens, which attend to each
other both ways in Gemma 3): what the composite model's forward needs besides the ids.
"""

from __future__ import annotations

from typing import Any, Sequence

from posttrain.chat import (ChatFormatError, as_messages, has_image_parts, image_parts, is_blank, load_image,
                            text_view, tokenize_image_conversation)


class ImagePrompt(list):
    """A prompt's token ids (ints: the list itself) and the image parts its image tokens stand for."""

    def __init__(self, ids: Sequence[int], image_parts: list[dict], image_processor, image_token_id: int):
        super().__init__(ids)
        self.image_parts = image_parts
        self.image_processor = image_processor
        self.image_token_id = image_token_id

    def pixel_values(self, where: str = "prompt"):
        """The images as the model's input tensor [images, 3, H, W] (read and processed now)."""
        images = [load_image(part, f"{where}: image {i}") for i, part in enumerate(self.image_parts)]
        return self.image_processor(images, return_tensors="pt")["pixel_values"]

    @classmethod
    def of_conversation(cls, processor, ids: Sequence[int], messages: Sequence[dict]) -> "ImagePrompt":
        """The ids of `messages` (tokenised with `processor`) with the image parts of its turns, in order."""
        return cls(ids, image_parts(messages), processor.image_processor, processor.tokenizer.image_token_id)

    def __reduce__(self):  # pickled (a spawned worker, a gather) with its images, not as a plain list
        return (ImagePrompt, (list(self), self.image_parts, self.image_processor, self.image_token_id))


def prompt_has_images(prompt: Any) -> bool:
    """Whether a prompt (text, messages, token ids or an ImagePrompt) holds images."""
    if isinstance(prompt, ImagePrompt):
        return bool(prompt.image_parts)
    return isinstance(prompt, (list, tuple)) and has_image_parts(prompt)


def tokenize_image_prompt(processor, prompt: Any, where: str = "prompt") -> ImagePrompt:
    """A generation prompt with image parts as an ImagePrompt, tokenised as the transformers engine
    and the loops' scoring see it (posttrain.chat.tokenize_image_conversation, generation header
    appended). Each image is read once here, so a missing or unreadable file is an error naming
    the row when the data loads, not a failure mid-run."""
    messages = as_messages(prompt, where)
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        raise ChatFormatError(f"{where}: a generation prompt must end with a user turn")
    if is_blank(text_view(messages, where)) and not has_image_parts(messages):
        raise ChatFormatError(f"{where}: empty; a generation prompt needs text or an image to answer")
    conversation, _ = tokenize_image_conversation(processor, messages, add_generation_prompt=True, where=where)
    return ImagePrompt.of_conversation(processor, conversation.input_ids, messages)


def image_forward_inputs(prompts: Sequence, input_ids, dtype=None) -> dict:
    """`pixel_values` and `token_type_ids` for a batch whose row i starts with prompts[i] (rows
    sharing one ImagePrompt object, RL's n samples of a prompt, process its images once); empty
    when no prompt has images, so text batches run exactly as before. `dtype`: the vision tower's."""
    import torch

    with_images = [p for p in prompts if isinstance(p, ImagePrompt) and p.image_parts]
    if not with_images:
        return {}
    made: dict[int, Any] = {}
    pixels = []
    for i, p in enumerate(with_images):
        if id(p) not in made:
            made[id(p)] = p.pixel_values(f"prompts[{i}]")
        pixels.append(made[id(p)])
    pixel_values = torch.cat(pixels).to(device=input_ids.device, dtype=dtype or torch.float32)
    return {"pixel_values": pixel_values, "token_type_ids": (input_ids == with_images[0].image_token_id).long()}


# The key a recipe sets to generate image prompts, and the engine that can.
IMAGE_ENGINE_HINT = "set rollout.backend: transformers, the engine that generates from image prompts"


def refuse_image_prompts(prompts: Sequence, engine: str) -> None:
    """An engine that cannot take images (vLLM here: it serves a composite model's language model
    alone, see posttrain.rollout.vllm_engine) refuses image prompts rather than drop their images."""
    from posttrain.rollout.types import RolloutError

    if any(prompt_has_images(p) for p in prompts):
        raise RolloutError(f"generate: a prompt holds images, and the {engine} engine generates from text alone "
                           f"(it serves a composite model's language model); {IMAGE_ENGINE_HINT}")


def vision_dtype(model):
    """The dtype pixel values enter the model's vision tower in (its parameters')."""
    from posttrain.modeling import image_text_model

    return next(image_text_model(model).vision_tower.parameters()).dtype
