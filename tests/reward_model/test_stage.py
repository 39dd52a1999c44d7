"""The `reward_model` stage end to end on tiny models (CPU): WARM averaging, member diversity,
best-k selection, preference-row errors, and a kill -9 during member 2 that resumes at member 2.

Everything is real: a tiny Gemma3, the toy tokenizer, toy preference pairs, training on CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from posttrain.data import DataError, load_preference_pairs, write_jsonl
from posttrain.manifests import MANIFEST
from posttrain.pipeline.runner import run_recipe
from posttrain.stages.reward_model import pair_indices_for_step
from rm_helpers import weights, write_recipe

# m1 vs m2: only the seed (data order) differs; m1 vs m3: only the learning rate.
STAGE = {"name": "rm", "kind": "reward_model", "model": "${models.base}", "dataset": "${datasets.prefs}",
         "eval_dataset": "${datasets.held_out}", "members": 3, "seeds": [1, 2, 1],
         "learning_rates": [1.0e-3, 1.0e-3, 3.0e-3], "probe_steps": 4, "max_steps": 8, "batch_size": 8,
         "checkpoint_every": 2, "average_best": 2}


def _recipe(root: Path) -> Path:
    return write_recipe(root, STAGE, "rm-test", pairs=64, held_out=32)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One uninterrupted run: (stage directory, its manifest)."""
    recipe = _recipe(tmp_path_factory.mktemp("rm_once"))
    manifest = run_recipe(recipe)["rm"]
    return recipe.parent / "run" / "rm", manifest


def test_output_is_the_uniform_mean_of_the_averaged_members_head_included(finished):
    stage_dir, manifest = finished
    listing = json.loads((stage_dir / "members" / "members.json").read_text())
    acc = listing["eval_accuracy"]
    best_two = sorted(sorted(range(3), key=lambda i: -acc[i])[:2])
    assert listing["averaged"] == [i + 1 for i in best_two] == manifest["metrics"]["averaged_members"]
    members = [weights(listing["members"][i]) for i in best_two]
    average = weights(manifest["outputs"]["model"])
    assert "score.weight" in average
    assert set(average) == set(members[0])
    for name, tensor in average.items():
        torch.testing.assert_close(tensor, (members[0][name] + members[1][name]) / 2, rtol=0, atol=1e-7)
    best = max(range(3), key=lambda i: acc[i])
    assert manifest["outputs"]["best_member"] == listing["members"][best]


def test_members_really_differ_by_data_order_and_learning_rate(finished):
    stage_dir, _ = finished
    assert pair_indices_for_step(64, 0, 8, seed=1) != pair_indices_for_step(64, 0, 8, seed=2)
    m1, m2, m3 = (weights(stage_dir / "members" / f"member_{i}" / "model") for i in (1, 2, 3))
    for other in (m2, m3):  # seed alone, learning rate alone
        assert any(not torch.equal(m1[k], other[k]) for k in m1)
        assert not torch.equal(m1["score.weight"], other["score.weight"])
    records = [json.loads((stage_dir / "members" / f"member_{i}" / MANIFEST).read_text()) for i in (1, 2, 3)]
    assert [r["seed"] for r in records] == [1, 2, 1]
    assert [r["learning_rate"] for r in records] == [1e-3, 1e-3, 3e-3]


def test_manifest_reports_members_average_and_ensemble(finished):
    _, manifest = finished
    m = manifest["metrics"]
    for key in ("member_1/accuracy", "member_2/accuracy", "member_3/accuracy",
                "average/accuracy", "ensemble/accuracy", "members/accuracy_mean"):
        assert 0.0 <= m[key] <= 1.0, key
    assert set(manifest["outputs"]) == {"model", "members", "best_member"}


def test_rl_reward_scores_with_the_stage_outputs_and_logs_gold_next_to_it(finished):
    from rewards.combine import CombinedReward
    from posttrain.toy.tasks import generate

    _, manifest = finished
    rows = generate("math", 6, seed=0, split="eval", fmt="prompt")
    completions = ["The answer is 3.", "5"] * 3
    cols = {"answer": [r["answer"] for r in rows]}
    for checkpoints, combine in ((manifest["outputs"]["model"], "weights"), (manifest["outputs"]["members"], "predictions")):
        reward = CombinedReward([
            {"name": "proxy", "fn": "reward_model", "kwargs": {"checkpoints": checkpoints, "combine": combine}},
            {"name": "gold", "fn": "posttrain.toy.tasks:gold_preference_reward", "weight": 0.0}])
        batch = reward.compute([r["prompt"] for r in rows], completions, cols)
        assert batch.rewards == pytest.approx(batch.per_reward["proxy"])  # weight 0: logged, not optimised
        assert all(v in (0.0, 1.0) for v in batch.per_reward["gold"])
        assert "rewards/gold/mean" in batch.metrics()


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Hi", "chosen": "Hello."}, "'rejected' is missing"),
    ({"prompt": "Hi", "chosen": "  ", "rejected": "Go away."}, "'chosen' is empty"),
    ({"prompt": "Hi", "chosen": "Hello.", "rejected": [{"role": "assistant", "content": ""}]}, "'rejected' is empty"),
    ({"chosen": "Hello.", "rejected": "Go away."}, "'prompt' is missing"),
    # A transcript kept as one text (Anthropic/hh-rlhf) is told how the column mapping splits it.
    ({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."},
     r"'prompt' is missing.*columns: {chosen: {from: chosen, turns: {\"\\n\\nHuman:\": user"),
    # A conversation whose last answer is empty, though its user turn is not.
    ({"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
      "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]},
     r"'rejected': the assistant's answer \(turn 1\) is empty"),
    ({"prompt": "Hi", "chosen": [{"role": "assistant", "content": [{"type": "text", "text": " "}]}],
      "rejected": "Go away."}, "'chosen' is empty"),
    # Sides of another shape name the side and what was expected, rather than crash.
    ({"prompt": "Hi", "chosen": 3, "rejected": "Go away."}, "'chosen' .*expected text, one message or a list"),
    ({"prompt": "Hi", "chosen": "Hello.", "rejected": [{"role": "assistant", "content": [{"type": "image"}]}]},
     r"rejected\[1\]\.content\[0\].*'image' part"),
    ({"prompt": 2.5, "chosen": "Hello.", "rejected": "Go away."}, "prompt: expected text"),
    # Two answers to different conversations, or a side that is not an answer: refused, not learnt from.
    ({"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
      "rejected": [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Go away."}]},
     r"chosen\[0\] \(user\) and rejected\[0\] \(user\) differ before the answers do"),
    ({"chosen": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                 {"role": "assistant", "content": "Hello."}],
      "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]},
     r"chosen\[0\] \(system\) and rejected\[0\] \(user\) differ"),
    ({"prompt": "Hi", "chosen": [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And?"}],
      "rejected": "Go away."}, "'chosen': the conversation ends with 'user', not with the assistant's answer"),
    ({"prompt": "Hi", "chosen": "Hello.", "rejected": [{"role": "assistant", "content": "Hello."},
                                                       {"role": "user", "content": "More."},
                                                       {"role": "assistant", "content": "No."}]},
     "'rejected' goes on where 'chosen' ends"),
])
def test_a_pair_with_a_missing_or_empty_side_is_refused_with_file_and_line(toy_tokenizer, tmp_path, row, message):
    path = tmp_path / "prefs.jsonl"
    write_jsonl(path, [{"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}, row])
    with pytest.raises(DataError, match=rf"prefs.jsonl:2: .*{message}"):
        load_preference_pairs(str(path), toy_tokenizer, 64)


def test_multi_turn_pairs_that_differ_from_an_assistant_turn_on_are_kept(toy_tokenizer, tmp_path):
    # Conversational HH-style rows: both sides share the conversation up to the answers.
    opening = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
               {"role": "user", "content": "Tell me a fact."}]
    path = tmp_path / "prefs.jsonl"
    write_jsonl(path, [
        {"chosen": opening + [{"role": "assistant", "content": "Water boils at 100 C at sea level."}],
         "rejected": opening + [{"role": "assistant", "content": "No."}]},
        # An earlier assistant turn may differ too: two trajectories from one opening question.
        {"chosen": opening[:1] + [{"role": "assistant", "content": "Hello!"}] + opening[2:]
                   + [{"role": "assistant", "content": "Snow is cold."}],
         "rejected": opening + [{"role": "assistant", "content": "No."}]},
    ])
    pairs = load_preference_pairs(str(path), toy_tokenizer, 128).pairs
    assert len(pairs) == 2 and all(chosen != rejected for chosen, rejected in pairs)


def test_sides_given_as_text_parts_score_the_same_ids_as_text(toy_tokenizer, tmp_path):
    path = tmp_path / "prefs.jsonl"
    write_jsonl(path, [
        {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."},
        {"prompt": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
         "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo."}]}],
         "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "Go away."}]}]},
    ])
    pairs = load_preference_pairs(str(path), toy_tokenizer, 64).pairs
    assert pairs[0] == pairs[1]


def test_kill_9_during_member_2_resumes_at_member_2(finished, tmp_path):
    reference_dir, _ = finished
    recipe = _recipe(tmp_path / "killed")
    stage_dir = recipe.parent / "run" / "rm"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "run", str(recipe)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    member_2 = stage_dir / "members" / "member_2"
    try:
        deadline = time.time() + 240
        while not list((member_2 / "checkpoints").glob("step_*/state.json")):
            assert proc.poll() is None, "the run ended before member 2 saved a checkpoint"
            assert time.time() < deadline, "member 2 never saved a checkpoint"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not (member_2 / MANIFEST).exists(), "member 2 finished before the kill; nothing was tested"
    member_1_done = (stage_dir / "members" / "member_1" / MANIFEST).stat().st_mtime_ns

    manifest = run_recipe(recipe)["rm"]
    assert manifest["status"] == "complete"
    assert (stage_dir / "members" / "member_1" / MANIFEST).stat().st_mtime_ns == member_1_done  # not redone
    record = json.loads((member_2 / MANIFEST).read_text())
    assert record["train"]["resumed_from_step"] >= 2
    # The resumed run ends where the uninterrupted one did.
    for name in ("member_1", "member_2", "member_3"):
        a, b = (weights(d / "members" / name / "model") for d in (stage_dir, reference_dir))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (stage_dir / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no step logged twice


def test_the_probe_depends_on_the_stage_seed_not_on_what_ran_before(finished, tmp_path):
    """Called directly (as a bench or another tool does, without the runner's seeding), the stage
    gives the same probed head whatever state torch's global generator was left in."""
    from posttrain.stages.base import StageContext
    from posttrain.stages.reward_model import RewardModelStageConfig, run_reward_model

    _, manifest = finished
    config = RewardModelStageConfig.model_validate({**manifest["config"], "members": 1, "seeds": [1],
                                                    "learning_rates": None, "average_best": None,
                                                    "probe_steps": 1, "max_steps": 1, "checkpoint_every": 0})
    heads = []
    for prior_seed in (123, 456):
        torch.manual_seed(prior_seed)
        torch.rand(1000)  # some earlier work drew from the global generator
        stage_dir = tmp_path / f"after_{prior_seed}"
        stage_dir.mkdir()
        run_reward_model(config, StageContext(name="rm", kind="reward_model", stage_dir=stage_dir, run_dir=tmp_path,
                                              seed=7, recipe_name="test"))
        heads.append(torch.load(stage_dir / "probe" / "head.pt", weights_only=True))
    assert heads[0].keys() == heads[1].keys()
    for name in heads[0]:
        assert torch.equal(heads[0][name], heads[1][name])


def test_shared_steps_members_split_from_one_fine_tune(finished, tmp_path):
    """With shared_steps the members start from one fine-tune of the probed head (its weights and
    its head), logged as its own phase between the probe and member 1; without it, from the SFT
    weights. The shared fine-tune is refused together with member_models."""
    from pydantic import ValidationError

    from posttrain.stages.base import StageContext
    from posttrain.stages.reward_model import RewardModelStageConfig, run_reward_model

    _, manifest = finished
    base = {**manifest["config"], "members": 2, "seeds": [1, 2], "learning_rates": None, "average_best": None,
            "probe_steps": 2, "max_steps": 2, "checkpoint_every": 0}
    config = RewardModelStageConfig.model_validate({**base, "shared_steps": 3})
    stage_dir = tmp_path / "rm"
    result = run_reward_model(config, StageContext(name="rm", kind="reward_model", stage_dir=stage_dir,
                                                   run_dir=tmp_path, seed=0, recipe_name="test"))
    shared = stage_dir / "shared" / "model"
    records = [json.loads((stage_dir / "members" / f"member_{i}" / MANIFEST).read_text()) for i in (1, 2)]
    assert [r["start"] for r in records] == [str(shared)] * 2
    assert 0.0 <= result.metrics["shared/accuracy"] <= 1.0
    # The shared fine-tune trained the backbone too, not only the head.
    sft, trunk = weights(manifest["config"]["model"]), weights(shared)
    assert not torch.equal(sft["model.embed_tokens.weight"], trunk["model.embed_tokens.weight"])
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    phases = [(row["phase"], row["step"]) for row in rows if "loss" in row]
    assert [p for p, _ in phases] == ["probe", "shared", "member_1", "member_2"]
    assert [s for _, s in phases] == [2, 5, 7, 9]
    with pytest.raises(ValidationError, match="shared_steps"):
        RewardModelStageConfig.model_validate({**base, "shared_steps": 3, "member_models": [base["model"]]})


def test_two_members_that_would_be_the_same_run_are_refused_at_load(tmp_path):
    from posttrain.pipeline.recipe import RecipeError, load_recipe

    # Lists cycle: with seeds [1, 2] the third member would repeat the first one exactly.
    same = {"name": "rm", "kind": "reward_model", "model": "${models.base}", "dataset": "${datasets.prefs}",
            "members": 3, "seeds": [1, 2]}
    with pytest.raises(RecipeError, match=r"recipe.yaml:\d+: stages\.rm.*member 1 and member 3 would be the same run"):
        load_recipe(write_recipe(tmp_path / "same", same, "rm-same", pairs=8, held_out=4))
    # A third list that differs where the seeds repeat makes them different runs.
    load_recipe(write_recipe(tmp_path / "differ", {**same, "dropouts": [0.0, 0.0, 0.1]}, "rm-differ", pairs=8, held_out=4))


def test_best_member_is_referenced_only_from_a_stage_with_held_out_pairs(tmp_path):
    import yaml

    from posttrain.pipeline.recipe import RecipeError, load_recipe

    rm = {"name": "rm", "kind": "reward_model", "model": "${models.base}", "dataset": "${datasets.prefs}", "members": 2}
    path = write_recipe(tmp_path, rm, "rm-best", pairs=8, held_out=4)
    recipe = yaml.safe_load(path.read_text())
    recipe["stages"].append({"name": "rl", "kind": "rl", "model": "${models.base}", "dataset": "${datasets.prefs}",
                             "rewards": [{"fn": "reward_model", "kwargs": {"checkpoints": "${stages.rm.best_member}"}}]})
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    with pytest.raises(RecipeError, match=r"stages\.rl\.rewards\[0\]\.kwargs\.checkpoints: .*gives 'best_member' only with "
                                          r"eval_dataset"):
        load_recipe(path)
    recipe["stages"][0]["eval_dataset"] = "${datasets.held_out}"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    load_recipe(path)


def test_on_invalid_row_skip_records_each_refused_row_and_trains_on_the_rest(toy_tokenizer, tmp_path):
    good = {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}
    shifted = {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
               "rejected": [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Go away."}]}
    path = tmp_path / "prefs.jsonl"
    write_jsonl(path, [good, shifted, {"prompt": "Hi", "chosen": " ", "rejected": "No."}, good])
    loaded = load_preference_pairs(str(path), toy_tokenizer, 64, skip_invalid=True)
    pairs, skipped = loaded.pairs, loaded.skipped
    assert len(pairs) == 2
    assert [s["where"] for s in skipped] == [f"{path}:2", f"{path}:3"]
    assert skipped[0]["reason"].startswith("chosen[0] (user) and rejected[0] (user) differ")
    assert skipped[1]["row"]["chosen"] == " "
    write_jsonl(path, [shifted])
    with pytest.raises(DataError, match=r"no preference rows \(1 invalid, skipped\)"):
        load_preference_pairs(str(path), toy_tokenizer, 64, skip_invalid=True)


def test_the_stage_skips_invalid_rows_when_told_and_writes_them_down(tmp_path, tiny_gemma3_dir):
    from rm_helpers import train_two_members_from

    rows = [{"prompt": f"What is {a} + 1?", "chosen": str(a + 1), "rejected": str(a + 2)} for a in range(8)]
    rows.insert(3, {"prompt": "What is 9 + 1?", "chosen": [{"role": "assistant", "content": "10"},
                                                            {"role": "user", "content": "Sure?"}], "rejected": "11"})
    manifest = train_two_members_from(tiny_gemma3_dir, rows, tmp_path, "skip", max_steps=1, on_invalid_row="skip")
    assert manifest["metrics"]["pairs"] == 8
    # Training and held-out pairs are the same file here: the row is recorded once per reading.
    assert manifest["metrics"]["pairs_skipped"] == 2
    recorded = [json.loads(line) for line in (tmp_path / "run" / "rm" / "skipped.jsonl").open()]
    assert {r["where"] for r in recorded} == {f"{tmp_path / 'prefs.jsonl'}:4"}
    assert "ends with 'user'" in recorded[0]["reason"]


def test_the_loss_subtracts_a_margin_and_adds_the_centring_term():
    from posttrain.losses.preference import bradley_terry_loss

    r_c, r_r = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.0])
    plain = -torch.nn.functional.logsigmoid(r_c - r_r)
    assert torch.allclose(bradley_terry_loss(r_c, r_r), plain)
    margin = torch.tensor([1.0, 0.0])
    assert torch.allclose(bradley_terry_loss(r_c, r_r, margin), -torch.nn.functional.logsigmoid(r_c - r_r - margin))
    assert torch.allclose(bradley_terry_loss(r_c, r_r, None, 0.01), plain + 0.01 * torch.tensor([6.25, 0.0]))


def test_margins_are_read_per_row_and_a_margin_that_is_not_a_number_is_refused(toy_tokenizer, tmp_path):
    path = tmp_path / "prefs.jsonl"
    write_jsonl(path, [{"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away.", "margin": 2},
                       {"prompt": "Hi", "chosen": "Hello!", "rejected": "No."},
                       {"prompt": "Hi", "chosen": "Hello!", "rejected": "No.", "margin": " 1.5"}])  # a CSV cell
    loaded = load_preference_pairs(str(path), toy_tokenizer, 64)
    pairs, margins = loaded.pairs, loaded.margins
    assert len(pairs) == 3 and margins == [2.0, 0.0, 1.5]
    for bad in ("two", "inf", float("nan"), True, [1]):
        write_jsonl(path, [{"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."},
                           {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away.", "margin": bad}])
        with pytest.raises(DataError, match=rf"{path}:2: 'margin' must be a finite number"):
            load_preference_pairs(str(path), toy_tokenizer, 64)


def test_margins_raise_the_loss_and_centring_pulls_rewards_towards_zero(tiny_gemma3_dir, tmp_path):
    """The same run three times (same seed, data and steps): with a margin of 3 on every pair the
    first step's loss is higher (the same rewards must now differ by 3 more); with
    center_rewards_coefficient the members' held-out rewards sit closer to 0."""
    from rm_helpers import train_two_members_from

    rows = [{"prompt": f"What is {a} + 1?", "chosen": str(a + 1), "rejected": str(a + 2)} for a in range(8)]

    def run(name, rows, **options):
        (tmp_path / name).mkdir()
        manifest = train_two_members_from(tiny_gemma3_dir, rows, tmp_path / name, name, max_steps=12,
                                          logging_steps=1, **options)
        stage_dir = Path(manifest["outputs"]["model"]).parent
        first = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()][0]
        done = [json.loads((stage_dir / "members" / m / MANIFEST).read_text()) for m in ("member_1", "member_2")]
        offset = sum(abs(c + r) / 2 for d in done for c, r in zip(d["eval_chosen"], d["eval_rejected"]))
        return manifest["metrics"], first["loss"], offset / (2 * len(rows))

    plain, plain_loss, plain_offset = run("plain", rows)
    margin, margin_loss, _ = run("margin", [{**r, "margin": 3.0} for r in rows])
    assert plain["pairs_with_margin"] == 0 and margin["pairs_with_margin"] == 8
    assert margin_loss > plain_loss + 1.0
    _, _, centred_offset = run("centred", rows, center_rewards_coefficient=1.0)
    assert centred_offset < 0.5 * plain_offset, (centred_offset, plain_offset)


def test_further_held_out_sets_are_reported_for_every_member_the_average_and_the_ensemble(tiny_gemma3_dir, tmp_path):
    """`eval_datasets`: the same pairs as eval_dataset give the same accuracies (members are scored
    from their saved checkpoints, as RL would load them); another set gets its own figures; a bad
    row in a further set stops the stage before anything trains."""
    from rm_helpers import train_two_members_from

    rows = [{"prompt": f"What is {a} + 1?", "chosen": str(a + 1), "rejected": str(a + 2)} for a in range(8)]
    other = tmp_path / "other.jsonl"
    write_jsonl(other, [{"prompt": f"What is {a} + 2?", "chosen": str(a + 2), "rejected": str(a + 5)} for a in range(6)])
    manifest = train_two_members_from(tiny_gemma3_dir, rows, tmp_path, "further", max_steps=4,
                                      eval_datasets={"again": str(tmp_path / "prefs.jsonl"), "other": str(other)})
    m = manifest["metrics"]
    for name in ("member_1", "member_2", "average", "ensemble"):
        assert m[f"again/{name}/accuracy"] == pytest.approx(m[f"{name}/accuracy"]), name
        assert 0.0 <= m[f"other/{name}/accuracy"] <= 1.0
    assert m["again/pairs"] == 8 and m["other/pairs"] == 6

    write_jsonl(other, [{"prompt": "Hi", "chosen": "Hello."}])
    (tmp_path / "bad").mkdir()
    with pytest.raises(Exception, match=rf"{other}:1: a preference row needs .*'rejected' is missing"):
        train_two_members_from(tiny_gemma3_dir, rows, tmp_path / "bad", "bad", eval_datasets={"other": str(other)})
    assert not (tmp_path / "bad" / "run" / "rm" / "members").exists()


def test_a_further_set_name_that_cannot_be_a_metric_name_is_refused():
    from posttrain.stages.reward_model import RewardModelStageConfig

    with pytest.raises(ValueError, match=r"eval_datasets: 'held out/v2' is not a usable set name"):
        RewardModelStageConfig(model="m", dataset="d", eval_datasets={"held out/v2": "x.jsonl"})


def test_held_out_pairs_are_scored_in_batches_and_returned_in_their_order(tiny_gemma3_dir, toy_tokenizer, tmp_path):
    # Without a token budget, a whole held-out set went through one forward pass: fine for 200 toy
    # pairs, out of memory for a real set. Now batch_size pairs at a time, longest first.
    from posttrain.stages.reward_model import load_reward_model, score_pairs
    from posttrain.toy.tasks import generate
    from posttrain.training import TrainingSession

    path = tmp_path / "held.jsonl"
    write_jsonl(path, generate("mix", 37, seed=3, split="eval", fmt="preference"))
    pairs = load_preference_pairs(str(path), toy_tokenizer, 128).pairs
    pad = toy_tokenizer.pad_token_id
    torch.manual_seed(0)
    model = load_reward_model(tiny_gemma3_dir, pad)
    rows_per_forward: list[int] = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: rows_per_forward.append(len(kw["input_ids"])),
                                           with_kwargs=True)
    session = TrainingSession("fp32", 0)
    chosen, rejected = score_pairs(session, model, pairs, pad, None, 8)
    hook.remove()
    assert rows_per_forward == [16, 16, 16, 16, 10]  # 8 pairs (16 sequences) a pass; 37 pairs in 5 passes
    with torch.no_grad():  # each pair alone, in the file's order: the same rewards, in the same order
        alone = [model(input_ids=torch.tensor([side])).logits[0, 0].item() for pair in pairs for side in pair]
    torch.testing.assert_close(torch.tensor(chosen), torch.tensor(alone[0::2]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(rejected), torch.tensor(alone[1::2]), rtol=1e-4, atol=1e-4)
    budgeted: list[int] = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: budgeted.append(int(kw["attention_mask"].sum())),
                                           with_kwargs=True)
    score_pairs(session, model, pairs, pad, 400, 8)  # a token budget takes precedence over the pair count
    hook.remove()
    session.close()
    assert len(budgeted) > 1 and max(budgeted) <= 400


def test_each_model_is_gone_before_the_next_is_loaded(tiny_gemma3_dir, tmp_path, monkeypatch):
    # Members train one after another: the probe's model, then each member's, must be dropped
    # (weights and AdamW state) before the next is loaded, or a large reward model needs twice its
    # memory. The average is built from the checkpoints on disk, not from M models in memory.
    import gc
    import weakref

    from posttrain.stages import reward_model as stage
    from rm_helpers import train_two_members_from

    loaded: list[weakref.ref] = []
    alive_at_each_load: list[int] = []
    real_load = stage.load_reward_model

    def load(path, *args, **kwargs):
        gc.collect()
        alive_at_each_load.append(sum(ref() is not None for ref in loaded))
        model = real_load(path, *args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(stage, "load_reward_model", load)
    rows = [{"prompt": f"What is {a} + 1?", "chosen": str(a + 1), "rejected": str(a + 2)} for a in range(8)]
    manifest = train_two_members_from(tiny_gemma3_dir, rows, tmp_path, "memory", max_steps=2)
    # probe, member 1, member 2, then the average (scored): none of the earlier ones still alive
    assert alive_at_each_load == [0, 0, 0, 0]
    assert manifest["metrics"]["average/accuracy"] >= 0.0
