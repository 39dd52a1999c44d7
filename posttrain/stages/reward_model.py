"""`reward_model`: Bradley-Terry reward models and WARM, their weight average (docs/algorithms.md#bradley-terry, #warm).

    1. probe    the SFT model with a scalar head; the head alone is trained on the preference
                pairs (a linear probe: the backbone is frozen), once, and shared by every member
       shared   optional (`shared_steps`, not in the WARM paper): one reward model fine-tuned
                from the probe for a few steps, the common start the members then split from
    2. members  M reward models, each from the SFT weights and the probed head, fine-tuned on
                the Bradley-Terry loss (posttrain.losses.preference) with its own data order and
                seed, learning rate, dropout or SFT checkpoint (list options; member i takes entry
                i mod the list's length)
    3. average  the uniform mean of the members' weights, head included (posttrain.weights.
                merge_checkpoints, linear): one reward model at inference. Optionally only the best k
                members by held-out pairwise accuracy.

The manifest reports each member's, the average's and the prediction ensemble's held-out
pairwise accuracy (how often r(chosen) > r(rejected) on `eval_dataset`, and on each of
`eval_datasets`). A finished member (or shared start) is marked by its own manifest
(posttrain.manifests, written last), and is never trained again when the stage resumes.

Why the shared training module (posttrain.training) rather than TRL's RewardTrainer: both give
data parallelism, bf16, LoRA and resume, but WARM needs a head probed once and then shared by M
fine-tunings, a resume point *inside* the member sequence (member 2 at step s), and the same
tokenisation as the scorer (posttrain.chat.encode_pair, which rewards.reward_model is handed:
the Gemma IT format, or the start checkpoint's own chat template when its tokenizer has no Gemma
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
from typing import Any, Callable, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from posttrain.data import load_preference_pairs, write_json, write_jsonl
from posttrain.losses.preference import bradley_terry_loss, ensemble_scores, pairwise_accuracy
from posttrain.manifests import completed, mark_complete
from posttrain.stages.base import StageContext, StageError, StageResult, register_stage
from posttrain.stages.options import TrainingOptions
from posttrain.training import (LoraSpec, TrainingSession, checkpoint_due, resume_latest, save_checkpoint,
                                save_model, token_budget_batches, truncate_metrics)
from posttrain.sharded_save import save_hf_checkpoint
from posttrain.sharding import full_tensor, is_sharded
from posttrain.weights import merge_checkpoints
from rewards.reward_model import MEMBERS_FILE

log = logging.getLogger(__name__)

# A member's completion marker before members had manifests; still read, so such runs resume.
LEGACY_DONE = "done.json"


class RewardModelStageConfig(TrainingOptions):
    """Bradley-Terry reward models from an SFT checkpoint; M members and their weight average (WARM).

    The shared training options (posttrain.stages.options) apply to each member and to the
    shared fine-tune: `max_steps` optimizer steps each, `learning_rate` unless `learning_rates`
    says, a checkpoint of the member in training every `checkpoint_every` steps (finished members
    are kept whole), a `lora` adapter merged into each saved member so that members average as
    plain weights. The linear probe has its own steps and learning rate.
    """

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
    batch_size: int = Field(16, ge=1, description="Preference pairs per step (over all processes).")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="Each member's (and the shared fine-tune's) learning rate after the warm-up: "
        "constant, or decayed to 0 at its last step (linear, as TRL's RewardTrainer by default; cosine). "
        "The linear probe keeps a constant rate.")
    max_length: int = Field(512, ge=8, description="Pairs longer than this keep <bos> and their end (counted).")
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
    logging_steps: int = Field(10, ge=1, description="Log loss and batch accuracy every this many steps.")

    # Gained with TrainingOptions: left out of the hashed config at its default (StageConfig.hash_form).
    _HASHED_ONLY_WHEN_SET: ClassVar[dict[str, Any]] = {
        **TrainingOptions._HASHED_ONLY_WHEN_SET, "shard_optimizer": False}

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
    # A sharded model runs as many forward passes on every rank (see TrainingSession.even_micro_batches):
    # a rank with fewer batches scores the first pair again and keeps nothing of it.
    extra = session.all_max(len(batches)) - len(batches) if is_sharded(model) else 0
    for mb in batches + [None] * extra:
        chunk = idx[mb] if mb is not None else [0]
        seqs = [pairs[i][0] for i in chunk] + [pairs[i][1] for i in chunk]
        with session.autocast():
            r = rewards_of(model, seqs, pad_id, session.device).cpu()
        if mb is not None:
            local += [(i, float(r[k]), float(r[len(chunk) + k])) for k, i in enumerate(chunk)]
    everything = sorted(session.gather_lists(local))
    model.train(was_training)
    return [c for _, c, _ in everything], [r for _, _, r in everything]


def _lora(model, spec: LoraSpec):
    from peft import get_peft_model

    # SEQ_CLS: peft also trains (and saves) a full copy of the head, next to the adapters.
    return get_peft_model(model, spec.to_peft_config(model, task_type="SEQ_CLS"))


# --- one training run (the probe, the shared start, or a member) ---------------------------------

@dataclass
class PreferenceData:
    """The stage's pairs: training pairs (flipped where label_flip_rate says) and held-out sets."""

    pairs: list[tuple[list[int], list[int]]]
    margins: list[float] | None  # None: no row has a margin, the plain Bradley-Terry loss
    eval_pairs: list | None  # eval_dataset's pairs: the members' accuracies and the best member
    further_sets: dict[str, list]  # eval_datasets' pairs by name


@dataclass
class TrainingState:
    """What every run of the stage (the probe, the shared fine-tune, each member) trains and logs with."""

    config: RewardModelStageConfig
    ctx: StageContext
    session: TrainingSession
    data: PreferenceData
    tokenizer: Any
    pad_id: int
    metrics: Any  # the stage's metrics logger
    advance: Callable[[int], None]  # the progress bar, in steps


@dataclass
class _Run:
    """What distinguishes the probe from a member's fine-tuning."""

    label: str
    steps: int
    learning_rate: float
    seed: int
    step_offset: int  # global step of this run's step 0 in metrics.jsonl


def _resume(state: TrainingState, model, run: _Run, run_dir: Path, resumable: bool) -> int:
    """The step `run` starts at: its newest checkpoint's (model, optimizer, schedule and RNG
    states restored), or 0. Either way, metrics logged after that step are dropped: they are
    about to be redone."""
    metrics_path = Path(state.ctx.stage_dir) / "metrics.jsonl"
    resumed = (resume_latest(state.session, run_dir, {"model": model}, metrics_path, run.step_offset) if resumable
               else {"step": 0, "path": None})
    if resumed["path"] is not None:
        log.info("%s: resuming %s at step %d from %s", state.ctx.name, run.label, resumed["step"], resumed["path"])
    elif state.ctx.is_main:
        truncate_metrics(metrics_path, run.step_offset)
    return resumed["step"]


def _bradley_terry_step(state: TrainingState, model, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Forward and backward of this rank's `rows` (pair indices), in micro-batches within the token
    budget; returns the summed loss and the pairs ranked right (on the device) and the global pair
    count, by which the loss is normalised (the loss is the mean over all ranks' pairs)."""
    config, session, pairs, margins = state.config, state.session, state.data.pairs, state.data.margins
    total = session.all_sum(len(rows))
    # Summed on the device and read once per step: a read per micro-batch would wait for the GPU each time.
    loss_sum = torch.zeros((), device=session.device)
    correct = torch.zeros((), dtype=torch.long, device=session.device)
    sizes = [len(pairs[i][0]) + len(pairs[i][1]) for i in rows]
    for mb, real in session.even_micro_batches(token_budget_batches(sizes, config.max_tokens_per_microbatch)):
        chunk = rows[mb]
        seqs = [pairs[i][0] for i in chunk] + [pairs[i][1] for i in chunk]
        with session.autocast():
            r = rewards_of(model, seqs, state.pad_id, session.device)
        r_c, r_r = r[:len(chunk)], r[len(chunk):]
        margin = (torch.tensor([margins[i] for i in chunk], dtype=r.dtype, device=r.device)
                  if margins is not None else None)
        loss = bradley_terry_loss(r_c, r_r, margin, config.center_rewards_coefficient).sum() / total
        if not real:
            (loss * 0.0).backward()  # a repeat that keeps a sharded model's collectives in step (fsdp)
            continue
        loss.backward()
        loss_sum += loss.detach()
        correct += (r_c > r_r).sum()
    return loss_sum, correct, total


def _train(state: TrainingState, model, run: _Run, run_dir: Path, resumable: bool) -> dict:
    """Bradley-Terry steps on the training pairs with the session's model; resumes from run_dir's
    checkpoint when `resumable`. Returns the last logged figures."""
    config, session = state.config, state.session
    start = _resume(state, model, run, run_dir, resumable)
    state.advance(start)
    # Dropout masks continue from a function of (seed, step), and differ between ranks: each rank
    # holds other pairs, whose masks should be drawn independently, not repeated rank to rank.
    torch.manual_seed(run.seed * 1_000_003 + start + 7_919 * session.rank)
    last: dict[str, float] = {"resumed_from_step": start}
    window: list[tuple[float, float, int]] = []
    for step in range(start, run.steps):
        rows = session.shard(pair_indices_for_step(len(state.data.pairs), step, config.batch_size, run.seed),
                             "batch_size")
        loss_sum, correct, total = _bradley_terry_step(state, model, rows)
        result = session.step(config.max_grad_norm)
        loss_all = session.all_sum(float(loss_sum))
        if not math.isfinite(loss_all) or not result.finite:
            raise StageError(f"reward_model: {run.label} step {step + 1}: non-finite loss or gradient "
                             f"(loss {loss_all}); lower the learning rate")
        window.append((loss_all, session.all_sum(int(correct)), total))
        state.advance(1)
        if (step + 1) % config.logging_steps == 0 or step + 1 == run.steps:
            last = {"resumed_from_step": start, "loss": sum(w[0] for w in window) / len(window),
                    "train_accuracy": sum(w[1] for w in window) / sum(w[2] for w in window)}
            state.metrics.log(run.step_offset + step + 1, phase=run.label, **last, grad_norm=result.grad_norm,
                              lr=session.learning_rate)
            window = []
        if resumable and checkpoint_due(step + 1, config.checkpoint_every, run.steps):
            save_checkpoint(session, run_dir, step + 1, {"model": model}, {"run": run.label}, config.keep_checkpoints)
    return last


# --- the stage ----------------------------------------------------------------------------------

@register_stage("reward_model", RewardModelStageConfig, outputs=("model", "members", "best_member"), distributed=True,
                output_requires={"best_member": ("eval_dataset", "held-out pairs choose the best member; "
                                                 "without them it would be member 1")})
def run_reward_model(config: RewardModelStageConfig, ctx: StageContext) -> StageResult:
    """Bradley-Terry reward models: a linear-probed head, M fine-tuned members, their weight average (WARM)."""
    from posttrain.modeling import load_tokenizer

    stage_dir = Path(ctx.stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    session = TrainingSession(config.precision, ctx.seed, config.sharding, config.fsdp_offload)
    session.shard(range(config.batch_size), "batch_size")  # fails early unless it splits over the ranks
    tokenizer = load_tokenizer(config.model)
    data, summary = _load_data(config, ctx, tokenizer)
    if config.member_models:
        check_member_models(config.model, config.member_models)
    plans = member_plans(config, ctx.seed)
    summary.update(session.describe(config.batch_size, "pairs"))
    total_steps = config.probe_steps + config.shared_steps + config.members * config.max_steps

    with ctx.metrics(config.report_to) as metrics, ctx.progress(total_steps, "reward models") as advance:
        state = TrainingState(config, ctx, session, data, tokenizer, tokenizer.pad_token_id, metrics, advance)
        head = _probe(state, summary)  # 1. the linear probe, shared by every member
        if config.shared_steps:  # 1b. the shared fine-tune: the members start from it
            head, plans = _shared_start(state, head, plans, summary)
        # 2. The members, one after the other; a finished one (its manifest says complete) is never redone.
        records = [_train_member(state, plan, head, stage_dir / "members" / plan.name) for plan in plans]

    summary.update(_average(state, plans, records))  # 3. the weight average of all members, or of the best k
    summary.update(session.describe(config.batch_size, "pairs"))  # now with the members' parameter bytes
    session.close()
    member_dirs = _member_model_dirs(stage_dir, plans)
    return StageResult(outputs={"model": str(stage_dir / "model"), "members": str(stage_dir / "members"),
                                "best_member": member_dirs[summary["best_member"] - 1]}, metrics=summary)


def _load_data(config: RewardModelStageConfig, ctx: StageContext, tokenizer) -> tuple[PreferenceData, dict]:
    """Every preference set, read before anything trains (a bad row in any of them stops the stage
    first), with the counts the manifest reports; refused rows go to skipped.jsonl in skip mode."""
    skip = config.on_invalid_row == "skip"
    train = load_preference_pairs(config.dataset, tokenizer, config.max_length, skip)
    held_out = (load_preference_pairs(config.eval_dataset, tokenizer, config.max_length, skip)
                if config.eval_dataset else None)
    further = {name: load_preference_pairs(path, tokenizer, config.max_length, skip)
               for name, path in (config.eval_datasets or {}).items()}
    skipped = [r for loaded in (train, held_out, *further.values()) if loaded is not None for r in loaded.skipped]
    if skipped and ctx.is_main:  # each record names its file
        path = Path(ctx.stage_dir) / "skipped.jsonl"
        write_jsonl(path, skipped)
        log.warning("%s: skipped %d invalid preference rows; see %s", ctx.name, len(skipped), path)
    with_margin = sum(m != 0.0 for m in train.margins)
    # A flipped pair keeps its margin: the noise is in which side was preferred, not in by how much.
    pairs, flipped = flip_labels(train.pairs, config.label_flip_rate, ctx.seed)
    data = PreferenceData(pairs, train.margins if with_margin else None, held_out.pairs if held_out else None,
                          {name: loaded.pairs for name, loaded in further.items()})
    # Pairs whose two sides are the same tokens (a tie in the source data, or sides that differ
    # only before the truncated start) carry no preference: kept, as they cost nothing but a
    # constant loss, and counted so that a data set full of them is noticed.
    identical = sum(chosen == rejected for chosen, rejected in pairs)
    summary = {"pairs": len(pairs), "pairs_truncated": train.truncated, "pairs_identical": identical,
               "pairs_skipped": len(skipped), "pairs_with_margin": with_margin, "labels_flipped": flipped}
    return data, summary


def _probe(state: TrainingState, summary: dict) -> dict[str, torch.Tensor]:
    """The linear probe: the head alone trained on the frozen SFT features, saved once
    (probe/head.pt) and read back by every member; a probe saved before is not redone."""
    config, ctx, session = state.config, state.ctx, state.session
    probe_file = Path(ctx.stage_dir) / "probe" / "head.pt"
    if probe_file.exists():
        state.advance(config.probe_steps)
        return torch.load(probe_file, weights_only=True, map_location="cpu")
    # The fresh head is initialised from torch's global generator: seed it here, so the probe (and
    # every member built on it) depends on the stage's seed alone, not on what ran before in this process.
    torch.manual_seed(ctx.seed)
    model = load_reward_model(config.model, state.pad_id)
    if config.probe_steps:
        model.requires_grad_(False)
        head_of(model).requires_grad_(True)
        session.prepare(model, config.probe_learning_rate)
        probe = _Run("probe", config.probe_steps, config.probe_learning_rate, ctx.seed, 0)
        probed = _train(state, model, probe, probe_file.parent, resumable=False)
        summary.update({f"probe/{k}": v for k, v in probed.items()})
    # Whole tensors (under fsdp gathered from the shards, on every rank).
    head = {k: full_tensor(v).detach().cpu() for k, v in head_of(model).state_dict().items()}
    if ctx.is_main:
        probe_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = probe_file.with_suffix(".tmp")
        torch.save(head, tmp)
        tmp.replace(probe_file)
    session.barrier()
    del model
    session.release()
    return torch.load(probe_file, weights_only=True, map_location="cpu")


def _shared_start(state: TrainingState, head: dict, plans: list[MemberPlan],
                  summary: dict) -> tuple[dict[str, torch.Tensor], list[MemberPlan]]:
    """The shared fine-tune (shared_steps), trained like a member; the members then start from its
    weights and its head."""
    plan = shared_plan(state.config, state.ctx.seed)
    shared_dir = Path(state.ctx.stage_dir) / "shared"
    record = _train_member(state, plan, head, shared_dir)
    if "eval_accuracy" in record:
        summary["shared/accuracy"] = record["eval_accuracy"]
    shared_model = load_reward_model(str(shared_dir / "model"), state.pad_id)
    head = {k: v.detach().cpu() for k, v in head_of(shared_model).state_dict().items()}
    return head, [replace(p, start=str(shared_dir / "model")) for p in plans]


def _train_member(state: TrainingState, plan: MemberPlan, head: dict, member_dir: Path) -> dict:
    """Fine-tune one member (or the shared start) from its start checkpoint and `head`; save it and
    mark it complete. One finished before is kept as it is and never redone."""
    config, session = state.config, state.session
    record = finished_member(member_dir)
    if record is not None:
        state.advance(plan.steps)
        return record
    torch.manual_seed(plan.seed)
    model = load_reward_model(plan.start, state.pad_id, plan.dropout)
    try:
        head_of(model).load_state_dict(head)
    except RuntimeError as e:
        raise StageError(f"member_models: {plan.name} starts from {plan.start!r}, which does not fit the probed "
                         f"head ({e}); the members must share the architecture of `model`") from None
    hook = _head_input_dropout(model, plan.dropout, plan.seed + 7_919 * session.rank)  # per rank, as in _train
    trained = _lora(model, config.lora) if config.lora is not None else model
    session.prepare(trained, plan.learning_rate, config.weight_decay, config.warmup_steps,
                    gradient_checkpointing=config.gradient_checkpointing, shard_optimizer=config.shard_optimizer,
                    schedule=config.lr_scheduler, total_steps=plan.steps)
    run = _Run(plan.name, plan.steps, plan.learning_rate, plan.seed, plan.step_offset)
    last = _train(state, trained, run, member_dir, resumable=True)
    if hook is not None:
        hook.remove()
    sharded = is_sharded(trained)
    # Under fsdp the adapter is merged as the model is written (posttrain.sharded_save), not here.
    final = trained.merge_and_unload() if config.lora is not None and not sharded else trained
    hf_config = (final.get_base_model() if hasattr(final, "get_base_model") else final).config
    if hasattr(hf_config, "attention_dropout"):
        hf_config.attention_dropout = 0.0  # the saved reward model scores without dropout
    record = {"name": plan.name, "seed": plan.seed, "learning_rate": plan.learning_rate, "dropout": plan.dropout,
              "start": plan.start, "train": last}
    if state.data.eval_pairs:
        r_c, r_r = score_pairs(session, final, state.data.eval_pairs, state.pad_id, config.max_tokens_per_microbatch,
                               config.batch_size)
        record.update(eval_accuracy=pairwise_accuracy(r_c, r_r), eval_chosen=r_c, eval_rejected=r_r)
        state.metrics.log(run.step_offset + plan.steps, phase=plan.name, eval_accuracy=record["eval_accuracy"])
    if sharded:
        save_hf_checkpoint(final, state.tokenizer, member_dir / "model", state.ctx.is_main)
    elif state.ctx.is_main:
        save_model(final, state.tokenizer, member_dir / "model")
    if state.ctx.is_main:
        mark_complete(member_dir, kind="reward_model member", **record)  # last: from here on the member is finished
        shutil.rmtree(member_dir / "checkpoints", ignore_errors=True)
    session.barrier()
    del model, trained, final
    session.release()  # before the next member is loaded
    return record


def finished_member(member_dir: Path) -> dict | None:
    """The record of a member (or shared start) finished before, None if it is not: its manifest
    says complete, or, in a run directory from before members had manifests, its done.json holds
    the record; either way its model must be on disk."""
    record = completed(member_dir)
    if record is None:
        try:
            record = json.loads((member_dir / LEGACY_DONE).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
    return record if (member_dir / "model").is_dir() else None


def _member_model_dirs(stage_dir: Path, plans: list[MemberPlan]) -> list[str]:
    return [str(stage_dir / "members" / p.name / "model") for p in plans]


def _average(state: TrainingState, plans: list[MemberPlan], records: list[dict]) -> dict[str, Any]:
    """Average the members (all, or the best `average_best` by held-out accuracy) into the stage's
    model, list them in members/members.json and score the average, the members and the
    prediction ensemble on the held-out sets."""
    config, session, data = state.config, state.session, state.data
    stage_dir = Path(state.ctx.stage_dir)
    accuracies = [r.get("eval_accuracy") for r in records]
    chosen = list(range(len(records)))
    if config.average_best is not None:
        chosen = sorted(sorted(chosen, key=lambda i: -accuracies[i])[:config.average_best])
    member_dirs = _member_model_dirs(stage_dir, plans)
    best = max(range(len(records)), key=lambda i: accuracies[i]) if data.eval_pairs else 0
    if state.ctx.is_main:
        # Every tensor, the head included, is the uniform mean over the averaged members, read from
        # their checkpoints and written one tensor at a time: memory for one tensor per member, not
        # for M whole models (members keep dropout 0 in their configs, which the average copies).
        merge_checkpoints(None, [member_dirs[i] for i in chosen], stage_dir / "model", "linear")
        write_json(stage_dir / "members" / MEMBERS_FILE,
                   {"members": member_dirs, "averaged": [i + 1 for i in chosen], "best_member": best + 1,
                    "eval_accuracy": accuracies})
    summary: dict[str, Any] = {}
    if data.eval_pairs:  # held-out pairwise accuracy ("/accuracy": the run summary shows these)
        summary.update({f"{p.name}/accuracy": a for p, a in zip(plans, accuracies)})
    summary.update({f"{p.name}/{k}": v for p, r in zip(plans, records) for k, v in r.get("train", {}).items()})
    summary.update({"averaged_members": [i + 1 for i in chosen], "best_member": best + 1})
    session.barrier()  # the average is on disk
    if data.eval_pairs or data.further_sets:
        summary.update(_held_out_accuracies(state, plans, records, chosen))
    session.barrier()
    return summary


def _held_out_accuracies(state: TrainingState, plans: list[MemberPlan], records: list[dict],
                         chosen: list[int]) -> dict[str, Any]:
    """The average's and the ensemble's accuracy on eval_dataset (beside the members' mean and
    best), and every model's on the further sets."""
    config, session, data = state.config, state.session, state.data
    stage_dir = Path(state.ctx.stage_dir)
    budget = config.max_tokens_per_microbatch
    average = _scored_only(session, load_reward_model(str(stage_dir / "model"), state.pad_id))
    out: dict[str, Any] = {}
    if data.eval_pairs:
        accuracies = [r.get("eval_accuracy") for r in records]
        r_c, r_r = score_pairs(session, average, data.eval_pairs, state.pad_id, budget, config.batch_size)
        ensemble = ensemble_scores([(records[i]["eval_chosen"], records[i]["eval_rejected"]) for i in chosen])
        member_accs = [accuracies[i] for i in chosen]
        out.update({"average/accuracy": pairwise_accuracy(r_c, r_r),
                    "ensemble/accuracy": pairwise_accuracy(*ensemble),
                    "members/accuracy_mean": sum(member_accs) / len(member_accs),
                    "members/accuracy_best": max(accuracies)})
    if data.further_sets:
        out.update(_further_accuracies(state, plans, chosen, average))
    return out


def _scored_only(session: TrainingSession, model):
    """A reward model that is only scored: sharded under fsdp, else on the device."""
    return session.place_frozen(model, "accelerator", "reward_model") if session.fsdp else model.to(session.device)


def _further_accuracies(state: TrainingState, plans: list[MemberPlan], averaged: list[int], average) -> dict[str, Any]:
    """Pairwise accuracy on each further held-out set of every member, the average and the
    ensemble of the averaged members, each member loaded once for all sets."""
    session, sets = state.session, state.data.further_sets

    def score(model, pairs):
        return score_pairs(session, model, pairs, state.pad_id, state.config.max_tokens_per_microbatch,
                           state.config.batch_size)

    scored: dict[str, list] = {name: [] for name in sets}
    for member_dir in _member_model_dirs(Path(state.ctx.stage_dir), plans):
        member = _scored_only(session, load_reward_model(member_dir, state.pad_id))
        for name, pairs in sets.items():
            scored[name].append(score(member, pairs))
        del member
    out: dict[str, Any] = {}
    for name, pairs in sets.items():
        out[f"{name}/pairs"] = len(pairs)
        out.update({f"{name}/{plan.name}/accuracy": pairwise_accuracy(*s) for plan, s in zip(plans, scored[name])})
        out[f"{name}/average/accuracy"] = pairwise_accuracy(*score(average, pairs))
        out[f"{name}/ensemble/accuracy"] = pairwise_accuracy(*ensemble_scores([scored[name][i] for i in averaged]))
    return out
