"""Recipe text the tests share: the head of a recipe on the tiny student model most tests train."""

from __future__ import annotations

# A tiny Gemma3 student (head_dim 32, as vLLM's CPU attention needs).
TINY_STUDENT = "{tiny: {arch: gemma3, hidden_size: 64, num_heads: 2, num_kv_heads: 1, intermediate_size: 128}}"


def recipe_header(name: str, datasets: dict[str, str], models: dict[str, str] | None = None) -> str:
    """`name`, `output_dir: run`, `seed: 0`, the models (by default the tiny student alone), the
    datasets (name -> YAML flow text) and the `stages:` key, for a test to append its stages to."""
    models = models if models is not None else {"student": TINY_STUDENT}
    lines = [f"name: {name}", "output_dir: run", "seed: 0", "models:"]
    lines += [f"  {key}: {value}" for key, value in models.items()]
    lines += ["datasets:"] + [f"  {key}: {value}" for key, value in datasets.items()] + ["stages:"]
    return "\n".join(lines) + "\n"
