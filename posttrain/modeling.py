"""Loading and saving policies: a causal LM and its tokenizer from a directory or hub id."""

from __future__ import annotations

from pathlib import Path

from posttrain.chat import END_OF_TURN


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def config_parts(config) -> list:
    """The config and, for a composite model (Gemma 3 4B and up: a language model with a vision
    tower), its text part, where the language model's settings (pad id, context length, dropout)
    live; one entry when they are the same object."""
    text = config.get_text_config()
    return [config] if text is config else [config, text]


def load_causal_lm(path: str | Path, dtype: str = "float32", device: str | None = None):
    """A causal LM in training-ready form (eval mode off, requested dtype)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
    if device:
        model.to(device)
    return model


def load_policy(path: str | Path, dtype: str = "float32", device: str | None = None):
    """(model, tokenizer) from a checkpoint directory; merges a LoRA adapter directory if given one."""
    p = Path(path)
    if (p / "adapter_config.json").exists():
        return load_lora_merged(p, dtype, device)
    return load_causal_lm(p, dtype, device), load_tokenizer(p)


def load_lora_merged(adapter_dir: str | Path, dtype: str = "float32", device: str | None = None):
    """Load a base model with a peft adapter and merge it, returning a plain model."""
    from peft import AutoPeftModelForCausalLM
    import torch

    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir), dtype=getattr(torch, dtype))
    model = model.merge_and_unload()
    if device:
        model.to(device)
    return model, load_tokenizer(adapter_dir)


def end_of_turn_id(tokenizer) -> int:
    tid = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if tid is None or tid == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {END_OF_TURN} token; IT models end their turns with it")
    return tid


def stop_token_ids(tokenizer) -> list[int]:
    """IT generations end at <end_of_turn>; <eos> also ends them (pretrained behaviour)."""
    ids = [end_of_turn_id(tokenizer)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
