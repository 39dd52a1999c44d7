"""Tiny models of real architectures (Gemma3, Llama, Qwen2), built from configs.

These stand in for pretrained checkpoints in the embedded default and in tests. head_dim stays
at 32 or more because vLLM's CPU attention refuses smaller heads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ARCHITECTURES = ("gemma3", "llama", "qwen2")


class TinyModelSpec(BaseModel):
    """A tiny model built locally from a config (no download)."""

    model_config = ConfigDict(extra="forbid")

    arch: Literal["gemma3", "llama", "qwen2"] = Field("gemma3", description="Architecture family.")
    hidden_size: int = Field(128, ge=32, description="Width of the residual stream.")
    num_layers: int = Field(2, ge=1, description="Number of decoder layers.")
    num_heads: int = Field(4, ge=1, description="Attention heads; hidden_size / num_heads is not required to equal head_dim.")
    num_kv_heads: int = Field(2, ge=1, description="Key/value heads (grouped-query attention).")
    head_dim: int = Field(32, ge=32, description="Per-head width; vLLM's CPU backend needs at least 32.")
    intermediate_size: int = Field(256, ge=8, description="MLP width.")
    max_position_embeddings: int = Field(512, ge=64, description="Context length.")
    vocab_size: int = Field(768, ge=300, description="Tokenizer vocabulary trained for the toy world.")
    head: Literal["causal_lm", "sequence_classification"] = Field(
        "causal_lm", description="causal_lm for policies, sequence_classification (one label) for reward models.")
    seed: int = Field(0, description="Initialisation seed.")


def _config(spec: TinyModelSpec, tokenizer):
    common = dict(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    if spec.head == "sequence_classification":
        common["num_labels"] = 1
    if spec.arch == "gemma3":
        from transformers import Gemma3TextConfig
        return Gemma3TextConfig(**common, query_pre_attn_scalar=spec.head_dim, sliding_window=128,
                                rope_parameters=None)
    if spec.arch == "llama":
        from transformers import LlamaConfig
        return LlamaConfig(**common)
    from transformers import Qwen2Config
    return Qwen2Config(**common)


def build_tiny_model(spec: TinyModelSpec, tokenizer, out_dir: str | Path | None = None):
    """Instantiate a randomly initialised tiny model; save it with the tokenizer if `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = _config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    if spec.head == "causal_lm":
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = AutoModelForSequenceClassification.from_config(config)
    model = model.to(torch.float32)
    if out_dir is not None:
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
    return model
