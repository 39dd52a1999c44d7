"""TRL's own reward functions run unchanged: keyword-only calls, conversational completions,
completion_ids, factories built from the recipe; posttrain's rewards keep both prompt shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rewards import CombinedReward, RewardSpec, compute_rewards, register_reward

pytest.importorskip("trl")

CHAT = [[{"role": "user", "content": "What is 1/3 + 0?"}], [{"role": "user", "content": "And 1/2?"}]]
TEXTS = ["<think>easy</think> The answer is $\\boxed{\\frac{1}{3}}$",
         "no tags, the answer is $\\boxed{\\frac{1}{3}}$"]
SOLUTIONS = ["$\\frac{1}{3}$", "$\\frac{1}{2}$"]
TRL_SPECS = [
    {"name": "accuracy", "fn": "trl.rewards:accuracy_reward"},
    {"name": "think", "fn": "trl.rewards:think_format_reward"},
    {"name": "overlong", "fn": "trl.rewards:get_soft_overlong_punishment",
     "factory": {"max_completion_len": 10, "soft_punish_cache": 4}},
    {"name": "repetition", "fn": "trl.rewards:get_repetition_penalty_reward",
     "factory": {"ngram_size": 2, "max_penalty": -1.0}},
]


def test_trl_rewards_called_as_grpo_trainer_calls_them():
    ids = [[1, 2, 3, 4], [5, 5, 5, 5, 5, 5, 5, 5]]
    b = compute_rewards(TRL_SPECS, CHAT, TEXTS, {"solution": SOLUTIONS}, completion_ids=ids)
    assert b.faults == {"accuracy": 0, "think": 0, "overlong": 0, "repetition": 0}, b.fault_messages
    assert b.per_reward["accuracy"] == [1.0, 0.0]
    assert b.per_reward["think"] == [1.0, 0.0]
    assert b.per_reward["overlong"] == [0.0, -0.5]  # 8 tokens: (10 - 4 - 8) / 4
    assert b.per_reward["repetition"] == [0.0, pytest.approx(-6 / 7)]


def test_every_call_is_keyword_only_with_trl_shapes():
    seen = []

    def spy(*args, **kwargs):
        seen.append((args, kwargs))
        return [0.0] * len(kwargs["completions"])

    register_reward("test_spy")(spy)
    cr = CombinedReward([{"name": "test_spy"}])
    cr.compute(CHAT, ["a", "b"], {"solution": SOLUTIONS}, completion_ids=[[1], [2]])
    args, kw = seen[-1]
    assert args == ()
    assert kw["prompts"] == CHAT and kw["solution"] == SOLUTIONS and kw["completion_ids"] == [[1], [2]]
    assert kw["completions"] == [[{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b"}]]
    cr.compute(["p1", "p2"], ["a", "b"])
    args, kw = seen[-1]
    assert args == () and kw["completions"] == ["a", "b"] and kw["completion_ids"] is None
    # used as a TRL reward itself: per-sample columns are batched, TRL's extras pass through
    log = []
    cr(prompts=CHAT, completions=[[{"role": "assistant", "content": "a"}]] * 2, completion_ids=[[1], [2]],
       solution=SOLUTIONS, trainer_state=None, log_extra=lambda *a: log.append(a))
    args, kw = seen[-1]
    assert args == () and kw["solution"] == SOLUTIONS and callable(kw["log_extra"]) and kw["trainer_state"] is None


def test_missing_completion_ids_and_bad_factories_are_clear():
    b = compute_rewards([TRL_SPECS[2]], ["p"], ["x"])
    assert b.faults == {"overlong": 1} and "needs completion_ids" in b.fault_messages[0]
    with pytest.raises(ValueError, match=r"rewards\[0\]\.factory.*max_len"):
        CombinedReward([{"fn": "trl.rewards:get_soft_overlong_punishment", "factory": {"max_len": 3}}])
    with pytest.raises(ValueError, match=r"rewards\[0\]\.factory.*expected a reward function"):
        CombinedReward([{"fn": "trl.rewards:think_format_reward",
                         "factory": {"completions": [[{"content": "x"}]]}}])
    with pytest.raises(ValueError, match="column 'completions'"):
        compute_rewards([TRL_SPECS[1]], ["p"], ["x"], {"completions": ["y"]})


def test_posttrain_rewards_accept_both_prompt_shapes():
    specs = [RewardSpec(name="math"), RewardSpec(name="instructions")]
    cols = {"answer": ["4", "4"], "instruction_id_list": [["punctuation:no_comma"]] * 2, "kwargs": [[{}]] * 2}
    for prompts in (["2+2?", "2+2?"], [[{"role": "user", "content": "2+2?"}]] * 2):
        b = compute_rewards(specs, prompts, ["\\boxed{4}", "\\boxed{5}, no"], cols)
        assert b.per_reward["math"] == [1.0, 0.0]
        assert b.per_reward["instructions"] == [1.0, 0.0]
    code = compute_rewards([{"name": "code"}], [[{"role": "user", "content": "sq"}]],
                           ["```python\ndef sq(x):\n    return x * x\n```"], {"tests": [["assert sq(3) == 9"]]})
    assert code.per_reward["code"] == [1.0]


def test_trl_rewards_in_an_rl_stage(tiny_gemma3_dir, tmp_path):
    from posttrain.data import write_jsonl
    from posttrain.stages.base import StageContext
    from posttrain.stages.rl import RLStageConfig, run_rl

    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "solution": f"${i + 1}$",
             "answer": str(i + 1)} for i in range(4)]
    write_jsonl(tmp_path / "chat.jsonl", rows)
    specs = TRL_SPECS + [{"name": "math"}]
    cfg = RLStageConfig(model=str(tiny_gemma3_dir), dataset=str(tmp_path / "chat.jsonl"), rewards=specs,
                        num_generations=2, prompts_per_step=2, max_steps=1, max_new_tokens=12,
                        checkpoint_every=0, fault_policy="fail", rollout={"backend": "transformers"})
    stage_dir = tmp_path / "rl"
    stage_dir.mkdir()
    run_rl(cfg, StageContext(name="rl", kind="rl", stage_dir=stage_dir, run_dir=tmp_path, seed=0,
                             recipe_name="test"))
    rows = [json.loads(x) for x in Path(stage_dir / "metrics.jsonl").read_text().splitlines()]
    for name in ("accuracy", "think", "overlong", "repetition", "math"):
        assert rows[-1][f"reward/{name}/faults"] == 0, name
    # 12 new tokens against max_completion_len 10: the overlong penalty saw the token ids
    assert rows[-1]["reward/overlong/mean"] < 0
