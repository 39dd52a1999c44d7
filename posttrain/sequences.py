"""Tokenised training sequences for the distillation loops: rows to (ids, loss mask), padding,
the logit mask, and the check that a teacher shares the student's tokenizer.

Used by the `distill` stage and by `distill_cache`, which writes the teacher's targets offline
for the same sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.chat import (ChatFormatError, control_token_ids, normalise_messages, prompt_completion_to_messages,
                            tokenize_conversation, tokenize_prompt)
from posttrain.data import DataError, iter_rows


class TokenizerMismatchError(ValueError):
    """Teacher and student do not share a tokenizer, so their distributions cannot be compared."""


# --- tokenizer check -----------------------------------------------------------------------------

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


@dataclass
class TokenSequence:
    """A tokenised conversation: ids and the loss mask (1 on tokens the student learns to predict)."""

    input_ids: list[int]
    loss_mask: list[int]


def load_distill_rows(path: str, tokenizer, max_length: int) -> tuple[list[list[int]], list[TokenSequence]]:
    """Prompt ids for on-policy sampling and full sequences for off-policy batches."""
    prompts: list[list[int]] = []
    sequences: list[TokenSequence] = []
    for where, row in iter_rows(path):
        try:
            if "messages" in row:
                turns = normalise_messages(row["messages"], where="messages")
                last_user = max(i for i, t in enumerate(turns) if t["role"] == "user")
                prompts.append(tokenize_prompt(tokenizer, turns[:last_user + 1]))
                if turns[-1]["role"] == "assistant":
                    sequences.append(_tokenized(tokenizer, turns, max_length))
            elif "prompt" in row:
                prompts.append(tokenize_prompt(tokenizer, row["prompt"]))
                if "completion" in row:
                    sequences.append(_tokenized(tokenizer, prompt_completion_to_messages(row["prompt"], row["completion"]),
                                                max_length))
            else:
                raise ChatFormatError(f"expected 'prompt' (optionally with 'completion') or 'messages'; the row has {sorted(row)}")
        except ChatFormatError as e:
            raise DataError(f"{where}: {e}") from None
    if not prompts:
        raise DataError(f"{path}: no rows")
    return prompts, sequences


def _tokenized(tokenizer, messages, max_length: int) -> TokenSequence:
    tc = tokenize_conversation(tokenizer, messages)
    return TokenSequence(tc.input_ids[:max_length], tc.loss_mask[:max_length])


def pad_batch(sequences: list[TokenSequence], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and loss mask. Padding never counts, whatever pad_id is."""
    width = max(len(s.input_ids) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        attention[i, :n] = 1
        mask[i, :n] = torch.tensor(s.loss_mask)
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": mask}


def logit_mask(loss_mask: torch.Tensor) -> torch.Tensor:
    """Mask over logit positions: the logits at n predict token n + 1, so they count when that token does."""
    return loss_mask[:, 1:]
