"""Knowledge distillation as GKD and the Gemma 3 report define it, as pure tensor functions:
the divergences, the sparse teacher targets, and the one loss a distillation step evaluates
(docs/algorithms.md#gkd and #sampled-logits).

The method. GKD (Agarwal et al., "On-Policy Distillation of Language Models", 2024) trains the
student p_S on a mixture of sequences: with probability lambda (`lambda_on_policy`) the batch is
the student's own samples y ~ p_S(. | x) (no gradient flows through the sampling), otherwise
sequences (x, y) from a dataset or a teacher cache. On every completion position n of y the
teacher p_T is compared with the student:

    L = E_x [ (1 - lambda) E_{y ~ data} D(x, y) + lambda E_{y ~ p_S} D(x, y) ]
    D(x, y) = (1 / |y|) sum_n  d( p_T(. | x, y_<n) , p_S(. | x, y_<n) )

with p = softmax(logits / T) on both sides and the token-level divergence d one of

    forward KL   KL(p_T || p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v))    supervised KD, mode-covering
    reverse KL   KL(p_S || p_T) = sum_v p_S(v) (log p_S(v) - log p_T(v))    mode-seeking
    JSD(beta)    beta KL(p_T || M) + (1 - beta) KL(p_S || M),  M = beta p_T + (1 - beta) p_S;
                 M collapses into one side at beta in {0, 1}, so (GKD section 3.1) JSD(0) is
                 defined as forward KL and JSD(1) as reverse KL.

Sparse targets (the Gemma 3 report's distillation) keep K ids S per position instead of the
teacher's whole distribution, with a target q on S, and train the cross-entropy

    -sum_{v in S} q(v) log p_S(v)        (its gradient is that of KL(q || p_S))

    top_k           S = the teacher's K most likely ids, q = p_T renormalised over S
    sampled         Gemma 3: S = K ids drawn from p_T (without replacement unless asked),
                    q = p_T renormalised over S: the target is biased towards p_T's head
    sampled_counts  K draws with replacement, q(v) = count(v) / K: an unbiased estimate of p_T
                    (RS-KD, arXiv 2503.16870)

log p_S is the log-softmax over the whole vocabulary ("vocab", the default) or renormalised over
S alone ("set"). The distill stage's defaults: lambda 0.5, JSD with beta 0.5, T = 1, K = 256.
`DistillationObjective` names one such choice and `gkd_loss` evaluates it on a batch.

Where the rest of the method lives:
    posttrain/stages/distill.py        the loop: batch choice (on- or off-policy), teacher scoring,
                                       micro-batches, optimizer step, weight sync, evaluation
    posttrain/data.py                  rows to prompt ids and (ids, loss mask) sequences
                                       (`load_distill_rows`)
    posttrain/sequences.py             padding, the logit mask, the teacher/student tokenizer check
    posttrain/teacher_cache.py         the offline cache of sparse targets on disk, written by
    posttrain/stages/distill_cache.py  the stage that scores a dataset with the teacher once
    posttrain/losses/token_logprobs.py chunked log-probabilities and the vocabulary projection

Conventions shared by every function here:
- `student_logits` and `teacher_logits` are `[batch, length, vocab]` (any float dtype) and are
  already aligned: position n holds the distribution over the token at n + 1. Callers shift.
- `mask` is `[batch, length]`; a position counts when the mask is non-zero. Masks come from the
  conversation's loss mask (model turns and their `<end_of_turn>`), never from `ids != pad_id`:
  when pad and end-of-turn share an id that test would drop the stop token and the student
  would never learn to stop.
- `temperature` divides both student and teacher logits before the softmax. On-policy samples
  for the loss must be drawn at the same temperature, or the expectation above is over another
  distribution than the one the loss compares.
- `reduction`: "token_mean" (sum over counted positions / their number, the TRL convention),
  "sequence_mean" (per sequence (1/L) * sum_n, then mean over sequences: GKD's D(x, y) above),
  "sum", or "none" (per-position values, zero where masked).

Memory: the float32 work (log-softmax over the vocabulary) runs `chunk_size` positions at a
time under activation checkpointing, so neither a float32 `[batch, length, vocab]` copy of the
inputs nor the per-chunk softmax outputs are kept for the backward pass; each chunk is
recomputed when its gradient is needed. With a 262k vocabulary and bf16 logits this is the
difference between holding 4 extra full-size tensors and holding one chunk.

Every function that takes logits also takes `ProjectedLogits`: the final hidden states
`[batch, length, hidden]` plus the projection to the vocabulary (lm_head, soft-capping). Then
the logits themselves are never materialised for the whole sequence: only the positions the
mask counts are projected, `chunk_size` at a time, inside the checkpointed chunk, so the
backward pass recomputes each chunk's logits from its hidden states instead of storing them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from posttrain.losses.token_logprobs import chunked_token_logprobs

Reduction = Literal["token_mean", "sequence_mean", "sum", "none"]
Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
Target = Literal["full", "top_k", "sampled", "sampled_counts"]

# Sparse targets mark unused slots with this id (sampling with replacement draws duplicates,
# which are merged, so fewer than K distinct ids can fill a row of width K).
EMPTY_SLOT = -1


@dataclass(frozen=True)
class ProjectedLogits:
    """Logits given lazily: hidden states [batch, length, hidden] and `head` mapping [..., hidden] -> [..., vocab].

    Aligned like logits (position n predicts token n + 1). `head` must include everything the
    model does between its final hidden state and its logits (lm_head, final soft-capping).
    """

    hidden: torch.Tensor
    head: Callable[[torch.Tensor], torch.Tensor]

    @property
    def shape(self) -> torch.Size:
        return self.hidden.shape

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def dim(self) -> int:
        return self.hidden.dim()

    @property
    def vocab_size(self) -> int:
        with torch.no_grad():
            return self.head(self.hidden.new_zeros(1, self.hidden.shape[-1])).shape[-1]

    def detach(self) -> "ProjectedLogits":
        return ProjectedLogits(self.hidden.detach(), self.head)


LogitsLike = torch.Tensor | ProjectedLogits


# --- per-position divergences on one chunk (float32) -------------------------------------------

def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1)


def _forward_kl_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p_T || p_S) per position: sum_v p_T(v) (log p_T(v) - log p_S(v))."""
    log_q, log_p = _log_probs(student, temperature), _log_probs(teacher, temperature)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def _reverse_kl_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p_S || p_T) per position."""
    log_q, log_p = _log_probs(student, temperature), _log_probs(teacher, temperature)
    return F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)


def _jsd_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float, beta: float) -> torch.Tensor:
    """JSD_beta = beta KL(P||M) + (1-beta) KL(Q||M), M = beta P + (1-beta) Q (P teacher, Q student).

    The mixture vanishes into one side at beta in {0, 1}, so those ends are defined as the two
    KLs (GKD, section 3.1) and computed as such by the callers; here 0 < beta < 1.
    """
    log_q, log_p = _log_probs(student, temperature), _log_probs(teacher, temperature)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1.0 - beta)]), dim=0)
    kl_p_m = F.kl_div(log_m, log_p, reduction="none", log_target=True).sum(-1)
    kl_q_m = F.kl_div(log_m, log_q, reduction="none", log_target=True).sum(-1)
    return beta * kl_p_m + (1.0 - beta) * kl_q_m


# --- chunking and reduction ----------------------------------------------------------------------

def _check_shapes(student_logits: LogitsLike, other: LogitsLike, mask: torch.Tensor | None, what: str) -> None:
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits: expected [batch, length, vocab], got shape {tuple(student_logits.shape)}")
    if other.shape[:2] != student_logits.shape[:2]:
        raise ValueError(f"{what}: expected leading shape {tuple(student_logits.shape[:2])} (batch, length) "
                         f"to match student_logits, got {tuple(other.shape)}")
    if mask is not None and mask.shape != student_logits.shape[:2]:
        raise ValueError(f"mask: expected shape {tuple(student_logits.shape[:2])}, got {tuple(mask.shape)}")


def _per_position(row_fn: Callable[..., torch.Tensor], tensors: tuple[torch.Tensor, ...],
                  chunk_size: int | None) -> torch.Tensor:
    """Apply `row_fn` over the length dimension in chunks; returns [batch, length] float32.

    Chunks are checkpointed when a gradient is needed, so the float32 softmax of a chunk lives
    only while that chunk is computed (forward) or recomputed (backward).
    """
    length = tensors[0].shape[1]
    if chunk_size is None or chunk_size >= length:
        return row_fn(*tensors)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    pieces = []
    for start in range(0, length, chunk_size):
        chunk = tuple(t[:, start:start + chunk_size] for t in tensors)
        pieces.append(checkpoint(row_fn, *chunk, use_reentrant=False) if needs_grad else row_fn(*chunk))
    return torch.cat(pieces, dim=1)


def _counted(like: LogitsLike, mask: torch.Tensor | None) -> torch.Tensor:
    """Boolean [batch, length]: the positions whose logits are needed."""
    if mask is None:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    return mask != 0


def _rows(row_fn: Callable[..., torch.Tensor], inputs: tuple[LogitsLike, ...], mask: torch.Tensor | None,
          chunk_size: int | None) -> torch.Tensor:
    """`_per_position` for inputs that may be ProjectedLogits; returns [batch, length] float32.

    With ProjectedLogits only the counted positions are gathered ([N, hidden], N = number of
    counted positions), projected chunk by chunk inside the checkpointed function, and the rows
    are put back at their positions (zero elsewhere, which the reduction ignores anyway).
    """
    if not any(isinstance(t, ProjectedLogits) for t in inputs):
        return _per_position(row_fn, inputs, chunk_size)
    where = _counted(inputs[0], mask)
    heads = [t.head if isinstance(t, ProjectedLogits) else None for t in inputs]
    # [1, N, ...]: the counted positions as one flat sequence, so _per_position chunks them.
    flat = tuple((t.hidden if isinstance(t, ProjectedLogits) else t)[where].unsqueeze(0) for t in inputs)

    def project_then_rows(*chunk: torch.Tensor) -> torch.Tensor:
        return row_fn(*(x if head is None else head(x) for head, x in zip(heads, chunk)))

    rows = _per_position(project_then_rows, flat, chunk_size)[0]
    return torch.zeros(where.shape, dtype=rows.dtype, device=rows.device).masked_scatter(where, rows)


def reduce_positions(values: torch.Tensor, mask: torch.Tensor | None, reduction: Reduction) -> torch.Tensor:
    """Reduce per-position values [batch, length] over the positions that count."""
    weights = torch.ones_like(values) if mask is None else mask.to(values.dtype)
    # where, not multiply: a masked position must contribute zero even if its value is inf/NaN.
    values = torch.where(weights > 0, values * weights, torch.zeros_like(values))
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    if reduction == "token_mean":
        return values.sum() / weights.sum().clamp(min=1.0)
    if reduction == "sequence_mean":
        per_sequence = values.sum(1) / weights.sum(1).clamp(min=1.0)
        has_tokens = weights.sum(1) > 0
        return per_sequence[has_tokens].sum() / has_tokens.sum().clamp(min=1)
    raise ValueError(f"reduction: expected token_mean, sequence_mean, sum or none, got {reduction!r}")


# --- full-distribution divergences ---------------------------------------------------------------

def _divergence(row_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], student_logits: LogitsLike,
                teacher_logits: LogitsLike, mask: torch.Tensor | None, chunk_size: int | None,
                reduction: Reduction) -> torch.Tensor:
    """A per-position divergence `row_fn(student, teacher)` over the counted positions, reduced."""
    _check_shapes(student_logits, teacher_logits, mask, "teacher_logits")
    return reduce_positions(_rows(row_fn, (student_logits, teacher_logits), mask, chunk_size), mask, reduction)


def forward_kl(student_logits: LogitsLike, teacher_logits: LogitsLike, temperature: float = 1.0,
               mask: torch.Tensor | None = None, chunk_size: int | None = None,
               reduction: Reduction = "token_mean") -> torch.Tensor:
    """KL(teacher || student) over the vocabulary at each position (mode-covering; supervised KD)."""
    return _divergence(lambda s, t: _forward_kl_rows(s, t, temperature), student_logits, teacher_logits, mask,
                       chunk_size, reduction)


def reverse_kl(student_logits: LogitsLike, teacher_logits: LogitsLike, temperature: float = 1.0,
               mask: torch.Tensor | None = None, chunk_size: int | None = None,
               reduction: Reduction = "token_mean") -> torch.Tensor:
    """KL(student || teacher) over the vocabulary at each position (mode-seeking)."""
    return _divergence(lambda s, t: _reverse_kl_rows(s, t, temperature), student_logits, teacher_logits, mask,
                       chunk_size, reduction)


def generalized_jsd(student_logits: LogitsLike, teacher_logits: LogitsLike, beta: float = 0.5,
                    temperature: float = 1.0, mask: torch.Tensor | None = None, chunk_size: int | None = None,
                    reduction: Reduction = "token_mean") -> torch.Tensor:
    """Generalised JSD(beta) of GKD; beta = 0 is exactly forward KL(T||S), beta = 1 reverse KL(S||T)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta: expected a value in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, temperature, mask, chunk_size, reduction)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, temperature, mask, chunk_size, reduction)
    return _divergence(lambda s, t: _jsd_rows(s, t, temperature, beta), student_logits, teacher_logits, mask,
                       chunk_size, reduction)


def divergence_loss(divergence: Divergence, student_logits: LogitsLike, teacher_logits: LogitsLike,
                    beta: float = 0.5, temperature: float = 1.0, mask: torch.Tensor | None = None,
                    chunk_size: int | None = None, reduction: Reduction = "token_mean") -> torch.Tensor:
    """Dispatch by name: forward_kl, reverse_kl or jsd (with `beta`)."""
    if divergence == "forward_kl":
        return forward_kl(student_logits, teacher_logits, temperature, mask, chunk_size, reduction)
    if divergence == "reverse_kl":
        return reverse_kl(student_logits, teacher_logits, temperature, mask, chunk_size, reduction)
    if divergence == "jsd":
        return generalized_jsd(student_logits, teacher_logits, beta, temperature, mask, chunk_size, reduction)
    raise ValueError(f"divergence: expected forward_kl, reverse_kl or jsd, got {divergence!r}")


# --- sparse teacher targets: top-k, Gemma 3 sampled logits, count-based ---------------------------

def _sparse_targets(teacher_logits: LogitsLike, temperature: float, chunk_size: int | None, mask: torch.Tensor | None,
                    width: int, draw: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]):
    """Apply `draw` (teacher log-probs [rows, vocab] -> ids int32, probs float16 [rows, width]) chunk by chunk.

    Full logits: every position, `chunk_size` positions of the length at a time. ProjectedLogits:
    only the positions `mask` counts, projected `chunk_size` at a time; the others get
    EMPTY_SLOT ids and zero probability. Either way the teacher's vocabulary-wide float32
    log-probs exist for one chunk at a time and only the sparse targets are kept.
    """
    with torch.no_grad():
        if not isinstance(teacher_logits, ProjectedLogits):
            ids, probs = [], []
            for chunk in _length_chunks(teacher_logits, chunk_size):
                log_p = _log_probs(chunk, temperature)
                chunk_ids, chunk_probs = draw(log_p.reshape(-1, log_p.shape[-1]))
                ids.append(chunk_ids.reshape(*log_p.shape[:-1], width))
                probs.append(chunk_probs.reshape(*log_p.shape[:-1], width))
            return torch.cat(ids, dim=-2), torch.cat(probs, dim=-2)
        where = _counted(teacher_logits, mask)
        hidden = teacher_logits.hidden[where]  # [N, hidden]
        ids = torch.full((*where.shape, width), EMPTY_SLOT, dtype=torch.int32, device=hidden.device)
        probs = torch.zeros((*where.shape, width), dtype=torch.float16, device=hidden.device)
        step = chunk_size or max(hidden.shape[0], 1)
        picked_ids, picked_probs = [], []
        for start in range(0, hidden.shape[0], step):
            chunk_ids, chunk_probs = draw(_log_probs(teacher_logits.head(hidden[start:start + step]), temperature))
            picked_ids.append(chunk_ids)
            picked_probs.append(chunk_probs)
        if picked_ids:
            ids[where] = torch.cat(picked_ids)
            probs[where] = torch.cat(picked_probs)
        return ids, probs


def _vocab_size(logits: LogitsLike) -> int:
    return logits.vocab_size if isinstance(logits, ProjectedLogits) else logits.shape[-1]


def top_k_teacher_targets(teacher_logits: LogitsLike, k: int, temperature: float = 1.0,
                          chunk_size: int | None = None, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's k most likely ids per position with probabilities renormalised over them.

    Returns (ids int32 [..., k], probs float16 [..., k]). `mask` matters only for
    ProjectedLogits (positions it does not count get empty targets).
    """
    if k < 1:
        raise ValueError(f"k: expected at least 1, got {k}")
    k = min(k, _vocab_size(teacher_logits))

    def draw(log_p: torch.Tensor):
        top_log_p, top_ids = log_p.topk(k, dim=-1)
        return top_ids.to(torch.int32), torch.softmax(top_log_p, dim=-1).to(torch.float16)

    return _sparse_targets(teacher_logits, temperature, chunk_size, mask, k, draw)


def sample_teacher_targets(teacher_logits: LogitsLike, k: int = 256, with_replacement: bool = False,
                           temperature: float = 1.0, generator: torch.Generator | None = None,
                           counts: bool = False, chunk_size: int | None = None,
                           mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gemma 3 sampled-logit targets: K ids drawn per position from the teacher.

    Gemma 3 report: "We sample 256 logits per token, weighted by teacher probabilities ... The
    teacher's target distribution is set to zero probability for non-sampled logits, and
    renormalized." So the target is q(v) = p_T(v) / sum_{u in S} p_T(u) on the drawn set S.
    With `counts=True` (needs `with_replacement`), the target is instead the empirical
    frequency c(v) / K of K draws with replacement, an unbiased estimate of p_T (RS-KD,
    arXiv 2503.16870); the renormalised target is biased towards the head of p_T.

    Without replacement the K ids are distinct (Gumbel-top-k, which is exactly sequential
    sampling without replacement); with replacement duplicates are merged, so a row may hold
    fewer than K distinct ids and the rest of it is filled with EMPTY_SLOT ids and zero
    probability. p_T is taken at `temperature`, the same temperature the loss uses.
    With ProjectedLogits only the positions `mask` counts are drawn (the random stream then
    differs from drawing at every position of full logits; the distribution does not).

    Returns (ids int32 [..., K], probs float16 [..., K]); each row of probs sums to 1.
    """
    if k < 1:
        raise ValueError(f"k: expected at least 1, got {k}")
    if counts and not with_replacement:
        raise ValueError("counts=True is the count-based (RS-KD) target and needs with_replacement=True")
    if not with_replacement:
        k = min(k, _vocab_size(teacher_logits))  # without replacement the whole vocabulary is the largest set

    def draw(log_p: torch.Tensor):
        if with_replacement:
            return _draw_with_replacement(log_p, k, counts, generator)
        return _draw_without_replacement(log_p, k, generator)

    return _sparse_targets(teacher_logits, temperature, chunk_size, mask, k, draw)


def _draw_without_replacement(log_p: torch.Tensor, k: int, generator: torch.Generator | None):
    # Gumbel-top-k: the k largest of log p + Gumbel noise are a sample without replacement
    # in the order sequential draws would produce (Kool et al. 2019). Cheaper than
    # torch.multinomial without replacement on wide rows, and works on any device.
    uniform = torch.rand(log_p.shape, generator=generator, device=log_p.device, dtype=log_p.dtype)
    gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20, max=1.0 - 1e-7)))
    ids = (log_p + gumbel).topk(k, dim=-1).indices
    chosen = log_p.gather(-1, ids)
    return ids.to(torch.int32), torch.softmax(chosen, dim=-1).to(torch.float16)


def _draw_with_replacement(log_p: torch.Tensor, k: int, counts: bool, generator: torch.Generator | None):
    draws = torch.multinomial(log_p.exp(), k, replacement=True, generator=generator)  # [rows, k]
    sorted_draws, _ = draws.sort(dim=-1)
    first = torch.ones_like(sorted_draws, dtype=torch.bool)
    first[:, 1:] = sorted_draws[:, 1:] != sorted_draws[:, :-1]
    # Per row: distinct ids first (stable), duplicates become empty slots.
    order = torch.argsort((~first).to(torch.int8), dim=-1, stable=True)
    ids = sorted_draws.gather(-1, order)
    is_first = first.gather(-1, order)
    if counts:
        # Number of draws of each distinct id: positions of run starts in the sorted draws.
        run_id = first.cumsum(-1) - 1  # index of the run each draw belongs to
        run_counts = torch.zeros_like(sorted_draws).scatter_add_(-1, run_id, torch.ones_like(sorted_draws))
        weights = run_counts.to(log_p.dtype) / k  # runs are in sorted order, as are the distinct ids
    else:
        weights = torch.where(is_first, log_p.gather(-1, ids).exp(), torch.zeros((), dtype=log_p.dtype))
        weights = weights / weights.sum(-1, keepdim=True)
    weights = torch.where(is_first, weights, torch.zeros((), dtype=log_p.dtype))
    ids = torch.where(is_first, ids, torch.full_like(ids, EMPTY_SLOT))
    return ids.to(torch.int32), weights.to(torch.float16)


def _length_chunks(logits: torch.Tensor, chunk_size: int | None):
    if logits.dim() < 3 or chunk_size is None:
        yield logits
        return
    for start in range(0, logits.shape[1], chunk_size):
        yield logits[:, start:start + chunk_size]


def _sampled_rows(student: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, temperature: float,
                  normalise_over: str) -> torch.Tensor:
    valid = ids >= 0
    safe_ids = ids.long().clamp(min=0)
    target = probs.float() * valid
    target = target / target.sum(-1, keepdim=True).clamp(min=1e-12)  # fp16 storage: renormalise exactly
    if normalise_over == "vocab":
        log_q = _log_probs(student, temperature).gather(-1, safe_ids)
    else:
        picked = student.float().gather(-1, safe_ids) / temperature
        log_q = F.log_softmax(picked.masked_fill(~valid, float("-inf")), dim=-1)
    return -(target * log_q.masked_fill(~valid, 0.0)).sum(-1)


def sampled_target_loss(student_logits: LogitsLike, ids: torch.Tensor, probs: torch.Tensor,
                        normalise_over: Literal["vocab", "set"] = "vocab", mask: torch.Tensor | None = None,
                        temperature: float = 1.0, chunk_size: int | None = None,
                        reduction: Reduction = "token_mean") -> torch.Tensor:
    """Cross-entropy of the student against a sparse teacher target: -sum_{v in S} q(v) log p_S(v).

    `ids`/`probs` come from `sample_teacher_targets`, `top_k_teacher_targets` or a teacher cache
    (EMPTY_SLOT ids are ignored). `normalise_over="vocab"` (the default; see the module docstring)
    takes log p_S from the softmax over the whole vocabulary; "set" renormalises the student over
    the ids of S only. The value is a cross-entropy (it includes the target's entropy), as in the
    Gemma 3 report; its gradient equals that of KL(q || p_S).
    """
    _check_shapes(student_logits, ids, mask, "ids")
    if ids.shape != probs.shape:
        raise ValueError(f"probs: expected the shape of ids {tuple(ids.shape)}, got {tuple(probs.shape)}")
    if normalise_over not in ("vocab", "set"):
        raise ValueError(f"normalise_over: expected 'vocab' or 'set', got {normalise_over!r}")
    rows = _rows(lambda s, i, p: _sampled_rows(s, i, p, temperature, normalise_over),
                 (student_logits, ids, probs), mask, chunk_size)
    return reduce_positions(rows, mask, reduction)


def sparse_target_entropy(probs: torch.Tensor, mask: torch.Tensor | None = None,
                          reduction: Reduction = "token_mean") -> torch.Tensor:
    """Entropy of sparse targets; cross-entropy minus this is KL(q || p_S) (for logging)."""
    p = probs.float()
    p = p / p.sum(-1, keepdim=True).clamp(min=1e-12)
    rows = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
    return reduce_positions(rows, mask, reduction)


# --- one loss evaluation: the objective a distillation step trains --------------------------------

@dataclass(frozen=True)
class DistillationObjective:
    """One choice of the method's loss (see the module docstring): the full-distribution divergence
    or the sparse target, and the settings both share. `chunk_size` counts positions per float32
    chunk (None: all at once)."""

    divergence: Divergence = "jsd"
    beta: float = 0.5
    temperature: float = 1.0
    target: Target = "full"
    k: int = 256
    with_replacement: bool = False
    student_normalisation: Literal["vocab", "set"] = "vocab"
    reduction: Reduction = "token_mean"
    chunk_size: int | None = None


def teacher_targets(objective: DistillationObjective, teacher_logits: LogitsLike, mask: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse target `objective.target` names (top_k, sampled, sampled_counts), drawn from the
    teacher's logits: (ids int32 [..., K], probs float16 [..., K])."""
    if objective.target == "top_k":
        return top_k_teacher_targets(teacher_logits, objective.k, objective.temperature, objective.chunk_size, mask)
    if objective.target in ("sampled", "sampled_counts"):
        counts = objective.target == "sampled_counts"  # counts / K needs draws with replacement
        return sample_teacher_targets(teacher_logits, objective.k, objective.with_replacement or counts,
                                      objective.temperature, generator, counts, objective.chunk_size, mask)
    raise ValueError(f"target: {objective.target!r} is not a sparse target; expected top_k, sampled or sampled_counts")


def gkd_loss(objective: DistillationObjective, student_logits: LogitsLike, mask: torch.Tensor,
             teacher_logits: LogitsLike | None = None, target_ids: torch.Tensor | None = None,
             target_probs: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The objective's loss on one batch: d(p_T, p_S) over the full distributions for target "full",
    else the cross-entropy towards a sparse target. The sparse target is drawn here from
    `teacher_logits` (with `generator`) unless given as `target_ids`/`target_probs` (a teacher cache's)."""
    if target_ids is None and objective.target != "full":
        target_ids, target_probs = teacher_targets(objective, teacher_logits, mask, generator)
    if target_ids is not None:
        return sampled_target_loss(student_logits, target_ids, target_probs, objective.student_normalisation, mask,
                                   objective.temperature, objective.chunk_size, objective.reduction)
    return divergence_loss(objective.divergence, student_logits, teacher_logits, objective.beta, objective.temperature,
                           mask, objective.chunk_size, objective.reduction)


def token_log_probs(logits: LogitsLike, token_ids: torch.Tensor, temperature: float = 1.0,
                    mask: torch.Tensor | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """log_softmax(logits / T) of `token_ids` [batch, length] at each position (zero where masked).

    One definition for the project: posttrain.losses.token_logprobs.chunked_token_logprobs, with
    ProjectedLogits' hidden states and head, or with full logits as they are. `chunk_size`
    counts tokens (the positions `mask` counts, over the whole batch).
    """
    _check_shapes(logits, token_ids, mask, "token_ids")
    if isinstance(logits, ProjectedLogits):
        hidden, head = logits.hidden, logits.head
    else:
        hidden, head = logits, None
    logp, _ = chunked_token_logprobs(hidden, head, token_ids, temperature, chunk_size, mask=mask)
    return reduce_positions(logp, mask, "none")


__all__ = [
    "EMPTY_SLOT", "ProjectedLogits", "token_log_probs", "forward_kl", "reverse_kl", "generalized_jsd", "divergence_loss", "reduce_positions",
    "top_k_teacher_targets", "sample_teacher_targets", "sampled_target_loss", "sparse_target_entropy",
    "DistillationObjective", "teacher_targets", "gkd_loss",
]
