"""`distill_cache`: score a dataset once with the teacher and store sparse targets (offline teacher cache).

Typically run on the machine that can hold the large teacher; the `distill` stage then trains
from the cache (`teacher_cache: ${stages.NAME.cache}`) without loading the teacher. Storage per
completion token is K int32 ids + K float16 probabilities instead of a full vocabulary row.

Rows with image parts (a composite teacher's data, see posttrain.chat) are scored with their
images: the teacher's processor makes their pixel values and the forward runs through its vision
tower, exactly as the distill stage's teacher scores such a row on line. The cache keeps each such
sequence's image parts (their file paths, not the pixels), so that distill gives the student the
same images; the files must be readable where distill runs. A text-only teacher refuses image rows,
naming the first.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field

from posttrain.data import DataError, iter_rows, load_distill_rows
from posttrain.losses.distillation import DistillationObjective, teacher_targets
from posttrain.sequences import check_same_tokenizer, logit_mask, pad_batch, shifted_logits
from posttrain.stages.base import StageConfig, StageContext, StageError, StageResult, register_stage


class DistillCacheStageConfig(StageConfig):
    """Score (prompt, completion) sequences with a teacher into a sharded sparse-target cache."""

    teacher: str = Field(description="Teacher causal LM: ${models.NAME} or a path.")
    dataset: str = Field(description="Rows with completions: `messages` ending in an assistant turn, or `prompt` + "
                         "`completion`; with a composite teacher, their image parts are scored with the images.")
    student: str | None = Field(
        None, description="Optional student checkpoint: its tokenizer must equal the teacher's (checked now rather "
        "than at training time).")
    target: Literal["sampled", "sampled_counts", "top_k"] = Field(
        "sampled", description="sampled: Gemma 3 sampled logits (k ids drawn from the teacher, probabilities "
        "renormalised over them); sampled_counts: k draws with replacement, target = counts / k; top_k: exact top k.")
    k: int = Field(256, ge=1, description="Ids stored per completion token.")
    with_replacement: bool = Field(False, description="sampled: draw with replacement (duplicates merged). sampled_counts always does.")
    temperature: float = Field(1.0, gt=0, description="Teacher temperature; the distill stage must use the same one.")
    max_length: int = Field(512, ge=8, description="Sequences are truncated to this many tokens before scoring.")
    batch_size: int = Field(16, ge=1, description="Sequences scored per teacher forward pass.")
    shard_size: int = Field(1024, ge=1, description="Sequences per shard file.")
    teacher_dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Teacher weights dtype.")
    chunk_size: int | None = Field(128, ge=1, description="Positions per sampling chunk (bounds float32 memory on large vocabularies).")
    limit: int | None = Field(None, ge=1, description="Score at most this many rows (null: all).")


@register_stage("distill_cache", DistillCacheStageConfig, outputs=("cache",))
def run_distill_cache(cfg: DistillCacheStageConfig, ctx: StageContext) -> StageResult:
    """Score a dataset with the teacher once into an offline sparse-target cache for `distill`."""
    from posttrain.modeling import checkpoint_is_composite, load_causal_lm, load_processor, load_tokenizer, output_rows
    from posttrain.teacher_cache import (TeacherCacheWriter, bytes_per_token, full_row_bytes,
                                         tokenizer_fingerprint)

    tokenizer = load_tokenizer(cfg.teacher)
    if cfg.student is not None:
        check_same_tokenizer(load_tokenizer(cfg.student), tokenizer, cfg.student, cfg.teacher)
    processor = load_processor(cfg.teacher)  # a composite teacher's: rows with images (None: text only)
    try:
        _, sequences = load_distill_rows(cfg.dataset, tokenizer, cfg.max_length, processor)
    except DataError:
        if processor is None:
            _refuse_image_rows(cfg)  # the row that failed held images: say so in the teacher's terms
        raise
    if not sequences:
        raise StageError(f"dataset {cfg.dataset}: no rows with completions to score (need `messages` ending in an "
                         "assistant turn, or `prompt` + `completion`)")
    if cfg.limit is not None:
        sequences = sequences[:cfg.limit]
    with_images = sum(s.images is not None for s in sequences)
    if with_images and cfg.student is not None and not checkpoint_is_composite(cfg.student):
        # distill would refuse this cache for that student: say so now, before the teacher scores.
        raise StageError(f"student: {cfg.student} is a text-only model, and {with_images} rows of {cfg.dataset} hold "
                         "images it could not see; distil image rows into a composite student")
    teacher = load_causal_lm(cfg.teacher, dtype=cfg.teacher_dtype).eval()
    vocab = output_rows(teacher)
    generator = torch.Generator().manual_seed(ctx.seed)
    objective = DistillationObjective(target=cfg.target, k=cfg.k, with_replacement=cfg.with_replacement,
                                      temperature=cfg.temperature, chunk_size=cfg.chunk_size)
    counts = cfg.target == "sampled_counts"
    metadata = {"target": cfg.target, "with_replacement": cfg.with_replacement or counts,
                "temperature": cfg.temperature, "teacher": cfg.teacher, "seed": ctx.seed,
                "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)}
    out = ctx.stage_dir / "cache"
    if out.exists():  # a previous unfinished attempt: start over (the runner re-runs incomplete stages)
        import shutil
        shutil.rmtree(out)

    # Draws with replacement fill K slots (duplicates merged); otherwise at most the vocabulary fits.
    stored_k = cfg.k if metadata["with_replacement"] and cfg.target != "top_k" else min(cfg.k, vocab)
    started = time.time()
    with TeacherCacheWriter(out, stored_k, vocab, metadata, cfg.shard_size) as writer, \
            ctx.progress(len(sequences), "teacher scoring") as advance, torch.no_grad():
        for start in range(0, len(sequences), cfg.batch_size):
            chunk = sequences[start:start + cfg.batch_size]
            batch = pad_batch(chunk, tokenizer.pad_token_id)
            # The distill stage's teacher forward (its pixel values and token type ids with them,
            # for rows with images), full logits.
            logits = shifted_logits(teacher, batch, chunk_size=None)
            ids, probs = teacher_targets(objective, logits, generator=generator)
            mask = logit_mask(batch["loss_mask"])
            for i, seq in enumerate(chunk):
                keep = mask[i] != 0
                writer.add(seq.input_ids, seq.loss_mask, ids[i][keep], probs[i][keep],
                           images=seq.images.image_parts if seq.images is not None else None)
            advance(len(chunk))
    index = writer.index
    seconds = time.time() - started
    k = index["k"]
    metrics = {
        "sequences": index["num_sequences"], "image_sequences": index["num_image_sequences"],
        "scored_tokens": index["num_positions"], "k": k, "vocab_size": vocab,
        "bytes_per_token": bytes_per_token(k), "stored_bytes_per_token": index["stored_bytes_per_position"],
        "full_row_bytes_fp32": full_row_bytes(vocab, 4),
        "compression_vs_fp32_row": round(full_row_bytes(vocab, 4) / bytes_per_token(k), 2),
        "compression_vs_bf16_row": round(full_row_bytes(vocab, 2) / bytes_per_token(k), 2),
        "seconds": round(seconds, 1),
    }
    return StageResult(outputs={"cache": str(out)}, metrics=metrics)


def _refuse_image_rows(cfg: DistillCacheStageConfig) -> None:
    """A text-only teacher cannot see a row's images: after loading failed, its first such row is
    an error, naming it, rather than the text-only tokenizer's complaint about a part (the dataset
    is read again only then, not on every run)."""
    from posttrain.chat import has_image_parts

    for where, row in iter_rows(cfg.dataset):
        conversation = row.get("messages", row.get("prompt"))
        completion = row.get("completion")
        if has_image_parts(conversation) or has_image_parts(completion):
            raise StageError(f"{where}: the row holds images, and the teacher {cfg.teacher} is a text-only model; "
                             "rows with images are scored by a composite teacher (Gemma3ForConditionalGeneration "
                             "with its processor)")
