"""Tiny models of real architectures (Gemma3, Llama, Qwen2), built from configs.

These stand in for pretrained checkpoints in the embedded default and in tests. head_dim stays
at 32 or more because vLLM's CPU attention refuses smaller heads. With `vision`, a Gemma3 spec
builds the composite checkpoint Gemma 3 4B-27B ship as (`Gemma3ForConditionalGeneration`: the
language model, a SigLIP vision tower and the projector) with its processor saved beside it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from posttrain.chat import GEMMA_MULTIMODAL_CHAT_TEMPLATE, START_OF_IMAGE

ARCHITECTURES = ("gemma3", "llama", "qwen2")


# The image tokens of Gemma 3's tokenizer. The toy tokenizer's own vocabulary stays as it is (so
# text-only toy models keep their results); a composite model's copy appends these three, as
# Gemma 3 4B-27B's vocabulary (262,208 rows) extends 1B's (262,144).
IMAGE_TOKENS = {"boi_token": START_OF_IMAGE, "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}


class TinyVisionSpec(BaseModel):
    """The SigLIP vision tower and projector of a tiny composite Gemma 3 (published structure, tiny sizes)."""

    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(32, ge=8, description="Square input images are resized to this many pixels a side.")
    patch_size: int = Field(8, ge=2, description="Pixels a side of one vision patch.")
    hidden_size: int = Field(64, ge=16, description="Width of the vision tower.")
    num_layers: int = Field(2, ge=1, description="Vision encoder layers.")
    num_heads: int = Field(2, ge=1, description="Vision attention heads.")
    intermediate_size: int = Field(128, ge=8, description="Vision MLP width.")
    mm_tokens_per_image: int = Field(4, ge=1, description="Soft tokens one image becomes in the language model (a "
                                     "square number; the projector average-pools the patch grid down to it).")

    @model_validator(mode="after")
    def _pooling_fits(self):
        side, tokens_side = self.image_size // self.patch_size, math.isqrt(self.mm_tokens_per_image)
        if self.image_size % self.patch_size or tokens_side ** 2 != self.mm_tokens_per_image or side % tokens_side:
            raise ValueError(f"vision: image_size / patch_size ({self.image_size}/{self.patch_size}) must be a whole "
                             f"grid that sqrt(mm_tokens_per_image) ({self.mm_tokens_per_image}) divides")
        return self


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
    vision: TinyVisionSpec | None = Field(
        None, description="Gemma3 only: build the composite checkpoint (Gemma3ForConditionalGeneration with a SigLIP "
        "vision tower, projector and processor), as Gemma 3 4B, 12B and 27B are published.")

    @model_validator(mode="after")
    def _vision_needs_gemma3(self):
        if self.vision is not None and (self.arch != "gemma3" or self.head != "causal_lm"):
            raise ValueError("vision: only a gemma3 causal_lm has a composite (vision + language) form")
        return self


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


def with_image_tokens(tokenizer):
    """A copy of `tokenizer` with Gemma 3's image tokens appended, reachable as the attributes
    (`boi_token`, `image_token_id`, ...) Gemma3Processor reads."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": list(IMAGE_TOKENS.values())},
                           replace_extra_special_tokens=False)
    tok._set_model_specific_special_tokens(IMAGE_TOKENS)  # transformers' hook for named extra tokens
    tok.chat_template = GEMMA_MULTIMODAL_CHAT_TEMPLATE
    return tok


def _composite_config(spec: TinyModelSpec, tokenizer):
    from transformers import Gemma3Config, SiglipVisionConfig

    v = spec.vision
    vision = SiglipVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                                image_size=v.image_size, patch_size=v.patch_size, vision_use_head=False)
    return Gemma3Config(text_config=_config(spec, tokenizer), vision_config=vision,
                        mm_tokens_per_image=v.mm_tokens_per_image, boi_token_index=tokenizer.boi_token_id,
                        eoi_token_index=tokenizer.eoi_token_id, image_token_index=tokenizer.image_token_id,
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)


def _save_processor(spec: TinyModelSpec, tokenizer, out_dir: str | Path) -> None:
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    # The PIL image processor: the default one needs torchvision, which the CPU set-up lacks.
    images = Gemma3ImageProcessorPil(size={"height": spec.vision.image_size, "width": spec.vision.image_size})
    Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=spec.vision.mm_tokens_per_image,
                    chat_template=tokenizer.chat_template).save_pretrained(str(out_dir))


def build_tiny_model(spec: TinyModelSpec, tokenizer, out_dir: str | Path | None = None):
    """Instantiate a randomly initialised tiny model; save it with the tokenizer (and, for a
    composite model, its processor) if `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if spec.vision is not None:
        from transformers import Gemma3ForConditionalGeneration

        tokenizer = with_image_tokens(tokenizer)
        torch.manual_seed(spec.seed)
        model = Gemma3ForConditionalGeneration(_composite_config(spec, tokenizer)).to(torch.float32)
        # transformers initialises the projector to zeros (a published checkpoint overwrites it);
        # a model built from config would then see every image as the same soft tokens.
        with torch.no_grad():
            projection = model.model.multi_modal_projector.mm_input_projection_weight
            projection.normal_(0.0, model.config.text_config.initializer_range)
        if out_dir is not None:
            model.save_pretrained(str(out_dir))
            tokenizer.save_pretrained(str(out_dir))
            _save_processor(spec, tokenizer, out_dir)
        return model
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
