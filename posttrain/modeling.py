"""Loading policies (a causal LM and its tokenizer from a directory or hub id), and the one place
that reads a model's config.

Gemma 3 1B is a text-only causal LM; 4B, 12B and 27B are composite checkpoints
(`Gemma3ForConditionalGeneration`: the language model, a SigLIP vision tower and a projector, with a
processor). A composite config keeps the language model's settings (context length, vocabulary,
pad id, dropout) in its text sub-config, so every caller asks the helpers here instead of reading
`model.config` itself. Text post-training leaves the vision tower untouched: loading a composite
policy freezes the tower and projector unless the caller asks to train them.
"""

from __future__ import annotations

import json
import shutil
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


def text_config(config):
    """The config of the language model: the config itself for a causal LM, its text part for a
    composite model."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def is_composite(config) -> bool:
    """True for a model whose language model is one part among others (a vision tower, a projector)."""
    return text_config(config) is not config


def checkpoint_is_composite(path: str | Path) -> bool:
    """Whether the checkpoint at `path` (a directory or cached hub id) is a composite model; False
    when its config cannot be read here (the loader that needs it reports that)."""
    from transformers import AutoConfig

    try:
        return is_composite(AutoConfig.from_pretrained(str(path)))
    except (OSError, ValueError):
        return False


def context_length(config, default: int | None = None) -> int | None:
    """The model's context window (its language model's max_position_embeddings), or `default`."""
    n = getattr(text_config(config), "max_position_embeddings", None)
    return int(n) if n else default


def set_pad_token_id(config, pad_token_id: int) -> None:
    """Set the pad id everywhere a config reads it (a composite's text part reads its own)."""
    for part in config_parts(config):
        part.pad_token_id = pad_token_id


def output_rows(model) -> int:
    """Rows of the output layer (lm_head): the vocabulary the model scores, which may be padded
    beyond the tokenizer's (Gemma 3 4B-27B: 262,208 rows for a 262,144-token vocabulary)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head)")
    return int(head.weight.shape[0])


# Module names of the vision parts of the composite checkpoints transformers ships (Gemma 3,
# PaliGemma, LLaVA: vision_tower and multi_modal_projector), as a peft exclude_modules pattern.
VISION_MODULES_PATTERN = r".*\b(vision_tower|multi_modal_projector)\b.*"


def vision_parameter_names(model) -> list[str]:
    """Names of the parameters outside the language model: a composite's vision tower and
    projector; empty for a causal LM. Found by what the decoder, output layer and any
    classification head hold, so peft wrappers and other composite architectures work too."""
    language = {id(p) for p in model.get_decoder().parameters()}
    for head in (model.get_output_embeddings(), getattr(model, "score", None)):
        if head is not None:
            language |= {id(p) for p in head.parameters()}
    return [name for name, p in model.named_parameters() if id(p) not in language]


def freeze_vision_tower(model) -> int:
    """Stop gradients to the vision tower and projector: frozen, they stay out of every optimizer
    (weight decay included), so text post-training returns them byte-identical whatever a loop
    does with zero gradients. Returns the number of parameters frozen."""
    names = set(vision_parameter_names(model))
    frozen = 0
    for name, p in model.named_parameters():
        if name in names:
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def checkpoint_tensors_for_model(model, weights: dict) -> dict:
    """`weights` read from a checkpoint's files, renamed to `model`'s state-dict names.

    transformers saves some architectures under other names than their modules use: a composite
    Gemma 3 is stored as `language_model.model.*` and `vision_tower.*` but holds
    `model.language_model.*` and `model.vision_tower.*`, and renames on load. Tensors read from
    the files (a merge, a LITI point) are renamed the same way, by transformers' own mapping for
    the model, before `load_state_dict`. Names the model already uses pass unchanged."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # a transformers without conversion mappings saves under the module names
        return dict(weights)
    mapping = getattr(model, "_weight_conversions", None) or get_model_conversion_mapping(model) or []
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    held = model.state_dict()
    out = {}
    for name, tensor in weights.items():
        new = name if name in held else rename_source_key(name, renamings, converters, model.base_model_prefix, held)[0]
        out[new] = tensor
    return out


# A composite Gemma 3's language-model tensors, named in its checkpoint files (first two) or in its
# modules (last two), and the names a text-only Gemma3ForCausalLM gives them.
_LANGUAGE_MODEL_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                            ("model.language_model.", "model."), ("lm_head.", "lm_head."))


def language_model_tensors(named_tensors):
    """The language-model part of a composite model's (name, tensor) pairs, renamed as the text-only
    causal LM built from its text config names them; the vision tower and projector are left out.
    Yields nothing renamed for names outside the language model."""
    for name, tensor in named_tensors:
        for prefix, replacement in _LANGUAGE_MODEL_PREFIXES:
            if name.startswith(prefix):
                yield replacement + name[len(prefix):], tensor
                break


_TEXT_ARCHITECTURES = {"gemma3_text": "Gemma3ForCausalLM"}


def write_language_model_config(source: str | Path, out_dir: str | Path) -> Path:
    """A checkpoint directory without weights for a composite model's language model alone: its
    text config as a causal LM's config, and the tokenizer files. An engine that builds the model
    from it then takes the weights from `language_model_tensors`."""
    from transformers import AutoConfig

    text = text_config(AutoConfig.from_pretrained(str(source)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if text.model_type not in _TEXT_ARCHITECTURES:
        raise ValueError(f"{source}: no text-only architecture known for a {text.model_type!r} language model "
                         f"(known: {', '.join(_TEXT_ARCHITECTURES)})")
    config = {**text.to_dict(), "architectures": [_TEXT_ARCHITECTURES[text.model_type]]}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in Path(source).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens_map", "chat_template")) and f.is_file():
            shutil.copyfile(f, out / f.name)
    return out


# Files a composite checkpoint's processor adds to the tokenizer's; copied along with a policy so
# that what the stages write still serves images as the base did.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")


def copy_processor_files(source: str | Path, out_dir: str | Path) -> list[str]:
    """Copy the processor's files from checkpoint `source` into `out_dir` (those it lacks)."""
    src, dst = Path(source), Path(out_dir)
    copied = []
    for name in PROCESSOR_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def load_causal_lm(path: str | Path, dtype: str = "float32", device: str | None = None,
                   train_vision_tower: bool = False):
    """A causal LM in training-ready form (eval mode off, requested dtype). A composite checkpoint
    loads whole (vision tower included, so that it saves whole), with the tower frozen unless
    `train_vision_tower`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
    if not train_vision_tower:
        freeze_vision_tower(model)
    if device:
        model.to(device)
    return model


def load_policy(path: str | Path, dtype: str = "float32", device: str | None = None,
                train_vision_tower: bool = False):
    """(model, tokenizer) from a checkpoint directory; merges a LoRA adapter directory if given one."""
    p = Path(path)
    if (p / "adapter_config.json").exists():
        return load_lora_merged(p, dtype, device, train_vision_tower)
    return load_causal_lm(p, dtype, device, train_vision_tower), load_tokenizer(p)


def load_lora_merged(adapter_dir: str | Path, dtype: str = "float32", device: str | None = None,
                     train_vision_tower: bool = False):
    """Load a base model with a peft adapter and merge it, returning a plain model."""
    from peft import AutoPeftModelForCausalLM
    import torch

    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir), dtype=getattr(torch, dtype))
    model = model.merge_and_unload()
    if not train_vision_tower:
        freeze_vision_tower(model)
    if device:
        model.to(device)
    return model, load_tokenizer(adapter_dir)


def load_processor(path: str | Path):
    """A composite checkpoint's processor (its tokenizer and image processor), for image prompts;
    None for a text-only model."""
    if not checkpoint_is_composite(path):
        return None
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(path))


def image_text_model(model):
    """The part of a composite model that reads the ids with their pixel values and returns the
    language model's final hidden states (Gemma3Model: vision tower, projector and language model,
    without the output layer); a peft wrapper is looked through (its LoRA layers sit inside)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not is_composite(inner.config):
        raise ValueError(f"{type(inner).__name__} is a text-only model; image inputs need a composite checkpoint")
    return inner.base_model


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


def save_tokenizer(tokenizer, out_dir: Path) -> None:
    """The tokenizer, with the Gemma chat template when it has none of its own, and the processor
    files of the checkpoint it was loaded from (a composite model's), so outputs keep them."""
    from posttrain.chat import GEMMA_CHAT_TEMPLATE

    out_dir.mkdir(parents=True, exist_ok=True)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out_dir))
    if getattr(tokenizer, "name_or_path", None) and Path(tokenizer.name_or_path).is_dir():
        copy_processor_files(tokenizer.name_or_path, out_dir)
