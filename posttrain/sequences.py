"""Tokenised sequences for the distillation loops (`distill`, `distill_cache`, `qat`): padding, the
logit mask, the checks that a teacher can be compared with the student token by token (one
tokenizer, a shared vocabulary width), and the models' shifted logits of a batch, projected to the
vocabulary chunk by chunk and moved between the teacher's device and the student's.
The rows themselves are read by `posttrain.data.load_distill_rows`.
"""

from __future__ import annotations

import torch

from posttrain.chat import ChatFormatError, control_token_ids
from posttrain.data import TokenSequence
from posttrain.losses.distillation import ProjectedLogits, forward_kl, reverse_kl
from posttrain.losses.token_logprobs import vocabulary_projection
from posttrain.images import image_forward_inputs, vision_dtype
from posttrain.modeling import image_text_model, output_rows
from posttrain.sharding import in_root_forward


class TokenizerMismatchError(ValueError):
    """Teacher and student do not share a tokenizer, so their distributions cannot be compared."""


# --- teacher and student compared token by token ------------------------------------------------

def _differ_only_by_appended_special_tokens(a_tok, b_tok) -> bool:
    """True when one vocabulary is the other plus special tokens appended after it, every shared
    token keeping its id: a composite model's image tokens (Gemma 3 4B and up next to a text-only
    model). Text never tokenises to them, and distillation compares only the shared rows."""
    a, b = a_tok.get_vocab(), b_tok.get_vocab()
    small, large, large_tok = (a, b, b_tok) if len(a) <= len(b) else (b, a, a_tok)
    if any(large.get(t) != i for t, i in small.items()):
        return False
    extra = set(large) - set(small)
    return all(large[t] >= len(small) for t in extra) and extra <= set(large_tok.all_special_tokens)


def check_same_tokenizer(student_tok, teacher_tok, student_path: str, teacher_path: str) -> None:
    """Refuse a teacher whose vocabulary, special tokens or Gemma control token ids differ."""
    problems: list[str] = []
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv and not _differ_only_by_appended_special_tokens(student_tok, teacher_tok):
        only_s = sorted(set(sv) - set(tv))[:5]
        only_t = sorted(set(tv) - set(sv))[:5]
        moved = sorted(t for t in set(sv) & set(tv) if sv[t] != tv[t])[:5]
        problems.append(f"vocabularies differ (student {len(sv)} tokens, teacher {len(tv)}; only in student: "
                        f"{only_s}, only in teacher: {only_t}, same token with another id: {moved})")
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        a, b = getattr(student_tok, attr, None), getattr(teacher_tok, attr, None)
        if a != b:
            problems.append(f"{attr} differs (student {a!r}, teacher {b!r})")
    try:
        s_ids, t_ids = control_token_ids(student_tok), control_token_ids(teacher_tok)
        for name in s_ids:
            if s_ids[name] != t_ids[name]:
                problems.append(f"{name} has id {s_ids[name]} in the student but {t_ids[name]} in the teacher")
    except ChatFormatError as e:
        problems.append(str(e))
    if problems:
        raise TokenizerMismatchError(
            f"teacher {teacher_path} and student {student_path} do not share a tokenizer: " + "; ".join(problems)
            + ". Distillation compares distributions token by token, so both must use the same tokenizer.")


def shared_vocab_width(student, teacher, tokenizer, student_path: str, teacher_path: str) -> int:
    """The number of output rows teacher and student are compared over.

    Checkpoints of one model family may pad their output layer beyond the shared tokenizer to a
    hardware-friendly width (Gemma 3 1B has 262,144 rows, 4B/12B/27B 262,208). Rows past the
    tokenizer's vocabulary are never a real token, so both sides are compared over the first
    min(widths) rows, as long as that covers every id of the tokenizer's base vocabulary.
    """
    s, t = output_rows(student), output_rows(teacher)
    width = min(s, t)
    needed = int(tokenizer.vocab_size)
    if width < needed:
        raise TokenizerMismatchError(
            f"teacher {teacher_path} has {t} output logits and student {student_path} has {s}, but their shared "
            f"tokenizer has {needed} ids: the narrower one cannot score every token. Widths may differ only by "
            "padding rows beyond the tokenizer's vocabulary.")
    return width


# --- batches -------------------------------------------------------------------------------------

def pad_batch(sequences: list[TokenSequence], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and loss mask. Padding never counts, whatever pad_id is.
    Sequences with images add their pixel values and token type ids (posttrain.images)."""
    width = max(len(s.input_ids) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        attention[i, :n] = 1
        mask[i, :n] = torch.tensor(s.loss_mask)
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": mask,
            **image_forward_inputs([s.images for s in sequences], ids)}


def logit_mask(loss_mask: torch.Tensor) -> torch.Tensor:
    """Mask over logit positions: the logits at n predict token n + 1, so they count when that token does."""
    return loss_mask[:, 1:]


# --- the models' logits of a batch ---------------------------------------------------------------

def shifted_logits(model, batch: dict[str, torch.Tensor], chunk_size: int | None, width: int | None = None):
    """The model's logits at positions 0..L-2 (position n predicts token n + 1).

    With `chunk_size` set they come back as ProjectedLogits: only the decoder runs here (its
    final hidden states [B, L, H] are small next to [B, L, V]) and the losses project the
    counted positions to the vocabulary chunk by chunk, recomputing each chunk in backward.
    Without it, the HF forward's full [B, L, V] logits. `width` keeps the first `width` vocabulary
    rows (see shared_vocab_width). A batch with images (pixel_values) runs through the composite
    model's vision tower too.
    """
    images = {k: batch[k] for k in ("pixel_values", "token_type_ids") if k in batch}
    if images:
        images["pixel_values"] = images["pixel_values"].to(vision_dtype(model))
    if chunk_size is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **images).logits[:, :-1]
        return logits if width is None else logits[..., :width]
    # get_decoder() is the base transformer of a CausalLM (for a peft model the call reaches
    # the wrapped model, LoRA layers included); use_cache=False: nothing is generated here.
    # Under fsdp the root unit's parameters (embeddings, the output layer the losses project with
    # later) are gathered by running the decoder as a forward of the root; FSDP keeps them gathered
    # until the backward has used them.
    decoder = image_text_model(model) if images else model.get_decoder()
    decoder_out = in_root_forward(model, lambda: decoder(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, **images))
    return ProjectedLogits(decoder_out.last_hidden_state[:, :-1], vocabulary_projection(model, width))


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def on_model_device(batch: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """The batch on the model's device (the teacher may live elsewhere than the student)."""
    device = device_of(model)
    return {k: v.to(device) for k, v in batch.items()}


def _same_device(a, b) -> bool:
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def logits_on_device(logits, device: torch.device):
    """Teacher logits (or its ProjectedLogits) where the student's are, for the loss."""
    if isinstance(logits, ProjectedLogits):
        if _same_device(logits.device, device):
            return logits
        # A teacher placed elsewhere projects its hidden states on its own device, chunk by chunk
        # inside the loss; the per-chunk logits then move to the student's device.
        home, head = logits.device, logits.head

        def project_here(hidden):
            return head(hidden.to(home)).to(device)

        return ProjectedLogits(logits.hidden.to(device), project_here)
    return logits.to(device)


@torch.no_grad()
def summed_kls(student, teacher, sequences: list[TokenSequence], pad_id: int, temperature: float,
               chunk_size: int | None, width: int | None = None, batch_size: int = 16,
               batches: int = 0) -> dict[str, float]:
    """Summed KL(teacher||student) and KL(student||teacher) over the sequences' counted (completion)
    tokens, and their count (`tokens`): divide, after adding up the ranks' sums, for per-token
    figures. The held-out measure of distill (on the student's samples) and qat (on the teacher's
    answers).

    `batches`: run at least this many batches through the models, the extra ones on a one-token
    stand-in that counts nothing: a sharded model must run as often on every rank, and a rank's
    share of the sequences may need fewer batches than another's."""
    totals = {"kl_teacher_student": 0.0, "kl_student_teacher": 0.0, "tokens": 0.0}
    starts = list(range(0, len(sequences), batch_size))
    stand_in = [TokenSequence([pad_id, pad_id], [0, 0])]
    for b in range(max(len(starts), batches)):
        chunk = sequences[starts[b]:starts[b] + batch_size] if b < len(starts) else stand_in
        batch = pad_batch(chunk, pad_id)
        mask = logit_mask(batch["loss_mask"]).to(device_of(student))
        s = shifted_logits(student, on_model_device(batch, student), chunk_size, width)
        t = logits_on_device(shifted_logits(teacher, on_model_device(batch, teacher), chunk_size, width), mask.device)
        totals["kl_teacher_student"] += float(forward_kl(s, t, temperature, mask, chunk_size, reduction="sum"))
        totals["kl_student_teacher"] += float(reverse_kl(s, t, temperature, mask, chunk_size, reduction="sum"))
        totals["tokens"] += float(mask.sum())
    return totals
