"""Datasets loaded through the `datasets` library (a local saved directory here; nothing downloads),
mapped into the data contract, filtered, and fed to sft, rl and evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.data import DataError, write_jsonl
from posttrain.recipe import RecipeError, load_recipe
from posttrain.runner import run_recipe


@pytest.fixture
def gsm_like(tmp_path):
    """A GSM8K-shaped dataset dict saved with `save_to_disk`: question / answer ending in '#### N'."""
    import datasets

    def rows(lo, hi):
        return [{"question": f"What is {a} plus {a + 1}?", "answer": f"{a} + {a + 1} = {2 * a + 1}\n#### {2 * a + 1}",
                 "level": a % 2} for a in range(lo, hi)]

    d = tmp_path / "gsm_like"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows(1, 41)),
                          "test": datasets.Dataset.from_list(rows(50, 56))}).save_to_disk(str(d))
    return d


def recipe_text(path: Path) -> str:
    return f"""
name: mapped
output_dir: run
seed: 0
models:
  student: {{tiny: {{arch: gemma3, hidden_size: 64, num_heads: 2, num_kv_heads: 1, intermediate_size: 128}}}}
datasets:
  chat:
    path: {path}
    split: train
    columns: {{prompt: question, completion: answer}}
  prompts:
    path: {path}
    split: train
    filter: {{level: 1}}
    columns: {{prompt: question, answer: {{from: answer, after: "####"}}}}
  held_out:
    path: {path}
    split: test
    limit: 4
    columns:
      prompt: {{template: "Question: {{question}}"}}
      answer: {{from: answer, after: "####"}}
stages:
  - name: sft
    kind: sft
    model: ${{models.student}}
    dataset: ${{datasets.chat}}
    max_steps: 2
    batch_size: 4
  - name: rl
    kind: rl
    model: ${{stages.sft.model}}
    dataset: ${{datasets.prompts}}
    rewards: [{{name: math}}]
    max_steps: 1
    prompts_per_step: 2
    num_generations: 2
    max_new_tokens: 4
    rollout: {{backend: transformers}}
  - name: eval
    kind: evaluate
    model: ${{stages.rl.model}}
    datasets: {{gsm: "${{datasets.held_out}}"}}
    rollout: {{backend: transformers}}
    sampling: {{temperature: 0.0, max_new_tokens: 6}}
    safety: null
"""


def test_a_mapped_local_datasets_directory_feeds_sft_rl_and_evaluate(tmp_path, gsm_like):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text(gsm_like))
    manifests = run_recipe(recipe)
    assert all(m["status"] == "complete" for m in manifests.values())
    written = tmp_path / "run" / "_inputs" / "datasets"
    chat = [json.loads(line) for line in (written / "chat.jsonl").open()]
    assert len(chat) == 40 and set(chat[0]) == {"prompt", "completion"}
    prompts = [json.loads(line) for line in (written / "prompts.jsonl").open()]
    assert len(prompts) == 20 and prompts[0] == {"prompt": "What is 1 plus 2?", "answer": "3"}
    held = [json.loads(line) for line in (written / "held_out.jsonl").open()]
    assert held[0] == {"prompt": "Question: What is 50 plus 51?", "answer": "101"} and len(held) == 4
    assert manifests["eval"]["metrics"]["gsm/accuracy_n"] == 4
    # unchanged inputs: every stage is skipped the second time
    again = run_recipe(recipe)
    assert all(again[n]["ended"] == manifests[n]["ended"] for n in manifests)


def test_mapping_errors_name_the_key_path(tmp_path, gsm_like):
    bad = recipe_text(gsm_like).replace("{prompt: question, completion: answer}", "{prompt: questoin, completion: answer}")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(bad)
    with pytest.raises(Exception, match=r"datasets\.chat\.columns\.prompt: column 'questoin' is not in the dataset"):
        run_recipe(recipe)
    recipe.write_text(recipe_text(gsm_like).replace("split: test", "split: validation"))
    with pytest.raises(DataError, match=r"datasets\.held_out\.split: 'validation' is not a split"):
        run_recipe(recipe)


def test_recipe_checks_dataset_entries(tmp_path, gsm_like):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text(gsm_like).replace("    split: train\n    columns: {prompt: question, completion: answer}",
                                                    "    hub: openai/gsm8k\n    split: train", 1))
    with pytest.raises(RecipeError, match="datasets.chat.*exactly one of 'path', 'hub'"):
        load_recipe(recipe)
    recipe.write_text(recipe_text(gsm_like).replace("{from: answer, after: \"####\"}}", "{template: x, from: answer}}", 1))
    with pytest.raises(RecipeError, match="exactly one of 'from' or 'template'"):
        load_recipe(recipe)
    for turns, expected in (("{from: answer, after: x, turns: {'A:': assistant}}}", "not 'after' and 'turns'"),
                            ("{from: answer, turns: {'H:': user}}}", "no marker opens an 'assistant' turn"),
                            ("{from: answer, turns: {'H:': human}}}", "turns.H:.*'system', 'user' or 'assistant'"),
                            ("{from: answer, roles: {}}}", "'roles' needs at least one"),
                            ("{from: answer, after: x, roles: {gpt: assistant}}}", "not 'after' and 'roles'"),
                            ("{template: x, drop_last_answer: true}}", "'drop_last_answer' applies to a 'from' column")):
        recipe.write_text(recipe_text(gsm_like).replace("{from: answer, after: \"####\"}}", turns, 1))
        with pytest.raises(RecipeError, match=expected) as refused:
            load_recipe(recipe)
        assert ".str:" not in str(refused.value)  # one message, not one per shape a column may take
    recipe.write_text(recipe_text(gsm_like).replace("{from: answer, after: \"####\"}}", "3}", 1))
    with pytest.raises(RecipeError, match=r"columns: .*answer: expected a source column's name, .* got int 3"):
        load_recipe(recipe)


def test_a_directory_of_data_files_is_read_through_datasets(tmp_path):
    # The layout of a hub dataset's repository cloned to disk: data files, no save_to_disk metadata.
    clone = tmp_path / "clone"
    (clone / "data").mkdir(parents=True)
    rows = [{"prompt": f"What is {a} plus 1?", "completion": str(a + 1)} for a in range(8)]
    (clone / "data" / "train-00000-of-00001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifests = run_recipe(one_step_sft_recipe(tmp_path, f"{{path: {clone}}}"))
    assert manifests["sft"]["status"] == "complete"
    written = tmp_path / "run" / "_inputs" / "datasets" / "chat.jsonl"
    assert [json.loads(line) for line in written.open()] == rows


def test_sharegpt_conversations_train_sft_through_the_roles_mapping(tmp_path):
    # ShareGPT's shape (many public chat sets): `conversations` of {from: human|gpt|system, value}.
    rows = [{"id": str(a), "conversations": [{"from": "system", "value": "Be brief."},
                                             {"from": "human", "value": f"What is {a} plus 1?"},
                                             {"from": "gpt", "value": str(a + 1)}]} for a in range(8)]
    data = tmp_path / "sharegpt.jsonl"
    write_jsonl(data, rows)
    recipe = one_step_sft_recipe(
        tmp_path, f"{{path: {data}, columns: {{messages: {{from: conversations, roles: {{human: user, gpt: assistant}}}}}}}}")
    manifests = run_recipe(recipe)
    assert manifests["sft"]["status"] == "complete"
    written = [json.loads(line) for line in (tmp_path / "run" / "_inputs" / "datasets" / "chat.jsonl").open()]
    assert written[3] == {"messages": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "What is 3 plus 1?"},
                                       {"role": "assistant", "content": "4"}]}

    # A role the mapping does not name is refused with the source row and the message's index.
    rows[5]["conversations"].append({"from": "tool", "value": "{}"})
    write_jsonl(data, rows)
    with pytest.raises(DataError, match=r"datasets\.chat\.columns\.messages\.roles \(column 'conversations'\)\[3\]: "
                                        r"role 'tool' is not renamed .* \(source row 5\)"):
        run_recipe(recipe)


def test_sharegpt_messages_without_a_mapping_are_told_how_to_map_them():
    from posttrain.chat import ChatFormatError, normalise_messages

    with pytest.raises(ChatFormatError, match=r"messages\[0\]: expected a mapping with 'role' and 'content'.*"
                                              r"roles: {human: user, gpt: assistant}"):
        normalise_messages([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}])


def one_step_sft_recipe(tmp_path: Path, chat_dataset: str) -> Path:
    """A recipe that trains a tiny model one SFT step on `chat_dataset` (a datasets: entry in YAML)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
name: one-step
output_dir: run
models:
  student: {{tiny: {{arch: gemma3, hidden_size: 64, num_heads: 2, num_kv_heads: 1, intermediate_size: 128}}}}
datasets:
  chat: {chat_dataset}
stages:
  - {{name: sft, kind: sft, model: "${{models.student}}", dataset: "${{datasets.chat}}", max_steps: 1, batch_size: 4}}
""")
    return recipe


def test_prompts_from_a_preference_set_drop_the_last_answer(tmp_path, toy_tokenizer):
    # RL prompts from Anthropic HH's `chosen` transcripts: the conversation before its last answer.
    rows = [{"chosen": f"\n\nHuman: What is {a} plus 1?\n\nAssistant: {a + 1}.\n\nHuman: And plus 2?\n\nAssistant: "
                       f"{a + 2}.", "rejected": "..."} for a in range(4)]
    data = tmp_path / "hh.jsonl"
    write_jsonl(data, rows)
    from posttrain.data import materialize_dataset

    turns = {"\n\nHuman:": "user", "\n\nAssistant:": "assistant"}
    out = tmp_path / "prompts.jsonl"
    materialize_dataset(str(data), {"columns": {"prompt": {"from": "chosen", "turns": turns, "drop_last_answer": True}}},
                        out, "datasets.prompts", "local")
    first = json.loads(out.read_text().splitlines()[0])
    assert first == {"prompt": [{"role": "user", "content": "What is 0 plus 1?"}, {"role": "assistant", "content": "1."},
                                {"role": "user", "content": "And plus 2?"}]}
    # ... a generation prompt, as rl, BOND and distillation tokenise it: the model's turn comes next.
    from posttrain.chat import render_text, tokenize_prompt

    ids = tokenize_prompt(toy_tokenizer, first["prompt"])
    assert toy_tokenizer.decode(ids) == render_text(first["prompt"], add_generation_prompt=True)
    assert render_text(first["prompt"], add_generation_prompt=True).endswith("And plus 2?<end_of_turn>\n<start_of_turn>model\n")

    rows[2]["chosen"] += "\n\nHuman: Thanks!"  # ends with the user: no answer to drop, refused with its row
    write_jsonl(data, rows)
    with pytest.raises(DataError, match=r"datasets\.prompts\.columns\.prompt\.drop_last_answer \(column 'chosen'\): "
                                        r"the conversation ends with 'user', not with an assistant answer .*\(source row 2\)"):
        materialize_dataset(str(data), {"columns": {"prompt": {"from": "chosen", "turns": turns, "drop_last_answer": True}}},
                            tmp_path / "again.jsonl", "datasets.prompts", "local")


def test_a_later_stage_s_bad_mapping_fails_before_the_first_stage_trains(tmp_path):
    good = tmp_path / "good.jsonl"
    write_jsonl(good, [{"prompt": f"What is {a} plus 1?", "completion": str(a + 1)} for a in range(8)])
    recipe = one_step_sft_recipe(tmp_path, f"{{path: {good}}}")
    text = recipe.read_text().replace("datasets:\n", f"datasets:\n  later: {{path: {good}, columns: {{prompt: questoin}}}}\n")
    recipe.write_text(text + '  - {name: sft2, kind: sft, model: "${stages.sft.model}", dataset: "${datasets.later}", '
                             'max_steps: 1, batch_size: 4}\n')
    with pytest.raises(DataError, match=r"datasets\.later\.columns\.prompt: column 'questoin' is not in the dataset"):
        run_recipe(recipe)
    assert not (tmp_path / "run" / "sft").exists()  # nothing trained before the mistake was found
