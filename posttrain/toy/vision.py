"""A toy vision world: images of coloured shapes drawn locally, with the answer known.

Two tasks, each a question about one image with a one-word answer checked exactly:
- colour: one shape; "What colour is the shape?" -> "red".
- count:  one to four shapes of one colour; "How many shapes are there?" -> "3".

Rows come as chat rows (`messages`, the user turn holding an image part and a text part) for
sft, or as prompt rows (`prompt` plus `answer`) for rl and evaluate with an exact-answer reward.
The images are PNG files written next to the data, referenced by path from the image parts
(`{"type": "image", "path": ...}`), so the rows stay small JSON. Train and eval draw from
separate random streams of the same world (positions, sizes, shape kinds differ).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
SHAPES = ("square", "circle", "triangle")
QUESTIONS = {"colour": "What colour is the shape? Answer with one word.",
             "count": "How many shapes are there? Answer with one digit."}
_SPLIT_OFFSET = {"train": 0, "eval": 1_000_003}


def draw_shapes(colour: str, count: int, rng: random.Random, size: int = 32):
    """An RGB image, white background, `count` shapes of `colour` placed so that they do not overlap."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    cell = size // 2  # a 2 x 2 grid: up to four shapes, one per cell
    for slot in rng.sample(range(4), count):
        x0, y0 = (slot % 2) * cell, (slot // 2) * cell
        r = rng.randint(cell // 3, cell // 2 - 1)
        cx, cy = x0 + cell // 2, y0 + cell // 2
        box = [cx - r, cy - r, cx + r, cy + r]
        kind = rng.choice(SHAPES)
        if kind == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        elif kind == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
    return image


def generate_vision(task: Literal["colour", "count"], n: int, image_dir: str | Path, seed: int = 0,
                    split: Literal["train", "eval"] = "train", fmt: Literal["chat", "prompt"] = "chat",
                    image_size: int = 32) -> list[dict]:
    """`n` rows of `task`, their images written as PNG files under `image_dir`."""
    if task not in QUESTIONS:
        raise ValueError(f"task: expected one of {', '.join(QUESTIONS)}, got {task!r}")
    if split not in _SPLIT_OFFSET:
        raise ValueError(f"split: expected train or eval, got {split!r}")
    rng = random.Random(seed + _SPLIT_OFFSET[split])
    out_dir = Path(image_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour = rng.choice(sorted(COLOURS))
        count = 1 if task == "colour" else rng.randint(1, 4)
        answer = colour if task == "colour" else str(count)
        path = out_dir / f"{task}_{split}_{seed}_{i}.png"
        draw_shapes(colour, count, rng, image_size).save(path)
        user = {"role": "user", "content": [{"type": "image", "path": str(path)},
                                            {"type": "text", "text": QUESTIONS[task]}]}
        if fmt == "chat":
            rows.append({"messages": [user, {"role": "assistant", "content": answer}]})
        else:
            rows.append({"prompt": [user], "answer": answer})
    return rows


def exact_answer_reward(prompts, completions, answer, **_) -> list[float]:
    """1.0 when the completion's text, stripped and lower-cased, is the answer; else 0.0."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(t.strip().lower().rstrip(".") == str(a).lower()) for t, a in zip(texts, answer)]
