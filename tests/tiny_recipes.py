"""Recipe text the tests share: the head of a recipe on the tiny student model most tests train,
and its stage entries, written as YAML text so that each test's recipe reads as the user's would."""

from __future__ import annotations

import json
from typing import Any

# A tiny Gemma3 student (head_dim 32, as vLLM's CPU attention needs).
TINY_STUDENT = "{tiny: {arch: gemma3, hidden_size: 64, num_heads: 2, num_kv_heads: 1, intermediate_size: 128}}"

# Greedy and short: the evaluation the end-to-end recipes run after a stage.
GREEDY_SAMPLING = {"temperature": 0.0, "max_new_tokens": 6}
TRANSFORMERS_ROLLOUT = {"backend": "transformers"}


def recipe_header(name: str, datasets: dict[str, str], models: dict[str, str] | None = None,
                  output_dir: str = "run") -> str:
    """`name`, `output_dir` (`run` by default), `seed: 0`, the models (by default the tiny student
    alone), the datasets (name -> YAML flow text) and the `stages:` key, for a test to append its
    stages to."""
    models = models if models is not None else {"student": TINY_STUDENT}
    lines = [f"name: {name}", f"output_dir: {output_dir}", "seed: 0", "models:"]
    lines += [f"  {key}: {value}" for key, value in models.items()]
    lines += ["datasets:"] + [f"  {key}: {value}" for key, value in datasets.items()] + ["stages:"]
    return "\n".join(lines) + "\n"


def stage(name: str, kind: str, **options: Any) -> str:
    """One item of the `stages:` list: `name`, `kind`, then each option on its own line, a list as a
    YAML sequence (one item a line) and a mapping in flow style. A string is written as given, so
    `${models.student}` and flow text such as `{toy: {...}}` stay what the test wrote."""
    lines = [f"  - name: {name}", f"    kind: {kind}"]
    for key, value in options.items():
        if isinstance(value, list):
            lines.append(f"    {key}:")
            lines += [f"      - {_flow(item)}" for item in value]
        else:
            lines.append(f"    {key}: {_flow(value)}")
    return "\n".join(lines) + "\n"


def sft_stage(model: str, dataset: str, name: str = "sft", **options: Any) -> str:
    """An sft stage training `model` on `dataset`."""
    return stage(name, "sft", model=model, dataset=dataset, **options)


def rl_on_math(model: str, dataset: str, name: str = "rl", **options: Any) -> str:
    """An rl stage on math prompts: rewarded by the math reward and generating with the transformers
    engine unless `options` say otherwise."""
    return stage(name, "rl", model=model, dataset=dataset,
                 **{"rewards": [{"name": "math"}], "rollout": TRANSFORMERS_ROLLOUT, **options})


def evaluate_stage(model: str, datasets: dict[str, str], name: str = "eval", **options: Any) -> str:
    """An evaluate stage scoring `model` on `datasets` (name -> `${...}` reference), greedy and short
    with the transformers engine unless `options` say otherwise."""
    return stage(name, "evaluate", model=model, datasets=datasets,
                 **{"rollout": TRANSFORMERS_ROLLOUT, "sampling": GREEDY_SAMPLING, **options})


def _flow(value: Any, nested: bool = False) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_flow(item, True)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(item, True) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        text = repr(value)
        # YAML 1.1 (PyYAML) reads `1e-05` as a string: a float needs a dot in its mantissa.
        mantissa, _, exponent = text.partition("e")
        return text if not exponent or "." in mantissa else f"{mantissa}.0e{exponent}"
    text = str(value)
    # Inside a flow collection `${...}` would open a mapping and `a:b` a key: quoted they stay strings.
    return json.dumps(text) if nested and any(mark in text for mark in "${}[]:,#") else text
