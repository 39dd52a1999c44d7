"""`sft`: supervised finetuning with TRL's SFTTrainer on Gemma IT conversations.

Rows are tokenised here with `posttrain.chat` (control tokens as ids, loss on model turns and
their `<end_of_turn>` only) and handed to SFTTrainer pre-tokenised with `assistant_masks`, so
the mask is exactly the one the chat tests pin down whatever the tokenizer's own template does.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from posttrain.chat import has_image_parts, image_model_inputs, tokenize_conversation, tokenize_image_conversation
from posttrain.data import DataError, load_conversations, write_jsonl
from posttrain.modeling import save_tokenizer
from posttrain.rollout.parallel import current_launch
from posttrain.stages.base import StageConfig, StageContext, StageError, StageResult, register_stage
from posttrain.trackers import ReportTo
from posttrain.training import LoraSpec, save_model


class SFTStageConfig(StageConfig):
    """Supervised finetuning on chat (`messages`) or `prompt`/`completion` rows."""

    # Added after run directories were made with this stage (StageConfig.hash_form).
    _HASHED_ONLY_WHEN_SET: ClassVar[dict[str, Any]] = {
        "num_train_epochs": None, "eval_dataset": None, "eval_steps": None, "train_vision_tower": False,
        "sharding": "none", "fsdp_offload": False}


    model: str = Field(description="Model to finetune: ${models.NAME}, ${stages.NAME.model} or a path.")
    dataset: str = Field(description="Training rows: ${datasets.NAME}, ${stages.NAME.dataset} or a path.")
    max_steps: int = Field(200, ge=1, description="Optimizer steps (ignored when num_train_epochs is set).")
    num_train_epochs: float | None = Field(
        None, gt=0, description="Passes over the training rows, as TRL's num_train_epochs; when set it decides the "
        "length of training instead of max_steps (warmup_ratio then applies to the steps it makes).")
    eval_dataset: str | None = Field(
        None, description="Held-out rows in the formats `dataset` takes: their loss (eval_loss) is logged every "
        "eval_steps and at the end, and kept in the summary as eval_loss_last.")
    eval_steps: int | None = Field(None, ge=1, description="With eval_dataset: also evaluate every this many steps "
                                   "(default: at the end only).")
    batch_size: int = Field(16, ge=1, description="Sequences per device per step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate (AdamW).")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field("cosine", description="Learning-rate schedule.")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_length: int = Field(1024, ge=8, description="Sequences longer than this are truncated (counted in the metrics).")
    packing: bool = Field(False, description="Pack several conversations per sequence (TRL best-fit packing).")
    lora: LoraSpec | None = Field(None, description="Train a LoRA adapter instead of all weights; the output is merged.")
    on_invalid_row: Literal["error", "skip"] = Field(
        "error", description="An invalid row stops the stage with its file and line, or is skipped and written to skipped.jsonl.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    train_vision_tower: bool = Field(False, description="Composite models (Gemma 3 4B and up): also train the vision "
                                     "tower and projector. Off, they are frozen (out of the optimizer) and come out "
                                     "byte-identical.")
    bf16: bool = Field(False, description="bfloat16 mixed precision (GPU nodes).")
    logging_steps: int = Field(10, ge=1, description="Log the loss every this many steps.")
    report_to: ReportTo = Field(default_factory=list, description="Extra trackers: tensorboard, wandb, trackio "
                                "(the `trackers` extra installs them).")
    deepspeed: str | None = Field(None, description="DeepSpeed config file for multi-GPU runs under `accelerate launch`.")
    sharding: Literal["none", "fsdp"] = Field(
        "none", description="fsdp: the Trainer's own FSDP2 (transformers' `fsdp` / `fsdp_config` with fsdp_version 2), "
        "one unit per decoder layer, under a multi-process launch; the saved model is whole.")
    fsdp_offload: bool = Field(False, description="sharding fsdp: keep parameters and optimizer state in CPU memory.")

    @model_validator(mode="after")
    def _one_sharding_engine(self):
        if self.sharding == "fsdp" and self.deepspeed is not None:
            raise ValueError("sharding: fsdp and deepspeed are two sharding engines; set one of them")
        if self.sharding == "fsdp" and self.lora is not None:
            raise ValueError("sharding: fsdp with lora: the adapter is merged on one process at the end, which a "
                             "sharded model cannot do; train LoRA data-parallel (sharding: none)")
        return self


def load_conversations_for_training(path: str, on_invalid_row: str, skipped_path: Path, write_skipped: bool = True,
                                    allow_images: bool = False) -> tuple[list[list[dict]], int]:
    """`posttrain.data.load_conversations`; invalid rows error or, with on_invalid_row: skip, are
    recorded in `skipped_path` (written unless `write_skipped` is off: another process writes it)."""
    skipped: list[dict] | None = [] if on_invalid_row == "skip" else None
    try:
        conversations = load_conversations(path, skipped, allow_images)
    finally:
        if skipped and write_skipped:
            write_jsonl(skipped_path, skipped)
    return conversations, len(skipped or [])


def tokenize_for_training(tokenizer, conversations, max_length: int) -> tuple[list[dict], int]:
    """Token ids and assistant masks; over-long rows are truncated and counted (a row whose
    model turns were cut away entirely still counts as truncated and trains nothing)."""
    rows, truncated = [], 0
    for messages in conversations:
        tc = tokenize_conversation(tokenizer, messages)
        ids, mask = tc.input_ids, tc.loss_mask
        if len(ids) > max_length:
            ids, mask = ids[:max_length], mask[:max_length]
            truncated += 1
        if any(mask):
            rows.append({"input_ids": ids, "assistant_masks": mask})
    return rows, truncated


class ImageTextCollator:
    """Batches of image + text rows for a composite model: right-padded ids, labels on the model
    turns only, and the rows' images as pixel_values with the token_type_ids that mark their soft
    tokens. The images are kept here, by row, rather than in the dataset's columns."""

    def __init__(self, processor, pixels: list):
        self.processor, self.pixels = processor, pixels

    def __call__(self, features: list[dict]) -> dict:
        import torch

        pad = self.processor.tokenizer.pad_token_id
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), pad, dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        attention = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            attention[i, :n] = 1
            mask = torch.tensor(f["assistant_masks"], dtype=torch.bool)
            labels[i, :n] = torch.where(mask, ids[i, :n], torch.full_like(ids[i, :n], -100))
        batch = {"input_ids": ids, "attention_mask": attention, "labels": labels,
                 "token_type_ids": (ids == self.processor.tokenizer.image_token_id).long()}
        pixels = [self.pixels[f["row"]] for f in features if self.pixels[f["row"]] is not None]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
        return batch


def image_rows_for_training(cfg: SFTStageConfig, conversations) -> tuple[list[dict], int, ImageTextCollator]:
    """Rows of a dataset with image parts, tokenised with the model's processor; a row longer than
    max_length is an error (cutting it could split an image's soft tokens)."""
    from transformers import AutoProcessor

    from posttrain.modeling import checkpoint_is_composite

    if not checkpoint_is_composite(cfg.model):
        raise DataError(f"{cfg.dataset}: rows hold image parts, and {cfg.model} is a text-only model; image + text "
                        "finetuning needs a composite checkpoint (Gemma 3 4B and up) with its processor")
    processor = AutoProcessor.from_pretrained(cfg.model)
    rows, pixels = [], []
    for i, messages in enumerate(conversations):
        conv, images = tokenize_image_conversation(processor, messages, where=f"{cfg.dataset}: row {i + 1}: messages")
        if len(conv.input_ids) > cfg.max_length:
            raise DataError(f"{cfg.dataset}: row {i + 1}: {len(conv.input_ids)} tokens with its images, over "
                            f"max_length {cfg.max_length}; raise max_length (image rows are not cut)")
        pixels.append(image_model_inputs(processor, conv, images).get("pixel_values"))
        rows.append({"input_ids": conv.input_ids, "assistant_masks": conv.loss_mask, "row": i})
    return rows, 0, ImageTextCollator(processor, pixels)


@register_stage("sft", SFTStageConfig, outputs=("model",), distributed=True)
def run_sft(cfg: SFTStageConfig, ctx: StageContext) -> StageResult:
    """Supervised finetuning (TRL SFTTrainer), full or LoRA, loss on model turns only."""
    import datasets
    from transformers import PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from posttrain.modeling import checkpoint_is_composite, load_policy

    datasets.disable_progress_bars()  # the stage's own progress bar is the one to watch
    composite = checkpoint_is_composite(cfg.model)
    conversations, n_skipped = load_conversations_for_training(cfg.dataset, cfg.on_invalid_row, ctx.stage_dir / "skipped.jsonl",
                                                                 write_skipped=ctx.is_main, allow_images=composite)
    model, tokenizer = load_policy(cfg.model, train_vision_tower=cfg.train_vision_tower)
    collator, trainer_options = None, {}
    if any(has_image_parts(c) for c in conversations):
        rows, n_truncated, collator = image_rows_for_training(cfg, conversations)
        # The rows are tokenised here and batched by the collator, which adds the images.
        trainer_options = dict(remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True})
    else:
        rows, n_truncated = tokenize_for_training(tokenizer, conversations, cfg.max_length)
    train = datasets.Dataset.from_list(rows)
    evaluation = None
    if cfg.eval_dataset is not None:
        held_out, _ = load_conversations_for_training(cfg.eval_dataset, cfg.on_invalid_row,
                                                      ctx.stage_dir / "eval_skipped.jsonl", write_skipped=ctx.is_main)
        evaluation = datasets.Dataset.from_list(tokenize_for_training(tokenizer, held_out, cfg.max_length)[0])

    peft_config = cfg.lora.to_peft_config(model) if cfg.lora is not None else None

    by_epochs = cfg.num_train_epochs is not None
    args = SFTConfig(
        output_dir=str(ctx.stage_dir / "trainer"), max_steps=-1 if by_epochs else cfg.max_steps,
        num_train_epochs=cfg.num_train_epochs if by_epochs else 1.0,
        # a float below 1 is a fraction of the steps the epochs make (transformers' warmup_steps)
        warmup_steps=min(cfg.warmup_ratio, 0.999) if by_epochs else int(cfg.warmup_ratio * cfg.max_steps),
        eval_strategy="steps" if (evaluation is not None and cfg.eval_steps) else "no", eval_steps=cfg.eval_steps,
        per_device_eval_batch_size=cfg.batch_size,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler,
        weight_decay=cfg.weight_decay, max_length=cfg.max_length, packing=cfg.packing,
        gradient_checkpointing=cfg.gradient_checkpointing, bf16=cfg.bf16, logging_steps=cfg.logging_steps,
        save_strategy="no", report_to=cfg.report_to or "none", seed=ctx.seed, data_seed=ctx.seed,
        disable_tqdm=True, dataset_num_proc=None, deepspeed=cfg.deepspeed, use_cpu=_no_accelerator(),
        **_fsdp_arguments(cfg, model, current_launch().world_size), **trainer_options,
    )

    losses: list[float] = []
    eval_losses: list[float] = []

    with ctx.metrics() as metrics, ctx.progress(None if by_epochs else cfg.max_steps, "sft") as advance:
        class Report(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                advance(1)
                if state.global_step >= state.max_steps:
                    # the last step's loss is logged even when max_steps is not a multiple of logging_steps
                    control.should_log = True

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and ("loss" in logs or "eval_loss" in logs):
                    if "loss" in logs:
                        losses.append(float(logs["loss"]))
                    if "eval_loss" in logs:
                        eval_losses.append(float(logs["eval_loss"]))
                    metrics.log(state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))})

        trainer = SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                             processing_class=tokenizer, peft_config=peft_config, callbacks=[Report()],
                             data_collator=collator)
        trainer.remove_callback(PrinterCallback)  # our progress bar and metrics.jsonl replace its prints
        started = time.time()
        trainer.train()
        seconds = time.time() - started
        if evaluation is not None and not (cfg.eval_steps and trainer.state.global_step % cfg.eval_steps == 0):
            trainer.evaluate()  # the final model's held-out loss (logged through on_log)

    if losses and not all(math.isfinite(x) for x in losses):
        raise StageError(f"training loss became non-finite ({losses[-5:]}); lower learning_rate or check the data")
    out = ctx.stage_dir / "model"
    if current_launch().world_size > 1 and cfg.lora is None:
        # Every rank takes part: under ZeRO-3 or FSDP the weights are gathered from all of them;
        # the trainer writes on the main process only.
        trainer.save_model(str(out))
        if ctx.is_main:
            save_tokenizer(tokenizer, out)
    elif ctx.is_main:
        trained = trainer.model
        if cfg.lora is not None:
            # Data-parallel replicas hold the whole model; a sharded (ZeRO-3/FSDP) LoRA run would not.
            trained = trained.merge_and_unload()
        save_model(trained, tokenizer, out)
    stats = {"rows": len(conversations), "rows_skipped": n_skipped, "rows_truncated": n_truncated,
             "train_tokens": sum(len(r["input_ids"]) for r in rows),
             "trained_tokens": sum(sum(r["assistant_masks"]) for r in rows)}
    if ctx.is_main:
        (ctx.stage_dir / "data_stats.json").write_text(json.dumps(stats, indent=2))
    from posttrain.sharding import parameter_bytes_on_rank

    metrics = {"loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
               "steps": trainer.state.global_step, "train_seconds": round(seconds, 1), **stats,
               "sharding": "fsdp" if trainer.is_fsdp_enabled else "none", "world_size": current_launch().world_size,
               "param_bytes_per_rank": parameter_bytes_on_rank(trainer.model)}
    if eval_losses:
        metrics.update(eval_loss_first=eval_losses[0], eval_loss_last=eval_losses[-1])
    return StageResult(outputs={"model": str(out)}, metrics=metrics)


def _fsdp_arguments(cfg: SFTStageConfig, model, world_size: int) -> dict[str, Any]:
    """TrainingArguments for `sharding: fsdp` under a multi-process launch: the Trainer's FSDP2,
    wrapping the decoder layers (the classes posttrain.sharding shards the loops' models by), with
    a full state dict for the saved model. Nothing for one process or `sharding: none`.

    accelerate applies FSDP on GPU launches only; on CPUs the Trainer then trains data-parallel
    (the stage's metrics record the sharding it actually had)."""
    if cfg.sharding != "fsdp" or world_size < 2:
        return {}
    from posttrain.sharding import decoder_layers

    import transformers
    from packaging.version import Version

    layers = sorted({type(m).__name__ for m in decoder_layers(model)})
    config = {"fsdp_version": 2, "transformer_layer_cls_to_wrap": layers, "reshard_after_forward": True,
              "state_dict_type": "FULL_STATE_DICT"}
    if Version(transformers.__version__) >= Version("5.19"):
        # From 5.19 FSDP is switched on by `fsdp=True` with everything in fsdp_config (the string
        # form is deprecated there and removed in 5.20); both give accelerate the same plugin.
        return {"fsdp": True, "fsdp_config": {**config, "cpu_offload": cfg.fsdp_offload}}
    return {"fsdp": "full_shard auto_wrap" + (" offload" if cfg.fsdp_offload else ""), "fsdp_config": config}


def _no_accelerator() -> bool:
    import torch

    return not torch.cuda.is_available()
