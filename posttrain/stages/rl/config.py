"""The `rl` stage's options: RLOO's, the rollouts', and BOND's in a block of their own.

The shared training options (optimizer, schedule, precision, memory, LoRA, checkpoints,
trackers) come from `posttrain.stages.options.TrainingOptions`. BOND's options live in `bond:`
(`BondOptions`), present exactly when the algorithm is jbond or bond; recipes written before the
block existed put them directly under the stage (`jeffreys_beta: 0.5`), and those keys are
moved into it on load.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from posttrain.losses.policy import Aggregation
from posttrain.rollout import RolloutConfig
from posttrain.stages.options import TrainingOptions
from posttrain.training import PLACEMENT_HELP, ChunkSize
from rewards.combine import FaultPolicy, RewardSpec


class BondOptions(BaseModel):
    """J-BOND / BOND (Sessa et al. 2024; docs/algorithms.md#bond): how the Jeffreys divergence
    weighs its terms and how the EMA anchor samples."""

    model_config = ConfigDict(extra="forbid")

    jeffreys_beta: float = Field(0.5, ge=0, le=1, description="Weight of the backward term (1: backward only, "
                                 "mode seeking; 0: forward only, best-of-N SFT); the paper's 0.5.")
    kl_gamma: float = Field(0.0, ge=0, description="Weight of an extra KL(pi || pi_anchor) gradient on the policy "
                            "samples (the paper's gamma, 0 in its main runs).")
    bond_n: int = Field(8, ge=2, description="bond: N, the anchor samples per prompt (best-of-N and quantile "
                        "samples); jbond always takes 2.")
    anchor_rollout: Literal["swap", "engine"] = Field(
        "swap", description="How the EMA anchor samples. swap: the anchor's weights are loaded into the one "
        "rollout engine for its samples and the policy's after them; engine: a second engine holds the anchor. "
        "Both push two weight sets per step; swap saves the second engine's start-up and memory "
        "(bench/bench_bond.py).")


BOND_KEYS = tuple(BondOptions.model_fields)


class RLStageConfig(TrainingOptions):
    """REINFORCE/RLOO on rollouts with weighted rewards and a KL penalty to an EMA anchor (WARP stage 1),
    or J-BOND / BOND against the same EMA anchor (`algorithm`, `bond`)."""

    # Added after run directories were made with this stage (StageConfig.hash_form).
    _HASHED_ONLY_WHEN_SET: ClassVar[dict[str, Any]] = {
        **TrainingOptions._HASHED_ONLY_WHEN_SET, "rewards[].tolerate_all_faults": False}


    model: str = Field(description="Policy to start from (and the initial anchor): ${stages.NAME.model}, ${models.NAME} or a path.")
    dataset: str = Field(description="Prompt rows: `prompt` (text or messages) plus the columns the rewards read "
                         "(`answer`, `tests`, `instruction_id_list`/`kwargs`, ...).")
    eval_dataset: str | None = Field(None, description="Held-out prompt rows scored with greedy decoding and the same "
                                     "rewards before training, every eval_every steps, and after training.")
    eval_max_prompts: int = Field(128, ge=1, description="Score at most this many eval prompts (the first ones).")
    eval_every: int = Field(0, ge=0, description="Evaluate every this many steps (0: only before and after training).")
    rewards: list[RewardSpec] = Field(description="Reward functions and their weights, e.g. [{name: math, weight: 1.0}]; "
                                      "the combined reward is their weighted sum (see rewards.combine).")
    fault_policy: FaultPolicy = Field("zero", description="A reward function that raises, times out or returns a "
                                      "non-number: zero (that value counts as 0), skip (the sample is left out of the "
                                      "update), fail (stop the run). Faults are counted per reward in the metrics.")
    num_generations: int = Field(4, ge=1, description="Completions sampled per prompt (n); RLOO needs n >= 2.")
    prompts_per_step: int = Field(8, ge=1, description="Prompts per optimizer step (batch = prompts_per_step x n sequences).")
    beta: float = Field(0.1, ge=0, description="KL coefficient in r_beta = r - beta * log(pi/pi_anchor); 0 turns the penalty off.")
    anchor_ema: float = Field(0.01, ge=0, le=1, description="mu in theta_anchor <- (1-mu) theta_anchor + mu theta after "
                              "every step; 0 keeps the starting model as a fixed anchor (jbond/bond: 0.02 unless set).")
    baseline: Literal["rloo", "none"] = Field("rloo", description="rloo: subtract the mean r_beta of the prompt's other "
                                              "samples; none: plain REINFORCE on r_beta.")
    loss_aggregation: Aggregation = Field("token_mean", description="How per-token losses are averaged: token_mean "
                                          "(over all completion tokens of the step), sequence_mean (GRPO), sequence_sum "
                                          "(textbook REINFORCE); see posttrain.losses.policy.reinforce_loss.")
    temperature: float = Field(0.9, gt=0, description="Sampling temperature (WARP: 0.9); logprobs use the same T.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1: off; keep 1 so logprobs stay exact).")
    max_new_tokens: int = Field(64, ge=1, description="Completion length limit; longer completions are cut (counted as truncated).")
    max_prompt_tokens: int = Field(256, ge=1, description="Prompts longer than this are dropped before training, with a count in the metrics.")
    importance_clip: float | None = Field(None, gt=0, description="If set, weight each token by min(pi_trainer/pi_engine, "
                                          "this) to correct for engine/trainer numerical mismatch (truncated importance sampling).")
    grad_accum: int = Field(1, ge=1, description="Split each step's prompts into this many micro-batches (whole prompt "
                            "groups) accumulated into one update; prompts_per_step must be divisible by it. "
                            "max_tokens_per_microbatch, when set, decides instead.")
    logprob_chunk_size: ChunkSize = Field(
        "auto", description="Completion positions projected to the vocabulary at a time when scoring (recomputed in "
        "backward), so no [batch, length, vocabulary] tensor is ever built. auto: as many as fit 2**25 logits "
        "(128 MiB in float32), which keeps a chunk's memory the same whatever the vocabulary; null: the model's "
        "full logits at once.")
    anchor_placement: str = Field("accelerator", description="Where the anchor and start model live: " + PLACEMENT_HELP + ".")
    max_nan_steps: int = Field(3, ge=1, description="A non-finite loss or gradient skips the step; this many in a row stops the run.")
    log_kl_to_start: bool = Field(True, description="Also score samples under the starting model to log the KL to it "
                                  "(one extra forward per step when anchor_ema > 0).")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Rollout engine settings, including the "
                                   "logprob drift thresholds (drift_warn_threshold, drift_stop_threshold).")
    algorithm: Literal["rloo", "jbond", "bond"] = Field(
        "rloo", description="rloo: REINFORCE with a leave-one-out baseline and a KL penalty (WARP stage 1). jbond: "
        "J-BOND (Sessa et al. 2024, Algorithm 2): per prompt one policy sample and two EMA-anchor samples, loss "
        "(1 - jeffreys_beta) * NLL of the better anchor sample + jeffreys_beta * policy gradient on r_J = -log 16 "
        "when the policy sample is worse than both, minus its log-ratio to the anchor. bond: the same with bond_n "
        "anchor samples, the forward term on their best and the backward reward log p_le (Monte Carlo quantile over "
        "them) with KL coefficient 1/(bond_n - 1). See posttrain.losses.bond for the tie rule.")
    bond: BondOptions | None = Field(
        None, description="jbond/bond only: jeffreys_beta, kl_gamma, bond_n, anchor_rollout (below); "
        "left out, the defaults. The keys may also stand directly under the stage, as in older recipes.")

    @model_validator(mode="before")
    @classmethod
    def _bond_keys_into_their_block(cls, data: Any) -> Any:
        """Move BOND's keys written directly under the stage into `bond`.

        Such keys come from recipes written before the block existed, and from the resolved configs
        of runs made then, which write every field out, BOND's defaults included, whatever the
        algorithm. On algorithm rloo those written-out defaults are dropped; any other value is an
        error, since rloo would ignore it."""
        if not isinstance(data, dict) or not any(k in data for k in BOND_KEYS):
            return data
        data = dict(data)
        flat = {k: data.pop(k) for k in BOND_KEYS if k in data}
        if data.get("algorithm", "rloo") == "rloo":
            for key, value in flat.items():
                if value != BondOptions.model_fields[key].default:
                    raise ValueError(f"{key}: applies to algorithm jbond or bond; this stage runs algorithm rloo")
            return data
        block = data.get("bond")
        if isinstance(block, BaseModel):
            block = block.model_dump()
        both = sorted(set(flat) & set(block or {}))
        if both:
            raise ValueError(f"{both[0]}: given both under the stage and in its bond block; keep the bond block's")
        data["bond"] = {**flat, **(block or {})}
        return data

    @model_validator(mode="after")
    def _check(self):
        if self.algorithm == "rloo":
            if self.bond is not None:
                raise ValueError("bond: BOND's options apply to algorithm jbond or bond; this stage runs algorithm "
                                 "rloo (set algorithm: jbond or bond, or remove the bond block)")
        else:
            self._check_bond()
        if self.baseline == "rloo" and self.num_generations < 2:
            raise ValueError("num_generations: the rloo baseline needs at least 2 samples per prompt; "
                             "raise num_generations or set baseline: none")
        if self.prompts_per_step % self.grad_accum:
            raise ValueError(f"grad_accum: prompts_per_step={self.prompts_per_step} must be divisible by "
                             f"grad_accum={self.grad_accum} (micro-batches hold whole prompt groups)")
        if not self.rewards:
            raise ValueError("rewards: name at least one reward, e.g. [{name: math, weight: 1.0}]")
        return self

    def _is_default(self, name: str) -> bool:
        # rloo's own options on a BOND run are checked against their defaults, not against "was it set":
        # the runner re-validates the resolved config with every field written out.
        return getattr(self, name) == type(self).model_fields[name].default

    def _check_bond(self) -> None:
        if self.bond is None:
            self.bond = BondOptions()
        if not self._is_default("num_generations"):
            raise ValueError(f"num_generations: applies to algorithm rloo; {self.algorithm} samples one policy "
                             f"completion and {self.anchor_samples} anchor completions per prompt"
                             + (" (set bond.bond_n)" if self.algorithm == "bond" else ""))
        if not self._is_default("beta"):
            raise ValueError(f"beta: the KL coefficient of algorithm rloo; {self.algorithm} fixes its KL coefficient "
                             "at 1/(N-1) (1 for jbond) and weighs its two terms with bond.jeffreys_beta")
        if self.algorithm == "jbond" and self.bond.bond_n != BondOptions.model_fields["bond_n"].default:
            raise ValueError("bond_n: jbond always takes two anchor samples (N = 2); use algorithm: bond for other N")
        if "anchor_ema" not in self.model_fields_set:
            self.anchor_ema = 0.02  # J-BOND's eta (ablations 0.01-0.1)

    @property
    def anchor_samples(self) -> int:
        """Anchor completions per prompt: 2 for jbond, bond.bond_n for bond, none for rloo."""
        return {"rloo": 0, "jbond": 2, "bond": self.bond.bond_n if self.bond else 0}[self.algorithm]

    @property
    def completions_per_prompt(self) -> int:
        return self.num_generations if self.algorithm == "rloo" else 1 + self.anchor_samples

    @classmethod
    def hash_form(cls, resolved: dict) -> dict:
        """The resolved config in the form the runner hashes: BOND's options written out flat, as
        they were before the `bond` block, so a run directory made then still matches its hash and
        resumes instead of starting over."""
        out = {k: v for k, v in super().hash_form(resolved).items() if k != "bond"}
        out.update(BondOptions.model_validate(resolved.get("bond") or {}).model_dump(mode="json"))
        return out
