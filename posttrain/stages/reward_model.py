"""`reward_model`: Bradley-Terry reward models and WARM, their weight average (ALGORITHMS.md, section 5).

    1. probe    the SFT model with a scalar head; the head alone is trained on the preference
                pairs (a linear probe: the backbone is frozen), once, and shared by every member
       shared   optional (`shared_steps`, not in the WARM paper): one reward model fine-tuned
                from the probe for a few steps, the common start the members then split from
    2. members  M reward models, each from the SFT weights and the probed head, fine-tuned on
                -log sigmoid(r(x, y_chosen) - r(x, y_rejected)) with its own data order and seed,
                learning rate, dropout or SFT checkpoint (list options; member i takes entry
                i mod the list's length)
    3. average  the uniform mean of the members' weights, head included (posttrain.weights.
                merge_checkpoints, linear): one reward model at inference. Optionally only the best k
                members by held-out pairwise accuracy.

The manifest reports each member's, the average's and the prediction ensemble's held-out
pairwise accuracy (how often r(chosen) > r(rejected) on `eval_dataset`, and on each of
`eval_datasets`).

Why the shared training module (posttrain.training) rather than TRL's RewardTrainer: both give
data parallelism, bf16, LoRA and resume, but WARM needs a head probed once and then shared by M
fine-tunings, a resume point *inside* the member sequence (member 2 at step s), and the same
tokenisation as the scorer (rewards.reward_model.encode_pair: the Gemma IT format through
posttrain.chat, or the start checkpoint's own chat template when its tokenizer has no Gemma
control tokens). With the Trainer each member would be a separate trainer whose checkpoints know
nothing of the others; with the session the whole WARM procedure is one resumable loop.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from posttrain.chat import (TRANSCRIPT_HINT, ChatFormatError, has_gemma_control_tokens, is_blank,
                           preference_conversations)
from posttrain.data import DataError, iter_rows, write_json, write_jsonl
from posttrain.stages.base import StageConfig, StageContext, StageError, StageResult, register_stage
from posttrain.trackers import ReportTo
from posttrain.training import (LoraSpec, TrainingSession, latest_checkpoint, load_checkpoint, save_checkpoint,
                                save_model, token_budget_batches, truncate_metrics)
from posttrain.weights import merge_checkpoints
from rewards.reward_model import MEMBERS_FILE, encode_pair

log = logging.getLogger(__name__)

DONE = "done.json"


class RewardModelStageConfig(StageConfig):
    """Bradley-Terry reward models from an SFT checkpoint; M members and their weight average (WARM)."""

    model: str = Field(description="SFT checkpoint to start from (a causal LM gets a scalar head): "
                       "${stages.NAME.model}, ${models.NAME} or a path.")
    dataset: str = Field(description="Preference rows: `prompt` (text or messages), `chosen`, `rejected` (text or "
                         "assistant messages); without `prompt`, chosen and rejected are whole conversations.")
    eval_dataset: str | None = Field(None, description="Held-out preference rows: pairwise accuracy of every member, "
                                     "the average and the ensemble; needed by average_best and best_member.")
    eval_datasets: dict[str, str] | None = Field(
        None, description="Further held-out preference sets by name (another domain, a benchmark's subsets), each "
        "reported for every member, the average and the ensemble (NAME/member_1/accuracy, NAME/average/accuracy, "
        "...); only eval_dataset chooses the best member.")
    members: int = Field(1, ge=1, description="Number of reward models M fine-tuned from the probed head and averaged.")
    seeds: list[int] | None = Field(None, description="Per-member seed of data order, dropout and head-input noise "
                                    "(member i takes seeds[i mod len]); default: recipe seed + i.")
    learning_rates: list[float] | None = Field(None, description="Per-member learning rates (WARM: 1e-5, 4e-5, 1e-4); "
                                               "default: [learning_rate].")
    dropouts: list[float] | None = Field(None, description="Per-member dropout (WARM: 0.05, 0.1) on attention and on "
                                         "the head's input while training; default: [0.0].")
    member_models: list[str] | None = Field(None, description="Per-member SFT checkpoints of the model's architecture "
                                            "(e.g. checkpoints of one SFT run); default: [model]. The probed head "
                                            "is the same for all.")
    probe_steps: int = Field(50, ge=0, description="Steps training the head alone (backbone frozen) before the members; "
                             "0 keeps the freshly initialised head.")
    probe_learning_rate: float = Field(1e-3, gt=0, description="Learning rate of the linear probe.")
    shared_steps: int = Field(0, ge=0, description="Steps fine-tuning one reward model (all weights, from the SFT "
                              "weights and the probed head, at learning_rate with the first dropout) that every "
                              "member then starts from, instead of the SFT weights: members spawned from a shared "
                              "start stay linearly connected, so their average keeps what each learned. Not in the "
                              "WARM paper (whose members start from pretrained features); for small or weak start "
                              "models. 0: none. Not with member_models.")
    max_steps: int = Field(100, ge=1, description="Optimizer steps per member.")
    batch_size: int = Field(16, ge=1, description="Preference pairs per step (over all processes).")
    learning_rate: float = Field(1e-5, gt=0, description="AdamW learning rate of a member unless learning_rates says.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps of each member's learning rate.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="Each member's (and the shared fine-tune's) learning rate after the warm-up: "
        "constant, or decayed to 0 at its last step (linear, as TRL's RewardTrainer by default; cosine). "
        "The linear probe keeps a constant rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this (None: no clipping).")
    max_length: int = Field(512, ge=8, description="Pairs longer than this keep <bos> and their end (counted).")
    max_tokens_per_microbatch: int | None = Field(
        None, ge=1, description="Bound each forward/backward micro-batch by this many tokens (chosen + rejected of "
        "whole pairs) and accumulate: memory per micro-batch is set by the budget, not batch_size. Held-out "
        "pairs are scored within the same budget, or batch_size pairs at a time without one.")
    on_invalid_row: Literal["error", "skip"] = Field(
        "error", description="An invalid preference row stops the stage with its file and line, or is skipped, "
        "written to skipped.jsonl with the reason and counted (pairs_skipped).")
    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="Add this times (r_chosen + r_rejected)^2 per pair to the loss, which keeps rewards "
        "centred on 0 (Eisenstein et al. 2023; TRL's option of the same name): the Bradley-Terry loss sees only "
        "differences, so a reward's offset otherwise drifts freely, and RL and merges read raw rewards. "
        "None: no such term.")
    label_flip_rate: float = Field(0.0, ge=0, le=1, description="Swap chosen and rejected in this fraction of the "
                                   "training pairs (seeded): label-noise experiments such as WARM's 25%.")
    average_best: int | None = Field(None, ge=1, description="Average only the best k members by held-out accuracy "
                                     "(needs eval_dataset); default: all members.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: forward passes under bfloat16 autocast; "
                                               "weights, optimizer state and the loss stay float32.")
    lora: LoraSpec | None = Field(None, description="Train LoRA adapters (and the head) instead of all weights; each "
                                  "member is saved merged, so members average as plain weights.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (less memory).")
    checkpoint_every: int = Field(50, ge=0, description="Save a resumable checkpoint of the member in training every "
                                  "this many steps (0: only finished members are kept).")
    keep_checkpoints: int = Field(2, ge=1, description="Keep only the newest this many checkpoints of a member.")
    logging_steps: int = Field(10, ge=1, description="Log loss and batch accuracy every this many steps.")
    report_to: ReportTo = Field(default_factory=list, description="Extra trackers: tensorboard, wandb, trackio "
                                "(the `trackers` extra installs them).")

    @model_validator(mode="after")
    def _check(self):
        for key in ("seeds", "learning_rates", "dropouts", "member_models"):
            if getattr(self, key) is not None and not getattr(self, key):
                raise ValueError(f"{key}: give at least one value, or leave it out")
        if self.learning_rates and any(lr <= 0 for lr in self.learning_rates):
            raise ValueError(f"learning_rates: every rate must be > 0, got {self.learning_rates}")
        if self.dropouts and any(not 0 <= p < 1 for p in self.dropouts):
            raise ValueError(f"dropouts: every dropout must lie in [0, 1), got {self.dropouts}")
        if self.lr_scheduler != "constant":
            for key, steps in (("max_steps", self.max_steps), ("shared_steps", self.shared_steps)):
                if steps and self.warmup_steps >= steps:
                    raise ValueError(f"warmup_steps: {self.warmup_steps} is not below {key} ({steps}); lr_scheduler "
                                     f"{self.lr_scheduler} decays the rate after the warm-up, so it needs steps after it")
        for name in self.eval_datasets or {}:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ValueError(f"eval_datasets: {name!r} is not a usable set name (letters, digits, '_', '.', '-'); "
                                 f"it becomes part of the manifest's metric names")
        if self.shared_steps and self.member_models:
            raise ValueError("shared_steps: the members start from the shared fine-tune, so they cannot also start "
                             "from member_models; use one or the other")
        # Lists cycle (member i takes entry i mod len), so short lists can give two members the
        # very same run: identical weights, no diversity for the average, twice the compute.
        seen: dict[tuple, int] = {}
        for i, plan in enumerate(member_plans(self, seed=0)):  # the recipe seed only shifts default seeds
            key = (plan.seed, plan.learning_rate, plan.dropout, plan.start)
            if key in seen:
                raise ValueError(
                    f"members: member {seen[key] + 1} and member {i + 1} would be the same run (seed {plan.seed}, "
                    f"learning rate {plan.learning_rate}, dropout {plan.dropout}, start {plan.start}), as the "
                    "lists cycle (member i takes entry i mod len); give more seeds (or leave seeds out), or "
                    "other learning_rates, dropouts or member_models")
            seen[key] = i
        if self.average_best is not None:
            if self.eval_dataset is None:
                raise ValueError("average_best: choosing the best members needs eval_dataset (held-out pairs)")
            if self.average_best > self.members:
                raise ValueError(f"average_best: {self.average_best} is more than members={self.members}")
        return self


@dataclass
class MemberPlan:
    """One fine-tuning from the probed head: a member, or the shared start (`shared_steps`)."""

    name: str  # member_1, ... or shared
    seed: int
    learning_rate: float
    dropout: float
    start: str  # SFT checkpoint (or the shared fine-tune)
    steps: int
    step_offset: int  # global step of its step 0 in metrics.jsonl


def member_plans(config: RewardModelStageConfig, seed: int) -> list[MemberPlan]:
    """What diversifies each member: entry i mod len of each list option."""
    def pick(values, i, default):
        return values[i % len(values)] if values else default

    first = config.probe_steps + config.shared_steps
    return [MemberPlan(f"member_{i + 1}", pick(config.seeds, i, seed + i),
                       pick(config.learning_rates, i, config.learning_rate), pick(config.dropouts, i, 0.0),
                       pick(config.member_models, i, config.model), config.max_steps, first + i * config.max_steps)
            for i in range(config.members)]


def shared_plan(config: RewardModelStageConfig, seed: int) -> MemberPlan:
    """The shared fine-tune: the stage's learning rate and first dropout, a data order of its own."""
    own_seed = random.Random(f"rm-shared:{seed}").randrange(2**31)
    return MemberPlan("shared", own_seed, config.learning_rate, (config.dropouts or [0.0])[0], config.model,
                      config.shared_steps, config.probe_steps)


# --- data ---------------------------------------------------------------------------------------

def load_pairs(path: str, tokenizer, max_length: int, skipped: list[dict] | None = None,
               margins: list[float] | None = None) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(chosen ids, rejected ids) per preference row, and how many were cut to max_length.

    A row without a non-empty `chosen` and `rejected`, whose two sides are not two answers to
    one conversation, or whose conversation is not valid in the chat format, is refused with its
    file and line; with `skipped` given it is recorded there instead ({where, reason, row}).
    With `margins` given, each kept pair's `margin` (0.0 for a row without one) is appended to it.
    """
    pairs, truncated = [], 0
    gemma_format = has_gemma_control_tokens(tokenizer)
    for where, row in iter_rows(path):
        try:
            chosen, rejected = _encode_row(where, row, tokenizer, gemma_format)
            margin = _margin_of(where, row)
        except DataError as e:
            if skipped is None:
                raise
            skipped.append({"where": where, "reason": str(e).removeprefix(f"{where}: "), "row": row})
            continue
        if len(chosen) > max_length or len(rejected) > max_length:
            truncated += 1
            chosen, rejected = (ids[:1] + ids[len(ids) - max_length + 1:] if len(ids) > max_length else ids
                                for ids in (chosen, rejected))
        pairs.append((chosen, rejected))
        if margins is not None:
            margins.append(margin)
    if not pairs:
        raise DataError(f"{path}: no preference rows" + (f" ({len(skipped)} invalid, skipped)" if skipped else ""))
    return pairs, truncated


def _encode_row(where: str, row: dict, tokenizer, gemma_format: bool) -> tuple[list[int], list[int]]:
    """One preference row's two token sequences, whole; DataError naming `where` when it is not a pair."""
    for side in ("chosen", "rejected"):
        if side not in row:
            raise DataError(f"{where}: a preference row needs 'prompt', 'chosen' and 'rejected'; "
                            f"'{side}' is missing (the row has {sorted(row)})")
        if is_blank(row[side]):
            raise DataError(f"{where}: '{side}' is empty; a preference pair needs two non-empty answers")
    prompt = row.get("prompt")
    if prompt is None and not all(isinstance(row[s], list) for s in ("chosen", "rejected")):
        raise DataError(f"{where}: 'prompt' is missing; without it, 'chosen' and 'rejected' must be whole "
                        "conversations (lists of {role, content})"
                        + (f"; {TRANSCRIPT_HINT}" if any(isinstance(row[s], str) for s in ("chosen", "rejected")) else ""))
    if prompt is not None and is_blank(prompt):
        raise DataError(f"{where}: 'prompt' is empty")
    try:
        conversations = preference_conversations(prompt, row["chosen"], row["rejected"])
        chosen, rejected = (encode_pair(tokenizer, None, messages, 10**9, gemma_format) for messages in conversations)
    except ChatFormatError as e:
        raise DataError(f"{where}: {e}") from None
    return chosen, rejected


def _margin_of(where: str, row: dict) -> float:
    """The row's `margin` (how much better chosen is, e.g. a rating difference; Llama 2's margin
    loss, TRL's `margin` column), 0.0 without one; anything but a finite number (or a number's
    text, as a CSV cell holds it) is refused."""
    margin = row.get("margin")
    if margin is None:
        return 0.0
    if isinstance(margin, str):
        try:
            margin = float(margin.strip())
        except ValueError:
            pass
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise DataError(f"{where}: 'margin' must be a finite number (how much chosen is preferred), got {margin!r}")
    return float(margin)


def flip_labels(pairs: list, rate: float, seed: int) -> tuple[list, int]:
    """Swap chosen and rejected in a `rate` fraction of the pairs, chosen by a seeded stream."""
    if not rate:
        return pairs, 0
    rng = random.Random(f"rm-flip:{seed}")
    out, flipped = [], 0
    for c, r in pairs:
        if rng.random() < rate:
            out.append((r, c))
            flipped += 1
        else:
            out.append((c, r))
    return out, flipped


def pair_indices_for_step(num_pairs: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Pairs of step `step`: consecutive slices of per-epoch shuffles, a function of (seed, step)
    only, so a resumed member sees exactly the batches it would have seen."""
    out = []
    cache: dict[int, list[int]] = {}
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(position, num_pairs)
        if epoch not in cache:
            order = list(range(num_pairs))
            random.Random(f"rm-data:{seed}:{epoch}").shuffle(order)
            cache[epoch] = order
        out.append(cache[epoch][i])
    return out


# --- the model ----------------------------------------------------------------------------------

def load_reward_model(path: str, pad_token_id: int, dropout: float = 0.0):
    """A sequence classifier with one output from a checkpoint (a causal LM's head is replaced by a
    fresh scalar head). `dropout` sets the attention dropout of architectures that have one."""
    import transformers
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from posttrain.modeling import freeze_vision_tower, set_pad_token_id, text_config

    config = AutoConfig.from_pretrained(path)
    config.num_labels = 1
    # Set on the config, not passed as keyword arguments: a composite checkpoint (Gemma 3 4B and
    # up: a language model with a vision tower) hands unknown keywords to the model's __init__,
    # and its classifier reads the pad id and the attention dropout from the text part.
    set_pad_token_id(config, pad_token_id)
    text = text_config(config)
    if hasattr(text, "attention_dropout"):
        text.attention_dropout = dropout
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # a causal LM checkpoint has no head: expected, not news
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=torch.float32)
    finally:
        transformers.logging.set_verbosity(verbosity)
    freeze_vision_tower(model)  # preference text gives a composite trunk's vision tower nothing to learn
    return model


def parameter_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape of the reward model a checkpoint would become, built on the
    meta device from its config alone (no weights are read)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path)
    config.num_labels = 1
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_member_models(model: str, member_models: list[str]) -> None:
    """Refuse, before anything trains, a `member_models` entry whose reward model would not have
    exactly the tensors of `model`'s: its members could not be averaged with the others (the head
    fitting is not enough: a deeper model of the same width takes the probed head)."""
    expected = parameter_shapes(model)
    for i, path in enumerate(member_models):
        if path == model:
            continue
        try:
            shapes = parameter_shapes(path)
        except (OSError, ValueError) as e:
            raise StageError(f"member_models[{i}]: {path!r} is not a loadable checkpoint ({e})") from None
        missing, extra = sorted(expected.keys() - shapes.keys()), sorted(shapes.keys() - expected.keys())
        resized = [f"{k} {shapes[k]} instead of {expected[k]}" for k in expected if k in shapes
                   and shapes[k] != expected[k]]
        if missing or extra or resized:
            what = "; ".join(part for part in (
                f"{len(missing)} tensors missing (first: {missing[0]})" if missing else "",
                f"{len(extra)} tensors not in `model` (first: {extra[0]})" if extra else "",
                f"{len(resized)} of another shape (first: {resized[0]})" if resized else "") if part)
            raise StageError(f"member_models[{i}]: {path!r} does not have the architecture of `model` ({model!r}): "
                             f"{what}; members are averaged tensor by tensor, so every entry must be a checkpoint "
                             "of the same architecture (e.g. of the same SFT run)")


def head_of(model) -> torch.nn.Module:
    """The scalar head of a sequence classifier (`score` in Llama/Gemma/Qwen, `classifier` elsewhere)."""
    for name in ("score", "classifier"):
        module = getattr(model, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise StageError(f"reward_model: {type(model).__name__} has no 'score' or 'classifier' head to train")


def _head_input_dropout(model, p: float, seed: int):
    """Dropout on the head's input while training (a classifier dropout); a hook, so the saved
    weights stay a plain checkpoint. Its own generator keeps members' masks reproducible."""
    if not p:
        return None
    generator = {}

    def hook(module, args):
        if not module.training:
            return None
        (hidden,) = args
        gen = generator.get(hidden.device)
        if gen is None:
            gen = generator[hidden.device] = torch.Generator(device=hidden.device).manual_seed(seed)
        keep = torch.empty(hidden.shape, device=hidden.device).bernoulli_(1 - p, generator=gen)
        return (hidden * keep.to(hidden.dtype) / (1 - p),)

    return head_of(model).register_forward_pre_hook(hook)


def _pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):  # right padding: the classifier reads the last non-pad token
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


def rewards_of(model, seqs: list[list[int]], pad_id: int, device) -> torch.Tensor:
    """The scalar reward of each sequence, shape [len(seqs)] (float32)."""
    ids, mask = _pad(seqs, pad_id, device)
    return model(input_ids=ids, attention_mask=mask).logits[:, 0].float()


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coefficient: float | None = None) -> torch.Tensor:
    """Per pair: -log sigmoid(r_chosen - r_rejected - margin) (summed by the caller; margin 0 is
    the plain Bradley-Terry loss), plus center_coefficient * (r_chosen + r_rejected)^2 when given."""
    difference = r_chosen - r_rejected if margin is None else r_chosen - r_rejected - margin
    loss = -torch.nn.functional.logsigmoid(difference)
    if center_coefficient:
        loss = loss + center_coefficient * (r_chosen + r_rejected) ** 2
    return loss


@torch.no_grad()
def score_pairs(session: TrainingSession, model, pairs, pad_id: int, budget: int | None,
                pairs_per_batch: int) -> tuple[list[float], list[float]]:
    """(r_chosen, r_rejected) of every pair, over all ranks: each scores every W-th pair, in
    micro-batches of `budget` tokens, or of `pairs_per_batch` pairs without a budget (a held-out
    set in one forward pass would not fit in memory). Longest pairs first, so that pairs of like
    length share a batch (less padding) and a batch too large for memory fails at once."""
    was_training = model.training
    model.eval()
    idx = list(range(session.rank, len(pairs), session.world_size))
    idx.sort(key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    local: list[tuple[int, float, float]] = []
    sizes = [len(pairs[i][0]) + len(pairs[i][1]) for i in idx]
    batches = (token_budget_batches(sizes, budget) if budget is not None
               else [slice(start, start + pairs_per_batch) for start in range(0, len(idx), pairs_per_batch)])
    for mb in batches:
        chunk = idx[mb]
        seqs = [pairs[i][0] for i in chunk] + [pairs[i][1] for i in chunk]
        with session.autocast():
            r = rewards_of(model, seqs, pad_id, session.device).cpu()
        local += [(i, float(r[k]), float(r[len(chunk) + k])) for k, i in enumerate(chunk)]
    everything = sorted(session.gather_lists(local))
    model.train(was_training)
    return [c for _, c, _ in everything], [r for _, _, r in everything]


def ensemble_scores(members: list[tuple[list[float], list[float]]]) -> tuple[list[float], list[float]]:
    """The prediction ensemble's (r_chosen, r_rejected) per pair: the mean of the members' rewards."""
    chosen = [sum(values) / len(members) for values in zip(*(c for c, _ in members))]
    rejected = [sum(values) / len(members) for values in zip(*(r for _, r in members))]
    return chosen, rejected


def pairwise_accuracy(r_chosen, r_rejected) -> float:
    """Fraction of pairs ranked right; a tie counts half."""
    if not r_chosen:
        return float("nan")
    return sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(r_chosen, r_rejected)) / len(r_chosen)


# --- one training run (the probe, or a member) --------------------------------------------------

@dataclass
class _Run:
    """What distinguishes the probe from a member's fine-tuning."""

    label: str
    steps: int
    learning_rate: float
    seed: int
    step_offset: int  # global step of this run's step 0 in metrics.jsonl


def _train(config: RewardModelStageConfig, ctx: StageContext, session: TrainingSession, model, run: _Run,
           pairs, margins: list[float] | None, pad_id: int, run_dir: Path, metrics, advance, resumable: bool) -> dict:
    """Bradley-Terry steps on `pairs` (with per-pair `margins`, or None) with the session's model;
    resumes from run_dir's checkpoint."""
    start = 0
    checkpoint = latest_checkpoint(run_dir) if resumable else None
    if checkpoint is not None:
        start = load_checkpoint(session, checkpoint, {"model": model})["step"]
        log.info("%s: resuming %s at step %d from %s", ctx.name, run.label, start, checkpoint)
    if ctx.is_main:
        truncate_metrics(ctx.stage_dir / "metrics.jsonl", run.step_offset + start)
    advance(start)
    # Dropout masks continue from a function of (seed, step), and differ between ranks: each rank
    # holds other pairs, whose masks should be drawn independently, not repeated rank to rank.
    torch.manual_seed(run.seed * 1_000_003 + start + 7_919 * session.rank)
    budget = config.max_tokens_per_microbatch
    last: dict[str, float] = {"resumed_from_step": start}
    window: list[tuple[float, float, int]] = []
    for step in range(start, run.steps):
        rows = session.shard(pair_indices_for_step(len(pairs), step, config.batch_size, run.seed), "batch_size")
        total = session.all_sum(len(rows))  # the global number of pairs: the loss is their mean
        # Summed on the device and read once per step: a read per micro-batch would wait for the GPU each time.
        loss_sum = torch.zeros((), device=session.device)
        correct = torch.zeros((), dtype=torch.long, device=session.device)
        sizes = [len(pairs[i][0]) + len(pairs[i][1]) for i in rows]
        for mb in token_budget_batches(sizes, budget):
            chunk = rows[mb]
            seqs = [pairs[i][0] for i in chunk] + [pairs[i][1] for i in chunk]
            with session.autocast():
                r = rewards_of(model, seqs, pad_id, session.device)
            r_c, r_r = r[:len(chunk)], r[len(chunk):]
            margin = (torch.tensor([margins[i] for i in chunk], dtype=r.dtype, device=r.device)
                      if margins is not None else None)
            loss = bradley_terry_loss(r_c, r_r, margin, config.center_rewards_coefficient).sum() / total
            loss.backward()
            loss_sum += loss.detach()
            correct += (r_c > r_r).sum()
        result = session.step(config.max_grad_norm)
        loss_all = session.all_sum(float(loss_sum))
        if not math.isfinite(loss_all) or not result.finite:
            raise StageError(f"reward_model: {run.label} step {step + 1}: non-finite loss or gradient "
                             f"(loss {loss_all}); lower the learning rate")
        window.append((loss_all, session.all_sum(int(correct)), total))
        advance(1)
        if (step + 1) % config.logging_steps == 0 or step + 1 == run.steps:
            last = {"resumed_from_step": start, "loss": sum(w[0] for w in window) / len(window),
                    "train_accuracy": sum(w[1] for w in window) / sum(w[2] for w in window)}
            metrics.log(run.step_offset + step + 1, phase=run.label, **last, grad_norm=result.grad_norm,
                        lr=session.learning_rate)
            window = []
        if (resumable and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0
                and step + 1 < run.steps):
            save_checkpoint(session, run_dir, step + 1, {"model": model}, {"run": run.label}, config.keep_checkpoints)
    return last


def _lora(model, spec: LoraSpec):
    from peft import LoraConfig, get_peft_model

    # SEQ_CLS: peft also trains (and saves) a full copy of the head, next to the adapters.
    return get_peft_model(model, LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                                            target_modules=spec.target_modules, task_type="SEQ_CLS"))


# --- the stage ----------------------------------------------------------------------------------

@register_stage("reward_model", RewardModelStageConfig, outputs=("model", "members", "best_member"), distributed=True,
                output_requires={"best_member": ("eval_dataset", "held-out pairs choose the best member; "
                                                 "without them it would be member 1")})
def run_reward_model(config: RewardModelStageConfig, ctx: StageContext) -> StageResult:
    """Bradley-Terry reward models: a linear-probed head, M fine-tuned members, their weight average (WARM)."""
    from posttrain.modeling import load_tokenizer

    stage_dir = Path(ctx.stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    session = TrainingSession(config.precision, ctx.seed)
    session.shard(range(config.batch_size), "batch_size")  # fails early unless it splits over the ranks
    tokenizer = load_tokenizer(config.model)
    pad_id = tokenizer.pad_token_id
    skipped, eval_skipped = ([], []) if config.on_invalid_row == "skip" else (None, None)
    margins: list[float] | None = []
    pairs, truncated = load_pairs(config.dataset, tokenizer, config.max_length, skipped, margins)
    with_margin = sum(m != 0.0 for m in margins)
    if not with_margin:
        margins = None  # the plain Bradley-Terry loss
    # A flipped pair keeps its margin: the noise is in which side was preferred, not in by how much.
    pairs, flipped = flip_labels(pairs, config.label_flip_rate, ctx.seed)
    eval_pairs = (load_pairs(config.eval_dataset, tokenizer, config.max_length, eval_skipped)[0]
                  if config.eval_dataset else None)
    # Every further held-out set is read now, so that a bad row in one stops the stage before anything trains.
    further_sets = {name: load_pairs(path, tokenizer, config.max_length, eval_skipped)[0]
                    for name, path in (config.eval_datasets or {}).items()}
    skipped = (skipped or []) + (eval_skipped or [])  # each record names its file
    if skipped and ctx.is_main:
        write_jsonl(stage_dir / "skipped.jsonl", skipped)
        log.warning("%s: skipped %d invalid preference rows; see %s", ctx.name, len(skipped), stage_dir / "skipped.jsonl")
    if config.member_models:
        check_member_models(config.model, config.member_models)
    plans = member_plans(config, ctx.seed)
    total_steps = config.probe_steps + config.shared_steps + config.members * config.max_steps
    budget = config.max_tokens_per_microbatch
    # Pairs whose two sides are the same tokens (a tie in the source data, or sides that differ
    # only before the truncated start) carry no preference: kept, as they cost nothing but a
    # constant loss, and counted so that a data set full of them is noticed.
    identical = sum(chosen == rejected for chosen, rejected in pairs)
    summary: dict[str, Any] = {"pairs": len(pairs), "pairs_truncated": truncated, "pairs_identical": identical,
                               "pairs_skipped": len(skipped), "pairs_with_margin": with_margin,
                               "labels_flipped": flipped,
                               **session.describe(config.batch_size, "pairs")}

    with ctx.metrics(config.report_to) as metrics, ctx.progress(total_steps, "reward models") as advance:
        # 1. The linear probe: the head alone on the frozen SFT features, shared by every member.
        probe_file = stage_dir / "probe" / "head.pt"
        if not probe_file.exists():
            # The fresh head is initialised from torch's global generator: seed it here, so the
            # probe (and every member built on it) depends on the stage's seed alone, not on what
            # ran before in this process.
            torch.manual_seed(ctx.seed)
            model = load_reward_model(config.model, pad_id)
            if config.probe_steps:
                model.requires_grad_(False)
                head_of(model).requires_grad_(True)
                session.prepare(model, config.probe_learning_rate)
                probe = _Run("probe", config.probe_steps, config.probe_learning_rate, ctx.seed, 0)
                probed = _train(config, ctx, session, model, probe, pairs, margins, pad_id, stage_dir / "probe",
                                metrics, advance, resumable=False)
                summary.update({f"probe/{k}": v for k, v in probed.items()})
            if ctx.is_main:
                probe_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = probe_file.with_suffix(".tmp")
                torch.save({k: v.detach().cpu() for k, v in head_of(model).state_dict().items()}, tmp)
                tmp.replace(probe_file)
            session.barrier()
            del model
            session.release()
        else:
            advance(config.probe_steps)
        head = torch.load(probe_file, weights_only=True, map_location="cpu")

        # 1b. The shared fine-tune, if any: the members start from it (its weights and its head).
        if config.shared_steps:
            plan = shared_plan(config, ctx.seed)
            shared_dir = stage_dir / "shared"
            record = _train_member(config, ctx, session, plan, head, pairs, margins, eval_pairs, tokenizer, pad_id,
                                   shared_dir, metrics, advance, budget)
            if "eval_accuracy" in record:
                summary["shared/accuracy"] = record["eval_accuracy"]
            head = {k: v.detach().cpu() for k, v in
                    head_of(load_reward_model(str(shared_dir / "model"), pad_id)).state_dict().items()}
            plans = [replace(p, start=str(shared_dir / "model")) for p in plans]

        # 2. The members, one after the other; a finished one is kept (done.json) and never redone.
        done: list[dict] = []
        for plan in plans:
            done.append(_train_member(config, ctx, session, plan, head, pairs, margins, eval_pairs, tokenizer, pad_id,
                                      stage_dir / "members" / plan.name, metrics, advance, budget))

    # 3. The average (of all members, or of the best k on held-out pairs).
    accuracies = [d.get("eval_accuracy") for d in done]
    chosen = list(range(len(done)))
    if config.average_best is not None:
        chosen = sorted(sorted(chosen, key=lambda i: -accuracies[i])[:config.average_best])
    member_dirs = [str(stage_dir / "members" / p.name / "model") for p in plans]
    best = max(range(len(done)), key=lambda i: accuracies[i]) if eval_pairs else 0
    average_dir = stage_dir / "model"
    if ctx.is_main:
        # Every tensor, the head included, is the uniform mean over the averaged members, read from
        # their checkpoints and written one tensor at a time: memory for one tensor per member, not
        # for M whole models (members keep dropout 0 in their configs, which the average copies).
        merge_checkpoints(None, [member_dirs[i] for i in chosen], average_dir, "linear")
        write_json(stage_dir / "members" / MEMBERS_FILE,
                   {"members": member_dirs, "averaged": [i + 1 for i in chosen], "best_member": best + 1,
                    "eval_accuracy": accuracies})
    if eval_pairs:  # held-out pairwise accuracy ("/accuracy": the run summary shows these)
        summary.update({f"{p.name}/accuracy": a for p, a in zip(plans, accuracies)})
    summary.update({f"{p.name}/{k}": v for p, d in zip(plans, done) for k, v in d.get("train", {}).items()})
    summary.update({"averaged_members": [i + 1 for i in chosen], "best_member": best + 1})
    session.barrier()  # the average is on disk
    if eval_pairs or further_sets:
        model = load_reward_model(str(average_dir), pad_id).to(session.device)  # scored only
    if eval_pairs:
        r_c, r_r = score_pairs(session, model, eval_pairs, pad_id, budget, config.batch_size)
        ensemble = ensemble_scores([(done[i]["eval_chosen"], done[i]["eval_rejected"]) for i in chosen])
        member_accs = [accuracies[i] for i in chosen]
        summary.update({"average/accuracy": pairwise_accuracy(r_c, r_r),
                        "ensemble/accuracy": pairwise_accuracy(*ensemble),
                        "members/accuracy_mean": sum(member_accs) / len(member_accs),
                        "members/accuracy_best": max(accuracies)})
    if further_sets:
        summary.update(_further_accuracies(session, further_sets, plans, member_dirs, chosen, model, pad_id, budget,
                                           config.batch_size))
    session.barrier()
    session.close()
    return StageResult(outputs={"model": str(average_dir), "members": str(stage_dir / "members"),
                                "best_member": member_dirs[best]}, metrics=summary)


def _train_member(config, ctx, session, plan: MemberPlan, head, pairs, margins, eval_pairs, tokenizer, pad_id,
                  member_dir: Path, metrics, advance, budget) -> dict:
    """Fine-tune one member (or the shared start) from its start checkpoint and `head`; save it and its record.
    One finished before (done.json) is kept as it is and never redone."""
    record = _read_done(member_dir)
    if record is not None:
        advance(plan.steps)
        return record
    torch.manual_seed(plan.seed)
    model = load_reward_model(plan.start, pad_id, plan.dropout)
    try:
        head_of(model).load_state_dict(head)
    except RuntimeError as e:
        raise StageError(f"member_models: {plan.name} starts from {plan.start!r}, which does not fit the probed "
                         f"head ({e}); the members must share the architecture of `model`") from None
    hook = _head_input_dropout(model, plan.dropout, plan.seed + 7_919 * session.rank)  # per rank, as in _train
    trained = _lora(model, config.lora) if config.lora is not None else model
    session.prepare(trained, plan.learning_rate, config.weight_decay, config.warmup_steps,
                    gradient_checkpointing=config.gradient_checkpointing, schedule=config.lr_scheduler,
                    total_steps=plan.steps)
    run = _Run(plan.name, plan.steps, plan.learning_rate, plan.seed, plan.step_offset)
    last = _train(config, ctx, session, trained, run, pairs, margins, pad_id, member_dir, metrics, advance,
                  resumable=True)
    if hook is not None:
        hook.remove()
    final = trained.merge_and_unload() if config.lora is not None else trained
    if hasattr(final.config, "attention_dropout"):
        final.config.attention_dropout = 0.0  # the saved reward model scores without dropout
    record: dict[str, Any] = {"name": plan.name, "seed": plan.seed, "learning_rate": plan.learning_rate,
                              "dropout": plan.dropout, "start": plan.start, "train": last}
    if eval_pairs:
        r_c, r_r = score_pairs(session, final, eval_pairs, pad_id, budget, config.batch_size)
        record.update(eval_accuracy=pairwise_accuracy(r_c, r_r), eval_chosen=r_c, eval_rejected=r_r)
        metrics.log(run.step_offset + plan.steps, phase=plan.name, eval_accuracy=record["eval_accuracy"])
    if ctx.is_main:
        save_model(final, tokenizer, member_dir / "model")
        write_json(member_dir / DONE, record)  # last: from here on the member is finished
        shutil.rmtree(member_dir / "checkpoints", ignore_errors=True)
    session.barrier()
    del model, trained, final
    session.release()  # before the next member is loaded
    return record


def _further_accuracies(session: TrainingSession, sets: dict[str, list], plans: list[MemberPlan],
                        member_dirs: list[str], averaged: list[int], average, pad_id: int,
                        budget: int | None, pairs_per_batch: int) -> dict[str, Any]:
    """Pairwise accuracy on each further held-out set of every member, the average and the
    ensemble of the averaged members, each member loaded once for all sets."""
    scored: dict[str, list] = {name: [] for name in sets}
    for member_dir in member_dirs:
        member = load_reward_model(member_dir, pad_id).to(session.device)
        for name, pairs in sets.items():
            scored[name].append(score_pairs(session, member, pairs, pad_id, budget, pairs_per_batch))
        del member
    out: dict[str, Any] = {}
    for name, pairs in sets.items():
        out[f"{name}/pairs"] = len(pairs)
        out.update({f"{name}/{plan.name}/accuracy": pairwise_accuracy(*s) for plan, s in zip(plans, scored[name])})
        out[f"{name}/average/accuracy"] = pairwise_accuracy(*score_pairs(session, average, pairs, pad_id, budget,
                                                                          pairs_per_batch))
        out[f"{name}/ensemble/accuracy"] = pairwise_accuracy(*ensemble_scores([scored[name][i] for i in averaged]))
    return out


def _read_done(member_dir: Path) -> dict | None:
    try:
        record = json.loads((member_dir / DONE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return record if (member_dir / "model").is_dir() else None

