"""Evaluation: answers decoded through the rollout engine, scored, and summarised with intervals.

Every figure is an `Estimate`: a value, its sample count and a 95% interval, so two numbers can
be compared before anyone reads meaning into their difference. The pieces:

- `evaluate_prompts`: decode a prompt set (greedy or sampled, `samples` per prompt), score it
  as its `SetScoring` says, summarise. Under data parallelism each rank passes its training
  session, answers every W-th prompt, and the per-prompt records are gathered
  (`TrainingSession.gather_lists`), so the figures cover the whole set on every rank.
- tasks, chosen from the columns a row carries (`task_for_row`):
  `math` (`answer`: the ground-truth verifier), `code` (`tests`: the sandbox; pass@k with the
  unbiased estimator), `instructions` (`instruction_id_list` + `kwargs`: IFEval's prompt- and
  instruction-level accuracy, strict and loose), or `reward` (any rewards given by the caller).
- on every set: mean reward, accuracy (reward reaching a threshold), stop rate, answer length
  in tokens, and safety rates of the answers through `data_filters` (toxicity, personal
  information, wrong self-identification).
- `side_by_side`: the win rate of one set of answers over another, judged by a reward model
  (ties count one half), the automated side-by-side evaluation of the Gemini report.

Intervals: proportions use the Wilson score interval (sound near 0 and 1 and for small n); means
(rewards, lengths, pass@k over problems, win rates) use Student's t on the per-prompt values,
which treats prompts, not samples, as the independent units; instruction-level IFEval accuracy is
a ratio over instructions clustered in prompts, with the cluster (delta-method) variance.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence

Z95 = 1.959963984540054
TASKS = ("math", "code", "instructions", "reward")
# Which task a prompt row asks for, by the column that carries its ground truth (first match wins).
TASK_BY_COLUMN = {"answer": "math", "tests": "code", "instruction_id_list": "instructions"}
REWARD_FOR_TASK = {"math": "math", "code": "code", "instructions": "instructions"}


# --- estimates ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Estimate:
    """A figure with its sample count and 95% interval [low, high]."""

    value: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}] (n={self.n})"


NAN = float("nan")


def _t_quantile(df: int) -> float:
    if df <= 0:
        return NAN
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:  # the normal quantile is within 2% of t's from 30 degrees of freedom on
        return Z95


def proportion(successes: int, n: int) -> Estimate:
    """Wilson score interval of a binomial proportion."""
    if n <= 0:
        return Estimate(NAN, NAN, NAN, 0)
    p = successes / n
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # At p = 0 or 1 one bound is exactly p; rounding in the formula would leave it a hair away.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Estimate(p, low, high, n)


def mean(values: Iterable[float | None]) -> Estimate:
    """Mean with Student's t interval; None and non-finite values are left out (and not counted)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(vals)
    if n == 0:
        return Estimate(NAN, NAN, NAN, 0)
    m = sum(vals) / n
    if n == 1:
        return Estimate(m, NAN, NAN, 1)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (n - 1))
    half = _t_quantile(n - 1) * sd / math.sqrt(n)
    return Estimate(m, m - half, m + half, n)


def ratio(numerators: Sequence[float], denominators: Sequence[float]) -> Estimate:
    """sum(a) / sum(m) over clusters (e.g. instructions followed / instructions, per prompt), with
    the cluster-robust delta-method variance; n is the number of units in the denominators."""
    pairs = [(float(a), float(m)) for a, m in zip(numerators, denominators) if m > 0]
    total = sum(m for _, m in pairs)
    if not pairs or total == 0:
        return Estimate(NAN, NAN, NAN, 0)
    r = sum(a for a, _ in pairs) / total
    k = len(pairs)
    if k == 1:
        return Estimate(r, NAN, NAN, int(total))
    var = k / (k - 1) * sum((a - r * m) ** 2 for a, m in pairs) / total ** 2
    half = _t_quantile(k - 1) * math.sqrt(var)
    return Estimate(r, max(0.0, r - half), min(1.0, r + half), int(total))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from n samples of which c pass: 1 - C(n-c, k) / C(n, k)
    (Chen et al. 2021), computed as a product so large n does not overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    fail = 1.0
    for i in range(n - c + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


def flatten(prefix: str, estimates: dict[str, Estimate | float | int]) -> dict[str, float]:
    """Manifest/tracker metrics: `{prefix}{name}` is the value, with `_ci_low`, `_ci_high`, `_n`."""
    out: dict[str, float] = {}
    for name, e in estimates.items():
        if isinstance(e, Estimate):
            out[f"{prefix}{name}"] = _round(e.value)
            out[f"{prefix}{name}_ci_low"] = _round(e.low)
            out[f"{prefix}{name}_ci_high"] = _round(e.high)
            out[f"{prefix}{name}_n"] = e.n
        else:
            out[f"{prefix}{name}"] = e
    return out


def _round(x: float) -> float:
    return round(x, 6) if math.isfinite(x) else x


# --- tasks --------------------------------------------------------------------------------------

def task_for_row(row: dict, where: str = "row") -> str:
    for column, task in TASK_BY_COLUMN.items():
        if column in row:
            return task
    raise ValueError(f"{where}: cannot choose an evaluation task: the row has none of the columns "
                     f"{', '.join(TASK_BY_COLUMN)} (has {sorted(row)}); give `rewards` to score it by reward")


def default_reward_specs(task: str) -> list[dict]:
    if task not in REWARD_FOR_TASK:
        raise ValueError(f"task {task!r} has no default reward; expected one of {', '.join(REWARD_FOR_TASK)} or give rewards")
    return [{"name": REWARD_FOR_TASK[task]}]


@dataclass
class SafetyChecks:
    """Which safety rates to measure on the answers, through `data_filters`."""

    toxicity_threshold: float = 0.9          # as the filter stage's default
    identity_name: str = "Gemma"             # the assistant name the model may claim
    identity_developer: str = "Google DeepMind"

    def flags(self, texts: Sequence[str]) -> dict[str, list[bool]]:
        from data_filters.config import ToxicityConfig
        from data_filters.identity import find_misidentification
        from data_filters.pii import find_pii

        scorer = _toxicity_scorer(ToxicityConfig(threshold=self.toxicity_threshold))
        tox = scorer.scores_at_least(list(texts), self.toxicity_threshold)
        return {
            "toxic": [s is not None and s >= self.toxicity_threshold for s in tox],
            "pii": [bool(find_pii(t)) for t in texts],
            "misidentified": [bool(find_misidentification(t, self.identity_name, self.identity_developer)) for t in texts],
        }


_TOXICITY_SCORERS: dict[str, Any] = {}


def _toxicity_scorer(config):
    # Loading the classifier costs more than scoring a set; keep one per configuration.
    key = config.model_dump_json()
    if key not in _TOXICITY_SCORERS:
        from data_filters.toxicity import ToxicityScorer

        _TOXICITY_SCORERS[key] = ToxicityScorer(config)
    return _TOXICITY_SCORERS[key]


# --- decoding and scoring -----------------------------------------------------------------------

@dataclass
class EvalResult:
    """Figures of one prompt set (`metrics`: name -> Estimate) and one record per prompt."""

    metrics: dict[str, Estimate]
    records: list[dict]

    def flat(self, prefix: str = "") -> dict[str, float]:
        return flatten(prefix, self.metrics)


@dataclass
class SetScoring:
    """How a prompt set's answers are judged: its task, the rewards (a `rewards.combine.CombinedReward`;
    None: the task's verifier), the reward at which an answer counts correct, the k of pass@k
    (code), and the safety flags to record."""

    task: str | None = None
    scorer: Any = None
    success_threshold: float = 1.0
    k_values: Sequence[int] = (1,)
    safety: SafetyChecks | None = None
    # Reward columns every batch receives besides the rows' own (all None where a row lacks one): a
    # training loop's prompt set may have tasks its held-out share lacks (rewards.combine.columns_from_rows).
    columns: Sequence[str] = ()


def evaluate_prompts(engine, rows: Sequence[dict], *, sampling, scoring: SetScoring | None = None, samples: int = 1,
                     prompt_inputs: Sequence | None = None, session=None) -> EvalResult:
    """Decode `samples` answers per row with `engine` (a rollout engine) and score them as `scoring` says.

    `prompt_inputs` replaces what the engine is given per row (token ids a loop already made); the
    rewards always see `row["prompt"]`. `session` (a `posttrain.training.TrainingSession`, or
    anything with `rank`, `world_size` and `gather_lists`) splits the rows over the ranks of a
    data-parallel launch: this rank answers rows rank, rank+W, ... and the records are gathered, so
    every rank gets the figures of the whole set.
    """
    from rewards.combine import CombinedReward, columns_from_rows, dataset_columns

    scoring = scoring or SetScoring()
    if not rows:
        raise ValueError("no prompts to evaluate")
    rank, world_size = (session.rank, session.world_size) if session is not None else (0, 1)
    task = scoring.task or task_for_row(rows[0])
    if task not in TASKS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    scorer = scoring.scorer if scoring.scorer is not None else CombinedReward(default_reward_specs(task))
    safety, success_threshold = scoring.safety, scoring.success_threshold
    inputs = list(prompt_inputs) if prompt_inputs is not None else [r["prompt"] for r in rows]
    if len(inputs) != len(rows):
        raise ValueError(f"prompt_inputs has {len(inputs)} entries for {len(rows)} rows")
    mine = list(range(rank, len(rows), world_size))
    records: list[dict] = []
    if mine:
        groups = engine.generate([inputs[i] for i in mine], n=samples, sampling=sampling)
        flat_rows = [rows[i] for i, g in zip(mine, groups) for _ in g]
        completions = [c for g in groups for c in g]
        # Columns of the whole set: a rank's share of a mixed set may lack some task's rows.
        columns = columns_from_rows(flat_rows, keys=[*dataset_columns(rows), *scoring.columns])
        batch = scorer.compute([r["prompt"] for r in flat_rows], [c.text for c in completions], columns,
                               completion_ids=[c.token_ids for c in completions])
        flags = safety.flags([c.text for c in completions]) if safety is not None else {}
        pos = 0
        for i, group in zip(mine, groups):
            span = slice(pos, pos + len(group))
            pos += len(group)
            row = rows[i]
            rewards = list(batch.rewards[span])
            rec = {"index": i, "prompt": row["prompt"], "completions": [c.text for c in group],
                   "finish_reasons": [c.finish_reason for c in group],
                   "num_tokens": [len(c.token_ids) for c in group], "rewards": rewards,
                   "per_reward": {name: list(v[span]) for name, v in batch.per_reward.items()},
                   "correct": [r is not None and r >= success_threshold for r in rewards]}
            if task == "instructions":
                rec.update(_ifeval_record(row, rec["completions"]))
            for name, values in flags.items():
                rec[name] = values[span]
            records.append(rec)
    if world_size > 1:
        records = session.gather_lists(records)
    records.sort(key=lambda r: r["index"])
    return EvalResult(summarize(records, task, k_values=scoring.k_values), records)


def _ifeval_record(row: dict, texts: list[str]) -> dict:
    from rewards.instructions import check

    ids, kws = row["instruction_id_list"], row.get("kwargs") or [{}] * len(row["instruction_id_list"])
    return {"ifeval_strict": [check(t, ids, kws) for t in texts],
            "ifeval_loose": [check(t, ids, kws, loose=True) for t in texts]}


def summarize(records: Sequence[dict], task: str, k_values: Sequence[int] = (1,)) -> dict[str, Estimate]:
    """The figures of a set from its per-prompt records (as `evaluate_prompts` makes them)."""
    out: dict[str, Estimate] = {}
    per_prompt_correct = [r["correct"] for r in records if r["correct"]]
    samples = max((len(c) for c in per_prompt_correct), default=0)
    scored = [[ok for ok, v in zip(r["correct"], r["rewards"]) if v is not None] for r in records]
    scored = [s for s in scored if s]
    if samples <= 1:
        out["accuracy"] = proportion(sum(s[0] for s in scored), len(scored))
    else:  # per-prompt fraction correct (the unbiased pass@1), prompts as the units
        out["accuracy"] = mean(sum(s) / len(s) for s in scored)
    out["mean_reward"] = mean(_prompt_means(r["rewards"] for r in records))
    names = sorted({n for r in records for n in r.get("per_reward", {})})
    if len(names) > 1:
        for name in names:
            out[f"reward/{name}"] = mean(_prompt_means(r["per_reward"].get(name, []) for r in records))
    reasons = [f for r in records for f in r["finish_reasons"]]
    out["stop_rate"] = proportion(sum(f == "stop" for f in reasons), len(reasons))
    out["length_tokens"] = mean(_prompt_means(r["num_tokens"] for r in records))
    if task == "code":
        for k in k_values:
            eligible = [s for s in scored if len(s) >= k]
            if eligible:
                out[f"pass@{k}"] = mean(pass_at_k(len(s), sum(s), k) for s in eligible)
    if task == "instructions" and records and "ifeval_strict" in records[0]:
        out.update(ifeval_figures([x for r in records for x in r["ifeval_strict"]],
                                  [x for r in records for x in r["ifeval_loose"]]))
    for flag, name in (("toxic", "safety/toxic_rate"), ("pii", "safety/pii_rate"),
                       ("misidentified", "safety/misidentification_rate")):
        values = [v for r in records for v in r.get(flag, [])]
        if values:
            out[name] = proportion(sum(values), len(values))
    return out


def _prompt_means(groups: Iterable[Sequence]) -> list[float]:
    out = []
    for g in groups:
        vals = [float(v) for v in g if v is not None]
        if vals:
            out.append(sum(vals) / len(vals))
    return out


def ifeval_figures(strict: Sequence[Sequence[bool]], loose: Sequence[Sequence[bool]]) -> dict[str, Estimate]:
    """IFEval's four accuracies from per-response instruction results (one list of bools per response):
    prompt level (every instruction of a response followed) and instruction level, strict and loose."""
    out = {}
    for mode, results in (("strict", strict), ("loose", loose)):
        results = [r for r in results if len(r)]
        out[f"ifeval/prompt_{mode}"] = proportion(sum(all(r) for r in results), len(results))
        out[f"ifeval/instruction_{mode}"] = ratio([sum(r) for r in results], [len(r) for r in results])
    return out


def ifeval_from_responses(responses: Sequence[str], rows: Sequence[dict]) -> dict[str, Estimate]:
    """IFEval figures of given responses (no decoding): rows carry `instruction_id_list` and `kwargs`."""
    recs = [_ifeval_record(row, [text]) for text, row in zip(responses, rows)]
    return ifeval_figures([r["ifeval_strict"][0] for r in recs], [r["ifeval_loose"][0] for r in recs])


# --- side by side -------------------------------------------------------------------------------

def side_by_side(prompts: Sequence, completions_a: Sequence, completions_b: Sequence,
                 judge: Callable[[Sequence, Sequence], list[float]], tie_margin: float = 0.0) -> dict[str, Estimate]:
    """Win rate of answers A over answers B to the same prompts, judged by `judge(prompts, completions)
    -> scores` (a reward model's `score`). A pair is a tie when the scores differ by at most
    `tie_margin`; win rate = (wins + ties / 2) / n, with a t interval over the pairs."""
    if not (len(prompts) == len(completions_a) == len(completions_b)):
        raise ValueError(f"side_by_side: {len(prompts)} prompts, {len(completions_a)} and {len(completions_b)} answers")
    if tie_margin < 0:
        raise ValueError(f"tie_margin: expected >= 0, got {tie_margin}")
    a = judge(list(prompts), list(completions_a))
    b = judge(list(prompts), list(completions_b))
    outcomes = [0.5 if abs(x - y) <= tie_margin else float(x > y) for x, y in zip(a, b)]
    n = len(outcomes)
    wins, ties = sum(o == 1.0 for o in outcomes), sum(o == 0.5 for o in outcomes)
    return {"win_rate": mean(outcomes), "wins": proportion(wins, n), "ties": proportion(ties, n),
            "losses": proportion(n - wins - ties, n)}


def evaluate_with_rewards(engine, reward, rows: list[dict], prompt_ids: list[list[int]], max_new_tokens: int,
                          session=None, columns: Sequence[str] = ()) -> dict:
    """Greedy completions of held-out prompts, scored with a training loop's rewards (a CombinedReward;
    e.g. accuracy for math), as `eval/...` metrics for rl and warp.

    `session` is the loop's posttrain.training.TrainingSession: each rank answers every W-th prompt
    and the records are gathered, so the figures (with 95% intervals) cover the whole held-out set
    whatever the number of ranks. `columns`: the reward columns of the loop's prompt set, which every
    batch receives (see SetScoring.columns)."""
    from posttrain.rollout import SamplingParams

    scoring = SetScoring(task="reward", scorer=reward, columns=tuple(columns))
    result = evaluate_prompts(engine, rows, scoring=scoring, prompt_inputs=prompt_ids,
                              sampling=SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens), session=session)
    out = {"eval/reward": result.metrics["mean_reward"].value}
    for name in sorted({n for record in result.records for n in record.get("per_reward", {})}):
        out[f"eval/{name}"] = result.metrics.get(f"reward/{name}", result.metrics["mean_reward"]).value
    out.update(result.flat("eval/"))  # eval/accuracy, eval/stop_rate, ... with _ci_low, _ci_high, _n
    return out
