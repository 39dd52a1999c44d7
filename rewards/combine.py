"""Combine several reward functions into one: weighted sum, optional normalisation, faults.

>>> specs = [RewardSpec(name="math", weight=1.0), RewardSpec(fn="my_pkg.rewards:brevity", weight=0.1)]
>>> batch = compute_rewards(specs, prompts, completions, {"answer": answers})
>>> batch.rewards, batch.per_reward["math"], batch.faults

Every function is called exactly as TRL's ``GRPOTrainer`` calls a reward function, so TRL's own
rewards and users' existing ones run unchanged: keyword arguments only,
``fn(prompts=..., completions=..., completion_ids=..., **columns, **kwargs)``. When a prompt is
a list of messages (conversational), its completion is passed as one assistant message
``[{"role": "assistant", "content": text}]``; otherwise as the text. ``completion_ids`` are the
completions' token ids when the caller has them (``compute(..., completion_ids=...)``), else
None; a function that needs them then faults with a message saying so. Reward factories
(e.g. TRL's ``get_soft_overlong_punishment``) are built once from ``RewardSpec.factory``.

Each reward function runs in its own thread, concurrently with the others, and each call is
time-bounded (``RewardSpec.timeout_s``). When a batched call raises, the batch is retried one
sample per call (concurrently) so that the fault is attributed to the samples that cause it;
when it times out, every sample of the batch is faulted (a retry could take as long again).
A faulted (reward, sample) follows ``fault_policy``:

- ``"zero"``: the reward's value for that sample is 0.0;
- ``"skip"``: the sample's combined reward is ``None`` (leave it out of the update);
- ``"fail"``: ``RewardFaultError`` is raised after the batch, with the messages.

Every fault is counted and logged with its message. A reward that faults on every sample of a
batch (of two or more) raises ``RewardFaultError`` whatever the policy, unless its spec sets
``tolerate_all_faults``: such a reward never scores, and training on its zeros would end in a
stage that looks complete. A reward returning ``None`` for a sample
means "does not apply" (TRL's convention), not a fault: the weighted sum skips it, and a sample
no reward applies to gets ``None``. Threads that time out are abandoned as daemons, so a hung
user function can neither block the run nor its exit.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from rewards.registry import check_reward_kwargs, load_reward

log = logging.getLogger("rewards")

__all__ = ["RewardSpec", "RewardBatch", "CombinedReward", "compute_rewards", "columns_from_rows", "RewardFaultError",
           "FaultPolicy", "dataset_columns", "as_trl_completion", "is_conversational"]

FaultPolicy = Literal["zero", "skip", "fail"]
MAX_MESSAGES = 100
# Arguments the caller supplies itself; a dataset column of the same name would shadow them.
RESERVED = ("prompts", "completions", "completion_ids")
# Columns TRL leaves out of the batched keyword arguments (the prompt and reference completion).
NOT_COLUMNS = ("prompt", "completion", "completion_ids")


class RewardSpec(BaseModel):
    """One reward of a combination."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(
        None, description="Label used in logs and per-reward values; when `fn` is not given, "
        "also the reward to load (registry name, 'pkg.mod:fn' or 'path/file.py:fn').")
    fn: str | None = Field(
        None, description="Reward to load: registry name (math, code, instructions, "
        "reward_model, ...), import path 'package.module:function' or file path "
        "'path/to/file.py:function'. Defaults to `name`.")
    weight: float = Field(1.0, description="Weight of this reward in the weighted sum.")
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments passed to the function on every "
        "call (they take precedence over dataset columns of the same name).")
    normalize: bool = Field(
        False, description="Standardise this reward over the batch (zero mean, unit variance, "
        "over the samples it applies to) before weighting.")
    timeout_s: float | None = Field(
        120.0, gt=0, description="Wall-clock limit of one call of the function (a whole batch); "
        "None for no limit.")
    columns: dict[str, str] = Field(
        default_factory=dict, description="Rename dataset columns for this function: "
        "{argument name: column name}.")
    tolerate_all_faults: bool = Field(
        False, description="Go on when this reward faults on every sample of a batch (a step). By "
        "default that is an error: a reward that never scores (a column it reads is missing, it "
        "returns the wrong number of values) would otherwise train on zeros and end 'complete'.")
    fallback: bool = Field(
        False, description="Score only the samples no other (non-fallback) reward applies to: e.g. a "
        "reward model for the prompts no verifier checks (chit-chat), leaving the verifiers' prompts "
        "to them. Normalisation then runs over those samples only.")
    factory: dict[str, Any] | None = Field(
        None, description="The loaded callable is a reward factory (e.g. TRL's "
        "get_soft_overlong_punishment): call it once with these keyword arguments, e.g. "
        "{max_completion_len: 256, soft_punish_cache: 32}, and use the function it returns.")

    @model_validator(mode="after")
    def _need_one(self) -> "RewardSpec":
        if not (self.name or self.fn):
            raise ValueError("a reward needs `name` or `fn`")
        # A built-in reward's options are known: a typo fails when the recipe loads, not once RL starts.
        check_reward_kwargs(self.fn or self.name, self.kwargs)
        return self

    @model_serializer(mode="wrap")
    def _added_options_only_when_set(self, handler):
        # `fallback` came after run directories were made: at its default it is left out of the
        # dumped spec, so a stage config that does not set it hashes as it did before.
        data = handler(self)
        if isinstance(data, dict) and not self.fallback:
            data.pop("fallback", None)
        return data

    @property
    def label(self) -> str:
        return self.name or str(self.fn)

    @property
    def target(self) -> str:
        return self.fn or str(self.name)


class RewardFaultError(RuntimeError):
    """A reward function failed and the fault policy is ``fail``."""


@dataclass
class RewardBatch:
    """Result of scoring one batch."""

    rewards: list[float | None]  # combined values; None where skipped or no reward applies
    per_reward: dict[str, list[float | None]]  # raw per-sample values of every reward
    faults: dict[str, int]  # faulted samples per reward
    fault_messages: list[str] = field(default_factory=list)  # first messages, "label[i]: ..."
    skipped: list[bool] = field(default_factory=list)  # samples left out by the skip policy
    durations_s: dict[str, float] = field(default_factory=dict)  # wall time per reward

    def metrics(self) -> dict[str, float]:
        """Flat summary for step logs: mean of each reward, fault counts, skipped count."""
        out: dict[str, float] = {}
        for k, vals in self.per_reward.items():
            xs = [v for v in vals if v is not None and not math.isnan(v)]
            out[f"rewards/{k}/mean"] = sum(xs) / len(xs) if xs else float("nan")
            out[f"rewards/{k}/faults"] = float(self.faults.get(k, 0))
            out[f"rewards/{k}/seconds"] = self.durations_s.get(k, 0.0)
        xs = [v for v in self.rewards if v is not None]
        out["rewards/combined/mean"] = sum(xs) / len(xs) if xs else float("nan")
        out["rewards/skipped"] = float(sum(self.skipped))
        return out


# ---------------------------------------------------------------- time-bounded calls

def _invoke(fn: Callable, args: tuple, kwargs: dict) -> Any:
    res = fn(*args, **kwargs)  # the combination passes no positional arguments (TRL's convention)
    if inspect.isawaitable(res):
        async def _await():
            return await res

        res = asyncio.run(_await())
    return res


class _Call:
    """Run ``fn`` in a daemon thread; ``result(timeout)`` returns (ok, value-or-message)."""

    def __init__(self, fn: Callable, args: tuple, kwargs: dict):
        self._done = threading.Event()
        self._out: tuple[bool, Any] = (False, "not finished")
        self.start = time.monotonic()
        t = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True,
                             name=f"reward-{getattr(fn, '__name__', 'fn')}")
        t.start()

    def _run(self, fn, args, kwargs):
        try:
            self._out = (True, _invoke(fn, args, kwargs))
        except BaseException as e:  # noqa: BLE001 - user code; reported, never raised here
            self._out = (False, f"{type(e).__name__}: {e}")
        finally:
            self._done.set()

    def result(self, timeout: float | None) -> tuple[bool, Any]:
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - self.start))
        if not self._done.wait(left):
            return False, f"timed out after {timeout:g}s"
        return self._out


def _value(v: Any) -> float | None:
    """Coerce one returned value; raises on values that are not numbers."""
    if v is None:
        return None
    if hasattr(v, "item"):  # numpy / torch scalars
        v = v.item()
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        f = float(v)
        return None if math.isnan(f) else f
    raise TypeError(f"reward value {v!r} is not a number or None")


# ---------------------------------------------------------------- TRL's calling convention

def is_conversational(prompt: Any) -> bool:
    """A prompt given as messages (a list of {"role", "content"} dicts), as TRL decides it."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and isinstance(prompt[0], dict) \
        and "role" in prompt[0]


def as_trl_completion(prompt: Any, completion: Any) -> Any:
    """The completion in the shape GRPOTrainer gives reward functions: one assistant message in
    a list for a conversational prompt, else the text. Message lists pass through unchanged."""
    if isinstance(completion, str) and is_conversational(prompt):
        return [{"role": "assistant", "content": completion}]
    return completion


def _batched(value: Any, n: int) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == n


def _requires(fn: Callable, name: str) -> bool:
    """Whether ``fn`` has a parameter ``name`` without a default (it cannot run without it)."""
    try:
        p = inspect.signature(fn).parameters.get(name)
    except (TypeError, ValueError):
        return False
    return p is not None and p.default is inspect.Parameter.empty \
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def _build(index: int, spec: RewardSpec, base_dir: str | None) -> Callable:
    """Load the spec's callable; call it with ``spec.factory`` when it is a factory."""
    fn = load_reward(spec.target, base_dir=base_dir)
    if spec.factory is None:
        return fn
    where = f"rewards[{index}].factory"
    try:
        built = fn(**spec.factory)
    except TypeError as e:
        raise ValueError(f"{where}: calling {spec.target} with {sorted(spec.factory)} failed: {e}; "
                         "expected the keyword arguments of the factory") from e
    if not callable(built):
        raise ValueError(f"{where}: {spec.target}(...) returned {type(built).__name__}, expected a "
                         "reward function (is it a factory?)")
    return built


# ---------------------------------------------------------------- combination

class CombinedReward:
    """Load the rewards once; score batches with ``compute`` (or call it like a TRL reward)."""

    def __init__(self, specs: Sequence[RewardSpec | dict], fault_policy: FaultPolicy = "zero",
                 base_dir: str | None = None, retry_chunk: int = 32):
        if fault_policy not in ("zero", "skip", "fail"):
            raise ValueError(f"fault_policy must be 'zero', 'skip' or 'fail', got {fault_policy!r}")
        self.specs = [s if isinstance(s, RewardSpec) else RewardSpec.model_validate(s) for s in specs]
        if not self.specs:
            raise ValueError("no rewards given")
        self.fault_policy = fault_policy
        self.retry_chunk = retry_chunk
        self.fns = [_build(i, s, base_dir) for i, s in enumerate(self.specs)]
        self.labels: list[str] = []
        for s in self.specs:
            label, k = s.label, 2
            while label in self.labels:
                label, k = f"{s.label}#{k}", k + 1
            self.labels.append(label)
        self.total_faults: dict[str, int] = {lab: 0 for lab in self.labels}
        self.__name__ = "combined_reward"

    def __call__(self, prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float | None]:
        """The combination as one TRL reward function (called with keywords by GRPOTrainer).
        Per-sample columns are the keyword values with one entry per completion; the others
        (TRL's ``trainer_state``, ``log_extra``, ...) are handed to every function unchanged."""
        if completions is None:
            raise TypeError("combined_reward() needs completions=")
        n = len(completions)
        columns = {k: v for k, v in kwargs.items() if _batched(v, n)}
        extras = {k: v for k, v in kwargs.items() if k not in columns}
        prompts = [None] * n if prompts is None else prompts
        return self.compute(prompts, completions, columns, completion_ids=completion_ids, extras=extras).rewards

    def warm_up(self) -> threading.Thread:
        """Start the rewards' workers (e.g. the math-verify pool) in the background, so that a
        run's first batches do not pay for it. A reward function opts in with a `warm_up()`
        attribute. A failure here is only logged: the first real call reports it properly."""
        def run():
            for spec, fn in zip(self.specs, self.fns):
                hook = getattr(fn, "warm_up", None) or getattr(getattr(fn, "func", None), "warm_up", None)
                if callable(hook):
                    try:
                        hook()
                    except Exception as e:  # noqa: BLE001
                        log.warning("reward %s: warm-up failed (%s); it will start on first use", spec.label, e)

        thread = threading.Thread(target=run, name="reward-warm-up", daemon=True)
        thread.start()
        return thread

    def _check_not_all_faulted(self, faults: dict[str, int], messages: list[str], n: int) -> None:
        """A reward faulting on every sample of a batch is an error unless its spec tolerates it
        (a batch of one sample is not judged: one bad completion says nothing about the reward)."""
        for spec, label in zip(self.specs, self.labels):
            if n > 1 and faults.get(label, 0) == n and not spec.tolerate_all_faults:
                raise all_faulted_error(label, n, _first_message(label, messages))

    # one reward over the batch -> (values, fault messages per sample index)
    def _run_one(self, i: int, prompts, completions, completion_ids, columns,
                 extras) -> tuple[list[float | None], dict[int, str], float]:
        spec, fn = self.specs[i], self.fns[i]
        n = len(completions)
        cols = dict(columns)
        for arg, col in spec.columns.items():
            if col not in columns:
                return [None] * n, {j: f"column {col!r} missing" for j in range(n)}, 0.0
            cols[arg] = columns[col]
        if completion_ids is None and _requires(fn, "completion_ids"):
            msg = ("needs completion_ids (the completions' token ids), and the caller passed none: "
                   "call compute(..., completion_ids=...)")
            return [None] * n, {j: msg for j in range(n)}, 0.0
        t0 = time.monotonic()

        def call(sl: slice) -> _Call:
            batch = {k: list(v[sl]) for k, v in cols.items()}
            ids = None if completion_ids is None else list(completion_ids[sl])
            return _Call(fn, (), {"prompts": list(prompts[sl]), "completions": list(completions[sl]),
                                  "completion_ids": ids, **batch, **extras, **spec.kwargs})

        ok, out = call(slice(0, n)).result(spec.timeout_s)
        if ok:
            try:
                if isinstance(out, (str, bytes)) or not hasattr(out, "__len__") or len(out) != n:
                    raise TypeError(f"returned {type(out).__name__} of length "
                                    f"{len(out) if hasattr(out, '__len__') else '?'}, expected a list of {n}")
            except TypeError as e:
                return [None] * n, {j: str(e) for j in range(n)}, time.monotonic() - t0
            values: list[float | None] = [None] * n
            faults: dict[int, str] = {}
            for j, v in enumerate(out):
                try:
                    values[j] = _value(v)
                except (TypeError, ValueError) as e:
                    faults[j] = str(e)
            return values, faults, time.monotonic() - t0
        if out.startswith("timed out") or n == 1:
            return [None] * n, {j: out for j in range(n)}, time.monotonic() - t0
        # the batch raised: retry one sample per call to find the samples at fault
        values, faults = [None] * n, {}
        for lo in range(0, n, self.retry_chunk):
            calls = [(j, call(slice(j, j + 1))) for j in range(lo, min(n, lo + self.retry_chunk))]
            for j, c in calls:
                ok, r = c.result(spec.timeout_s)
                try:
                    if not ok:
                        raise RuntimeError(r)
                    if isinstance(r, (str, bytes)) or len(r) != 1:
                        raise TypeError(f"returned {r!r} for one sample")
                    values[j] = _value(r[0])
                except Exception as e:  # noqa: BLE001
                    faults[j] = str(e)
        return values, faults, time.monotonic() - t0

    def compute(self, prompts: Sequence, completions: Sequence,
                columns: dict[str, Sequence] | None = None, *,
                completion_ids: Sequence[Sequence[int]] | None = None,
                extras: dict[str, Any] | None = None) -> RewardBatch:
        """Score one batch. ``completions`` are texts (or TRL-style message lists);
        ``columns`` the dataset's per-sample columns; ``completion_ids`` the completions' token
        ids (needed by length and repetition rewards); ``extras`` keyword arguments handed to
        every function as they are (not per sample)."""
        columns = dict(columns or {})
        extras = dict(extras or {})
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts but {n} completions")
        for k, v in columns.items():
            if k in RESERVED:
                raise ValueError(f"column {k!r} has the name of an argument every reward function "
                                 f"receives ({', '.join(RESERVED)}); rename the column")
            if len(v) != n:
                raise ValueError(f"column {k!r} has {len(v)} values for {n} completions")
        if completion_ids is not None and len(completion_ids) != n:
            raise ValueError(f"completion_ids has {len(completion_ids)} entries for {n} completions")
        completions = [as_trl_completion(p, c) for p, c in zip(prompts, completions)]
        results: list[Any] = [None] * len(self.specs)

        def work(i):
            results[i] = self._run_one(i, prompts, completions, completion_ids, columns, extras)

        threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(self.specs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        per_reward: dict[str, list[float | None]] = {}
        faults: dict[str, int] = {}
        messages: list[str] = []
        skipped = [False] * n
        durations: dict[str, float] = {}
        for label, (values, fmap, dt) in zip(self.labels, results):
            durations[label] = dt
            faults[label] = len(fmap)
            self.total_faults[label] += len(fmap)
            for j, msg in sorted(fmap.items()):
                if len(messages) < MAX_MESSAGES:
                    messages.append(f"{label}[{j}]: {msg}")
                if self.fault_policy == "zero":
                    values[j] = 0.0
                elif self.fault_policy == "skip":
                    skipped[j] = True
            if fmap:
                first = next(iter(sorted(fmap.items())))
                log.warning("reward %r faulted on %d/%d samples (policy %s); first: [%d] %s",
                            label, len(fmap), n, self.fault_policy, first[0], first[1])
            per_reward[label] = values
        if self.fault_policy == "fail" and any(faults.values()):
            raise RewardFaultError("reward faults (policy 'fail'): " + "; ".join(messages[:10]))
        self._check_not_all_faulted(faults, messages, n)

        combined: list[float | None] = []
        normed = {}
        # A fallback reward is blanked ("does not apply") wherever a primary reward applies. Why: next
        # to verifiers, a reward model's small weighted score still orders every two answers the
        # verifiers scored alike, and methods that only compare samples (J-BOND, BOND) turn any such
        # difference into a full win or loss, so right answers would be punished for its noise.
        primary = [any(per_reward[label][j] is not None for spec, label in zip(self.specs, self.labels)
                       if not spec.fallback) for j in range(n)]
        for spec, label in zip(self.specs, self.labels):
            vals = per_reward[label]
            if spec.fallback:
                vals = [None if primary[j] else v for j, v in enumerate(vals)]
            if spec.normalize:
                xs = [v for v in vals if v is not None]
                mean = sum(xs) / len(xs) if xs else 0.0
                std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs)) if xs else 0.0
                vals = [None if v is None else (v - mean) / (std + 1e-8) for v in vals]
            normed[label] = vals
        for j in range(n):
            if skipped[j]:
                combined.append(None)
                continue
            terms = [spec.weight * normed[label][j] for spec, label in zip(self.specs, self.labels)
                     if normed[label][j] is not None]
            combined.append(sum(terms) if terms else None)
        return RewardBatch(rewards=combined, per_reward=per_reward, faults=faults,
                           fault_messages=messages, skipped=skipped, durations_s=durations)


def _first_message(label: str, messages: list[str]) -> str:
    return next((m for m in messages if m.startswith(f"{label}[")), "")


def all_faulted_error(label: str, n: int, first: str) -> RewardFaultError:
    return RewardFaultError(
        f"reward {label!r} faulted on every sample of the batch ({n}/{n}); first: {first}. A reward that never "
        "scores trains nothing: fix the reward or the columns it reads, or set `tolerate_all_faults: true` on it "
        "to go on regardless")


def dataset_columns(rows: Sequence[dict]) -> list[str]:
    """The reward columns of a whole dataset: every key some row has, but `prompt`, `completion` and `completion_ids`."""
    return sorted({k for r in rows for k in r if k not in NOT_COLUMNS})


def columns_from_rows(rows: Sequence[dict], repeat: int = 1, keys: Sequence[str] | None = None) -> dict[str, list]:
    """Dataset rows as reward columns: every key but `prompt`, `completion` and `completion_ids`
    (as TRL leaves them out), one entry per completion (each
    row repeated `repeat` times). Rows of mixed tasks get None where they lack a column.

    `keys`: the columns of the whole dataset the rows were drawn from (`dataset_columns`). A batch
    of a mixed dataset may hold no row of some task (no math prompt this step); its verifier then
    still receives its column, all None ("does not apply"), instead of no column at all, which is
    the fault of a recipe that gives a verifier data without its ground truth."""
    keys = sorted(set(keys or ()) | set(dataset_columns(rows)))
    return {k: [r.get(k) for r in rows for _ in range(repeat)] for k in keys}


def compute_rewards(specs: Sequence[RewardSpec | dict], prompts: Sequence, completions: Sequence,
                    columns: dict[str, Sequence] | None = None,
                    fault_policy: FaultPolicy = "zero", base_dir: str | None = None,
                    completion_ids: Sequence[Sequence[int]] | None = None) -> RewardBatch:
    """One-shot ``CombinedReward(specs, fault_policy).compute(...)``; see the module docstring."""
    return CombinedReward(specs, fault_policy, base_dir=base_dir).compute(
        prompts, completions, columns, completion_ids=completion_ids)
