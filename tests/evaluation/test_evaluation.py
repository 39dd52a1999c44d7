"""posttrain.evaluation: estimators against constructed cases, IFEval on the published GPT-4
responses, a model's win rate against itself, and data-parallel evaluation equal to one process."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import pytest

from posttrain.evaluation import (
    Estimate,
    SetScoring,
    evaluate_prompts,
    flatten,
    ifeval_from_responses,
    mean,
    pass_at_k,
    proportion,
    ratio,
    side_by_side,
)

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("POSTTRAIN_SHARED_DATA", REPO.parent / "shared" / "data"))


def brute_pass_at_k(outcomes: list[bool], k: int) -> float:
    """pass@k by definition: the share of all k-subsets of the samples holding a pass."""
    subsets = list(combinations(outcomes, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 1, 1), (5, 2, 2), (6, 3, 4), (10, 1, 10), (8, 7, 3), (4, 4, 2)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    outcomes = [True] * c + [False] * (n - c)
    assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(outcomes, k), abs=1e-12)
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_large_n_and_bad_arguments():
    assert pass_at_k(200, 13, 1) == pytest.approx(13 / 200)
    assert 0.0 < pass_at_k(1000, 1, 100) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(3, 1, 5)


def test_intervals():
    p = proportion(30, 100)
    assert p.value == 0.3 and p.n == 100 and p.low == pytest.approx(0.2189, abs=1e-3) and p.high == pytest.approx(0.3958, abs=1e-3)
    assert proportion(0, 10).low == 0.0 and 0.0 < proportion(0, 10).high < 0.35  # Wilson: not a zero-width interval
    m = mean([1.0, 2.0, 3.0, None, float("nan")])
    assert m.n == 3 and m.value == 2.0 and m.low == pytest.approx(2 - 4.303 / math.sqrt(3), abs=1e-3)
    r = ratio([1, 2, 2], [2, 2, 2])  # 5 of 6 instructions, clustered in 3 prompts
    assert r.value == pytest.approx(5 / 6) and r.n == 6 and r.low < 5 / 6 < r.high
    flat = flatten("math/", {"accuracy": p, "prompts": 100})
    assert flat == {"math/accuracy": 0.3, "math/accuracy_ci_low": pytest.approx(0.2189, abs=1e-3),
                    "math/accuracy_ci_high": pytest.approx(0.3958, abs=1e-3), "math/accuracy_n": 100, "math/prompts": 100}


def test_ifeval_figures_on_gpt4_responses_match_the_published_ones():
    resp, inp = DATA / "ifeval_gpt4_responses.jsonl", DATA / "ifeval_input_data.jsonl"
    if not (resp.exists() and inp.exists()):
        pytest.skip(f"IFEval data not found in {DATA} (set POSTTRAIN_SHARED_DATA)")
    inputs = {r["prompt"]: r for r in map(json.loads, inp.open())}
    responses = [json.loads(line) for line in resp.open()]
    figures = ifeval_from_responses([r["response"] for r in responses], [inputs[r["prompt"]] for r in responses])
    # IFEval paper, GPT-4: prompt-level strict 76.89, instruction-level strict 83.57 (loose 79.30 / 85.37)
    assert figures["ifeval/prompt_strict"].n == 541 and figures["ifeval/instruction_strict"].n == 834
    assert abs(figures["ifeval/prompt_strict"].value - 0.7689) <= 0.005
    assert abs(figures["ifeval/instruction_strict"].value - 0.8357) <= 0.005
    assert abs(figures["ifeval/prompt_loose"].value - 0.7930) <= 0.01
    assert abs(figures["ifeval/instruction_loose"].value - 0.8537) <= 0.01
    for e in figures.values():
        assert e.low < e.value < e.high and e.high - e.low < 0.08


def test_side_by_side_counts_ties_and_wins():
    judge = lambda prompts, completions: [float(len(c)) for c in completions]  # noqa: E731 - longer wins
    out = side_by_side(["p"] * 4, ["aa", "a", "aaa", "a"], ["a", "a", "a", "aa"], judge)
    assert (out["wins"].value, out["ties"].value, out["losses"].value) == (0.5, 0.25, 0.25)
    assert out["win_rate"].value == pytest.approx((2 + 0.5) / 4) and out["win_rate"].n == 4
    same = side_by_side(["p"] * 3, ["x", "y", "z"], ["x", "y", "z"], judge)
    assert same["win_rate"] == Estimate(0.5, 0.5, 0.5, 3)
    assert side_by_side(["p"], ["aaa"], ["a"], judge, tie_margin=5)["ties"].value == 1.0


@pytest.fixture(scope="module")
def engine(tiny_gemma3_dir):
    from posttrain.rollout import RolloutConfig, create_engine

    with create_engine(str(tiny_gemma3_dir), RolloutConfig(backend="transformers")) as e:
        yield e


def test_win_rate_of_a_model_against_itself_is_one_half(engine, tiny_reward_model_dir):
    from posttrain.rollout import SamplingParams
    from posttrain.toy.tasks import generate
    from rewards.reward_model import RewardModelScorer

    prompts = [r["prompt"] for r in generate("chat", 60, seed=3, split="eval", fmt="prompt")]
    answers = []
    for seed in (1, 2):  # two independent samples of the same model
        groups = engine.generate(prompts, n=1, sampling=SamplingParams(temperature=1.0, max_new_tokens=12, seed=seed))
        answers.append([g[0].text for g in groups])
    assert answers[0] != answers[1]
    out = side_by_side(prompts, answers[0], answers[1], RewardModelScorer([str(tiny_reward_model_dir)]).score)
    rate = out["win_rate"]
    assert rate.n == 60 and rate.low <= 0.5 <= rate.high and rate.high - rate.low < 0.4


def test_math_set_every_figure_has_n_and_an_interval(engine):
    from posttrain.evaluation import SafetyChecks
    from posttrain.rollout import SamplingParams
    from posttrain.toy.tasks import generate

    rows = generate("math", 6, seed=0, split="eval", fmt="prompt")
    res = evaluate_prompts(engine, rows, sampling=SamplingParams(temperature=0.0, max_new_tokens=6),
                           scoring=SetScoring(safety=SafetyChecks()))
    for key in ("accuracy", "mean_reward", "stop_rate", "length_tokens", "safety/toxic_rate", "safety/pii_rate",
                "safety/misidentification_rate"):
        e = res.metrics[key]
        assert e.n == 6 and (e.low <= e.value <= e.high or e.low != e.low), (key, e)
    assert [r["index"] for r in res.records] == list(range(6))
    assert res.metrics["accuracy"].value == sum(r["correct"][0] for r in res.records) / 6


def test_code_pass_at_k_from_sampled_answers(engine):
    from posttrain.rollout import SamplingParams
    from posttrain.toy.tasks import generate

    rows = generate("code", 3, seed=0, split="eval", fmt="prompt")
    res = evaluate_prompts(engine, rows, sampling=SamplingParams(temperature=1.0, max_new_tokens=8, seed=0),
                           samples=4, scoring=SetScoring(k_values=(1, 4)))
    assert res.metrics["pass@1"].n == 3 and "pass@4" in res.metrics
    assert all(len(r["completions"]) == 4 for r in res.records)
    expected = sum(pass_at_k(4, sum(r["correct"]), 4) for r in res.records) / 3
    assert res.metrics["pass@4"].value == pytest.approx(expected)


def test_instruction_sets_report_ifeval_figures(engine):
    from posttrain.rollout import SamplingParams
    from posttrain.toy.tasks import generate

    rows = generate("instructions", 4, seed=0, split="eval", fmt="prompt")
    res = evaluate_prompts(engine, rows, sampling=SamplingParams(temperature=0.0, max_new_tokens=8))
    n_instr = sum(len(r["instruction_id_list"]) for r in rows)
    assert res.metrics["ifeval/prompt_strict"].n == 4 and res.metrics["ifeval/instruction_loose"].n == n_instr
    assert res.metrics["accuracy"].value == res.metrics["ifeval/prompt_strict"].value


def test_ranks_answer_their_share_and_the_gathered_figures_equal_one_process(engine):
    from posttrain.rollout import SamplingParams
    from posttrain.toy.tasks import generate

    rows = generate("math", 5, seed=1, split="eval", fmt="prompt")
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    single = evaluate_prompts(engine, rows, sampling=greedy)
    # Two ranks in turn (no process group needed): rank 1's records reach rank 0 through its
    # session's gather_lists, as a TrainingSession's all-gather would bring them.
    rank1 = evaluate_prompts(engine, rows, sampling=greedy, session=_Rank(1, 2, lambda recs: recs))
    assert [r["index"] for r in rank1.records] == [1, 3]
    rank0 = evaluate_prompts(engine, rows, sampling=greedy, session=_Rank(0, 2, lambda recs: recs + rank1.records))
    assert rank0.records == single.records and rank0.metrics == single.metrics


@dataclass
class _Rank:
    """What evaluate_prompts reads of a TrainingSession: its place in the launch and its all-gather."""

    rank: int
    world_size: int
    gather_lists: object
