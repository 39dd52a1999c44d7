"""Plug-in API: loading rewards by name / import path / file path, combination, faults."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from rewards import (CombinedReward, RewardFaultError, RewardLoadError, RewardSpec, compute_rewards,
                     load_reward, register_reward)

HERE = Path(__file__).parent
FILE_SPEC = f"{HERE / 'fixtures' / 'user_reward.py'}:length_reward"


@register_reward("test_const")
def const_reward(prompts, completions, value=1.0, **_):
    return [value for _ in completions]


def fails_on_bad(prompts, completions, **_):
    out = []
    for c in completions:
        if "bad" in c:
            raise ValueError(f"cannot score {c!r}")
        out.append(1.0)
    return out


def hangs(prompts, completions, **_):
    time.sleep(30)
    return [1.0] * len(completions)


def none_for_short(prompts, completions, **_):
    return [None if len(c) < 3 else 2.0 for c in completions]


def test_load_by_name_import_path_and_file():
    assert load_reward("test_const") is const_reward
    assert load_reward("math").__name__ == "math_reward"
    assert load_reward("code").__name__ == "code_reward"
    assert load_reward("instructions").__name__ == "instructions_reward"
    assert load_reward(f"{__name__}:fails_on_bad") is fails_on_bad
    fn = load_reward(FILE_SPEC)
    assert fn(["p"], ["abcd"], scale=2.0) == [8.0]
    rel = load_reward("fixtures/user_reward.py:length_reward", base_dir=HERE)
    assert rel(["p"], ["ab"]) == [2.0]


@pytest.mark.parametrize("spec,msg", [
    ("no_such_reward", "not a registered name"),
    ("no_such_module_xyz:fn", "cannot be imported"),
    ("rewards.math:no_such_fn", "no attribute"),
    ("missing/file.py:fn", "does not exist"),
    ("rewards.math:DEFAULT_ORDER", "not a function"),
])
def test_load_errors_name_the_spec(spec, msg):
    with pytest.raises(RewardLoadError) as e:
        load_reward(spec)
    assert spec in str(e.value) and msg in str(e.value) and "Expected" in str(e.value)


def test_spec_validation():
    with pytest.raises(ValidationError):
        RewardSpec(name="math", wieght=2)
    with pytest.raises(ValidationError):
        RewardSpec(weight=2)
    s = RewardSpec(fn="math")
    assert s.label == "math" and s.weight == 1.0 and s.kwargs == {} and not s.normalize


def test_weighted_combination_keeps_per_reward_values():
    specs = [
        RewardSpec(name="math", weight=2.0),
        RewardSpec(name="len", fn=FILE_SPEC, weight=0.5, kwargs={"scale": 0.1}),
        RewardSpec(name="const", fn="test_const", weight=1.0, kwargs={"value": 3.0}),
        RewardSpec(fn=f"{HERE / 'fixtures' / 'user_reward.py'}:async_reward", name="async"),
    ]
    comps = ["\\boxed{4}", "\\boxed{5}"]
    b = compute_rewards(specs, ["q1", "q2"], comps, {"answer": ["4", "4"]})
    assert b.per_reward["math"] == [1.0, 0.0]
    assert b.per_reward["len"] == pytest.approx([0.9, 0.9])
    assert b.per_reward["async"] == [1.0, 1.0]
    assert b.rewards == pytest.approx([2.0 + 0.45 + 3.0 + 1.0, 0.45 + 3.0 + 1.0])
    assert b.faults == {"math": 0, "len": 0, "const": 0, "async": 0}
    assert "rewards/math/mean" in b.metrics()


def test_normalisation_and_none_means_not_applicable():
    specs = [RewardSpec(fn=FILE_SPEC, normalize=True), RewardSpec(fn=f"{__name__}:none_for_short")]
    b = compute_rewards(specs, ["p"] * 3, ["a", "abc", "abcde"])
    norm = [(1 - 3) / math.sqrt(8 / 3), 0.0, (5 - 3) / math.sqrt(8 / 3)]
    assert b.rewards == pytest.approx([norm[0], norm[1] + 2.0, norm[2] + 2.0], abs=1e-6)
    b = compute_rewards([RewardSpec(fn=f"{__name__}:none_for_short")], ["p"], ["a"])
    assert b.rewards == [None] and b.faults[f"{__name__}:none_for_short"] == 0


def test_a_fallback_reward_scores_only_what_no_verifier_applies_to_and_normalises_over_that():
    """math-like verifier applies to long answers only (none_for_short); the fallback scores the
    rest, normalised over them alone, and its raw values are still logged for every sample."""
    specs = [RewardSpec(name="verifier", fn=f"{__name__}:none_for_short"),
             RewardSpec(name="rm", fn=FILE_SPEC, weight=0.5, normalize=True, fallback=True)]
    b = compute_rewards(specs, ["p"] * 4, ["a", "abc", "abcde", "ab"])
    # Short answers ("a", "ab") have no verifier: the rm's lengths 1 and 2 standardised over them: -1, +1.
    assert b.rewards == pytest.approx([-0.5, 2.0, 2.0, 0.5], abs=1e-6)
    assert b.per_reward["rm"] == [1.0, 3.0, 5.0, 2.0]
    plain = compute_rewards([specs[0], RewardSpec(name="rm", fn=FILE_SPEC, weight=0.5)],
                            ["p"] * 2, ["abc", "abcde"])
    assert plain.rewards == [3.5, 4.5]  # without fallback the rm reorders the verifier's ties


def test_fault_policy_zero_attributes_the_sample():
    specs = [RewardSpec(name="f", fn=f"{__name__}:fails_on_bad"), RewardSpec(name="c", fn="test_const")]
    b = compute_rewards(specs, ["p"] * 3, ["ok", "bad one", "fine"], fault_policy="zero")
    assert b.per_reward["f"] == [1.0, 0.0, 1.0]
    assert b.rewards == [2.0, 1.0, 2.0]
    assert b.faults == {"f": 1, "c": 0}
    assert "f[1]" in b.fault_messages[0] and "cannot score" in b.fault_messages[0]


def test_fault_policy_skip():
    specs = [RewardSpec(name="f", fn=f"{__name__}:fails_on_bad")]
    b = compute_rewards(specs, ["p"] * 3, ["ok", "bad", "fine"], fault_policy="skip")
    assert b.rewards == [1.0, None, 1.0] and b.skipped == [False, True, False]


def test_fault_policy_fail():
    specs = [RewardSpec(name="f", fn=f"{__name__}:fails_on_bad")]
    with pytest.raises(RewardFaultError, match="cannot score"):
        compute_rewards(specs, ["p"] * 2, ["ok", "bad"], fault_policy="fail")


def test_hanging_reward_is_timed_out_and_others_still_run():
    specs = [RewardSpec(name="h", fn=f"{__name__}:hangs", timeout_s=0.5, tolerate_all_faults=True),
             RewardSpec(name="c", fn="test_const")]
    t = time.monotonic()
    b = compute_rewards(specs, ["p"] * 2, ["a", "b"], fault_policy="zero")
    assert time.monotonic() - t < 5
    assert b.faults["h"] == 2 and "timed out" in b.fault_messages[0]
    assert b.rewards == [1.0, 1.0]


def test_wrong_return_shape_is_a_fault():
    @register_reward("test_short")
    def short(prompts, completions, **_):
        return [1.0]

    b = compute_rewards([RewardSpec(name="test_short", tolerate_all_faults=True)], ["p"] * 2, ["a", "b"])
    assert b.faults["test_short"] == 2 and "expected a list of 2" in b.fault_messages[0]


@pytest.mark.parametrize("policy", ["zero", "skip"])
def test_a_reward_faulting_on_every_sample_is_an_error_whatever_the_policy(policy):
    @register_reward("test_wrong_len")
    def wrong_len(prompts, completions, **_):
        return [1.0]

    with pytest.raises(RewardFaultError, match=r"'test_wrong_len' faulted on every sample of the batch \(3/3\).*"
                                               r"expected a list of 3.*tolerate_all_faults"):
        compute_rewards([RewardSpec(name="test_wrong_len")], ["p"] * 3, ["a", "b", "c"], fault_policy=policy)


def test_a_reward_faulting_on_some_samples_only_follows_the_policy():
    b = compute_rewards([RewardSpec(name="f", fn=f"{__name__}:fails_on_bad")], ["p"] * 2, ["ok", "bad"])
    assert b.faults["f"] == 1 and b.rewards == [1.0, 0.0]


def test_the_combination_counts_faults_over_every_batch():
    cr = CombinedReward([RewardSpec(name="f", fn=f"{__name__}:fails_on_bad")])
    cr.compute(["p"] * 2, ["ok", "bad"])
    cr.compute(["p"] * 3, ["bad", "ok", "bad"])
    assert cr.total_faults == {"f": 3}


def test_combined_reward_is_a_trl_reward():
    cr = CombinedReward([RewardSpec(name="test_const", kwargs={"value": 0.5})])
    assert cr(["p"], ["c"], extra_column=[1]) == [0.5]


def test_rewards_run_concurrently():
    @register_reward("test_sleep")
    def slow(prompts, completions, **_):
        time.sleep(1.0)
        return [1.0] * len(completions)

    t = time.monotonic()
    compute_rewards([RewardSpec(name="test_sleep"), RewardSpec(name="s2", fn="test_sleep")], ["p"], ["c"])
    assert time.monotonic() - t < 1.8


def test_warm_up_calls_the_rewards_hooks_and_survives_a_failing_one(caplog):
    calls = []

    def warm(prompts, completions, **_):
        return [1.0 for _ in completions]

    def cold(prompts, completions, **_):
        return [0.0 for _ in completions]

    def broken_hook():
        raise RuntimeError("no workers today")

    warm.warm_up = lambda: calls.append("warm")
    cold.warm_up = broken_hook
    register_reward("test_warm")(warm)
    register_reward("test_cold")(cold)
    combined = CombinedReward([{"name": "test_warm"}, {"name": "test_cold"}])
    with caplog.at_level("WARNING", logger="rewards"):
        combined.warm_up().join(10)
    assert calls == ["warm"]
    assert "no workers today" in caplog.text
    assert combined(["p"], ["c"]) == [1.0]  # scoring still works after a failed warm-up


def test_a_verifier_whose_task_is_absent_from_a_batch_of_a_mix_does_not_apply():
    """Columns of the whole dataset (dataset_columns) reach every batch: a batch of a mixed prompt set
    without math rows gives the math reward an all-None `answer` (None: does not apply), while a
    dataset without any `answer` column is still the fault it always was."""
    from rewards.combine import columns_from_rows, dataset_columns

    dataset = [{"prompt": "1+1?", "answer": "2"}, {"prompt": "Hi", "note": "chat"}]
    batch = dataset[1:]
    specs = [RewardSpec(name="math"), RewardSpec(name="len", fn=f"{HERE / 'fixtures' / 'user_reward.py'}:length_reward")]
    scored = compute_rewards(specs, ["Hi"], ["Hello"], columns_from_rows(batch, keys=dataset_columns(dataset)))
    assert scored.per_reward["math"] == [None] and scored.faults.get("math", 0) == 0
    assert scored.rewards[0] is not None
    with pytest.raises(RewardFaultError, match="answer"):
        compute_rewards(specs, ["Hi", "Yo"], ["Hello", "Hey"], columns_from_rows(batch * 2))
