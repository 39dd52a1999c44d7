"""Reward models: Gemma-format scoring, batching, WARM weight average, loaded once."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from rewards import RewardSpec, compute_rewards  # noqa: E402
from rewards.reward_model import RewardModelScorer, get_scorer, load_count, reward_model_reward  # noqa: E402


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from posttrain.toy.models import TinyModelSpec, build_tiny_model
    from posttrain.toy.tokenizer import build_toy_tokenizer

    root = tmp_path_factory.mktemp("rm")
    tok = build_toy_tokenizer(root / "tok", seed=0)
    paths = []
    for seed in (1, 2):
        spec = TinyModelSpec(arch="gemma3", hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                             head_dim=32, intermediate_size=128, head="sequence_classification", seed=seed)
        build_tiny_model(spec, tok, root / f"rm{seed}")
        paths.append(str(root / f"rm{seed}"))
    # the reference: a checkpoint whose weights are the average, made by hand
    from transformers import AutoModelForSequenceClassification

    a, b = (AutoModelForSequenceClassification.from_pretrained(p) for p in paths)
    sb = b.state_dict()
    a.load_state_dict({k: (v + sb[k]) / 2 if v.is_floating_point() else v for k, v in a.state_dict().items()})
    a.save_pretrained(str(root / "avg"))
    tok.save_pretrained(str(root / "avg"))
    return paths, str(root / "avg")


PROMPTS = ["What is 2+2?", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]]
COMPLETIONS = ["4", [{"role": "assistant", "content": "Hello there, friend."}]]


def test_gemma_format(checkpoints):
    scorer = get_scorer(checkpoints[0][0])
    ids = scorer.encode("Hi", "Hello")
    tok = scorer.tokenizer
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    text = tok.decode(ids[1:])
    assert text == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
    sys_ids = scorer.encode(PROMPTS[1], COMPLETIONS[1])
    assert tok.decode(sys_ids[1:]).startswith("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>")


def test_batched_scores_equal_single(checkpoints):
    scorer = get_scorer(checkpoints[0][0])
    batch = scorer.score(PROMPTS, COMPLETIONS, batch_size=2)
    single = [scorer.score([p], [c])[0] for p, c in zip(PROMPTS, COMPLETIONS)]
    assert batch == pytest.approx(single, abs=1e-5)


def test_warm_average_equals_averaged_model_and_loads_once(checkpoints):
    paths, avg = checkpoints
    before = load_count()
    warm = reward_model_reward(PROMPTS, COMPLETIONS, checkpoints=paths)
    assert load_count() == before + 1
    ref = RewardModelScorer([avg]).score(PROMPTS, COMPLETIONS)
    assert warm == pytest.approx(ref, abs=1e-5)
    members = [get_scorer(p).score(PROMPTS, COMPLETIONS) for p in paths]
    assert warm != pytest.approx(members[0], abs=1e-5)
    n = load_count()
    for _ in range(3):  # through the combination: no reload
        b = compute_rewards([RewardSpec(name="reward_model", kwargs={"checkpoints": paths})], PROMPTS, COMPLETIONS)
        assert b.rewards == pytest.approx(warm, abs=1e-5)
    assert load_count() == n


def test_mismatched_architectures_rejected(checkpoints, tmp_path):
    from posttrain.toy.models import TinyModelSpec, build_tiny_model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoints[0][0])
    build_tiny_model(TinyModelSpec(arch="gemma3", hidden_size=96, num_layers=2, num_heads=2, num_kv_heads=1,
                                   head="sequence_classification"), tok, tmp_path / "other")
    with pytest.raises(ValueError, match="identical shapes"):
        RewardModelScorer([checkpoints[0][0], str(tmp_path / "other")])


@pytest.mark.parametrize("kwargs, message", [
    ({"checkpoint": "rm/model"}, r"kwargs.checkpoint: not an option .*did you mean 'checkpoints'"),
    ({}, "kwargs.checkpoints: the reward_model reward needs it"),
    ({"checkpoints": "rm/model", "combine": "mean"}, "kwargs.combine: expected weights .* got 'mean'"),
    ({"checkpoints": "rm/model", "dtype": "fp16"}, "kwargs.dtype: expected float32, bfloat16 or float16"),
    ({"checkpoints": "rm/model", "batch_size": 0}, "kwargs.batch_size: expected a whole number"),
])
def test_the_reward_model_rewards_options_are_checked_when_the_recipe_loads(kwargs, message):
    from pydantic import ValidationError

    from rewards.combine import RewardSpec

    with pytest.raises(ValidationError, match=message):
        RewardSpec(name="proxy", fn="reward_model", kwargs=kwargs)
    RewardSpec(name="proxy", fn="reward_model", kwargs={"checkpoints": ["a", "b"], "combine": "predictions",
                                                        "dtype": "bfloat16", "batch_size": 4})
