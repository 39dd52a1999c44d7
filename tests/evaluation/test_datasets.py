"""Datasets loaded through the `datasets` library (a local saved directory here; nothing downloads),
mapped into the data contract, filtered, and fed to sft, rl and evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tiny_recipes import evaluate_stage, rl_on_math, sft_stage

from posttrain.data import DataError, write_jsonl
from posttrain.pipeline.recipe import RecipeError, load_recipe
from posttrain.pipeline.runner import run_recipe


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
""" + "".join([
        sft_stage("${models.student}", "${datasets.chat}", max_steps=2, batch_size=4),
        rl_on_math("${stages.sft.model}", "${datasets.prompts}", max_steps=1, prompts_per_step=2, num_generations=2,
                   max_new_tokens=4),
        evaluate_stage("${stages.rl.model}", {"gsm": "${datasets.held_out}"}, safety=None),
    ])


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
    with pytest.raises(RecipeError, match="exactly one of 'from', 'template' or 'by'"):
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
    text = recipe.read_text().replace("datasets:\n", f"datasets:\n  later: {{path: {good}, columns: {{prompt: questoin, "
                                                   f"completion: completion}}}}\n")
    recipe.write_text(text + '  - {name: sft2, kind: sft, model: "${stages.sft.model}", dataset: "${datasets.later}", '
                             'max_steps: 1, batch_size: 4}\n')
    with pytest.raises(DataError, match=r"datasets\.later\.columns\.prompt: column 'questoin' is not in the dataset"):
        run_recipe(recipe)
    assert not (tmp_path / "run" / "sft").exists()  # nothing trained before the mistake was found


def test_preference_sets_that_keep_two_answers_and_a_label_pick_each_side_by_the_label(tmp_path):
    """stanfordnlp/SHP (human_ref_A/B, labels 1 when A won), PKU-SafeRLHF (response_0/1,
    better_response_id) and lmsys/chatbot_arena_conversations (conversation_a/b, winner, with ties
    kept out by the filter): `by` and `cases` read the winning answer as `chosen`."""
    from posttrain.data import materialize_dataset

    def mapped(rows, columns, row_filter=None, name="rows.jsonl"):
        data = tmp_path / name
        if name.endswith(".csv"):
            import csv
            with data.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        else:
            write_jsonl(data, rows)
        out = tmp_path / f"out-{name}.jsonl"
        materialize_dataset(str(data), {"columns": columns, "filter": row_filter}, out, "datasets.prefs", "local")
        return [json.loads(line) for line in out.read_text().splitlines()]

    shp = [{"history": "Why is the sky blue?", "human_ref_A": "Rayleigh scattering.", "human_ref_B": "It is not.",
            "labels": 1},
           {"history": "Is 7 prime?", "human_ref_A": "No.", "human_ref_B": "Yes, 7 is prime.", "labels": 0}]
    shp_columns = {"prompt": {"from": "history"},
                   "chosen": {"by": "labels", "cases": {"1": "human_ref_A", "0": "human_ref_B"}},
                   "rejected": {"by": "labels", "cases": {"1": "human_ref_B", "0": "human_ref_A"}}}
    expected = [{"prompt": "Why is the sky blue?", "chosen": "Rayleigh scattering.", "rejected": "It is not."},
                {"prompt": "Is 7 prime?", "chosen": "Yes, 7 is prime.", "rejected": "No."}]
    assert mapped(shp, shp_columns) == expected
    # The same rows as CSV (the label is the text "1") and as floats (a parquet column with a gap).
    assert mapped(shp, shp_columns, name="shp.csv") == expected
    assert mapped([{**r, "labels": float(r["labels"])} for r in shp], shp_columns, name="float.jsonl") == expected

    pku = [{"prompt": "How do I pick a lock?", "response_0": "I can't help with that.", "response_1": "Use a pin.",
            "better_response_id": 0}]
    assert mapped(pku, {"prompt": "prompt",
                        "chosen": {"by": "better_response_id", "cases": {"0": "response_0", "1": "response_1"}},
                        "rejected": {"by": "better_response_id", "cases": {"0": "response_1", "1": "response_0"}}},
                  name="pku.jsonl")[0]["chosen"] == "I can't help with that."

    def talk(answer):
        return [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": answer}]
    arena = [{"conversation_a": talk("Hello!"), "conversation_b": talk("Go away."), "winner": "model_a"},
             {"conversation_a": talk("Hm."), "conversation_b": talk("Hi there!"), "winner": "tie"},
             {"conversation_a": talk("Go away."), "conversation_b": talk("Hey, how can I help?"), "winner": "model_b"}]
    arena_columns = {"chosen": {"by": "winner", "cases": {"model_a": "conversation_a", "model_b": "conversation_b"}},
                     "rejected": {"by": "winner", "cases": {"model_a": "conversation_b", "model_b": "conversation_a"}}}
    rows = mapped(arena, arena_columns, row_filter={"winner": ["model_a", "model_b"]}, name="arena.jsonl")
    assert [r["chosen"][-1]["content"] for r in rows] == ["Hello!", "Hey, how can I help?"]
    assert [r["rejected"][-1]["content"] for r in rows] == ["Go away.", "Go away."]
    # Without the filter the tie is refused with its row and told how to keep such rows out, not guessed or dropped.
    with pytest.raises(DataError, match=r"datasets\.prefs\.columns\.chosen\.cases: 'winner' is 'tie', which no case "
                                        r"names \(cases: \['model_a', 'model_b'\]\); keep only the rows to read with "
                                        r"`filter: \{winner: \[\.\.\.\]\}` \(source row 1\)"):
        mapped(arena, arena_columns, name="arena-ties.jsonl")
    # A case naming a column the rows lack is reported under the case's key path.
    typo = {**shp_columns, "chosen": {"by": "labels", "cases": {"1": "human_ref_a", "0": "human_ref_B"}}}
    with pytest.raises(DataError, match=r"columns\.chosen\.cases\.1: column 'human_ref_a' is not in the dataset"):
        mapped(shp, typo, name="typo.jsonl")
    # YAML's unquoted yes/no are booleans: the refusal says so.
    voted = [{"a": "Sure.", "b": "No.", "a_better": "yes"}]
    with pytest.raises(DataError, match=r"YAML reads an unquoted yes as a boolean, so quote the recipe's key"):
        mapped(voted, {"chosen": {"by": "a_better", "cases": {True: "a", False: "b"}},
                       "rejected": {"by": "a_better", "cases": {True: "b", False: "a"}}}, name="voted.jsonl")
    # A filter on a CSV's text label matches the recipe's number, as the cases do.
    assert mapped(shp, shp_columns, row_filter={"labels": 1}, name="shp-filtered.csv") == expected[:1]


def test_recipe_checks_label_picked_columns(tmp_path, gsm_like):
    recipe = tmp_path / "recipe.yaml"
    prefs = "    columns: {prompt: question, completion: answer}"
    for columns, expected in (
            ("{prompt: question, chosen: {by: labels}, rejected: answer}", "'by' .* and 'cases' .* go together"),
            ("{prompt: question, chosen: {by: labels, cases: {}}, rejected: answer}", "'cases' needs at least one"),
            ("{prompt: question, chosen: {from: a, by: labels, cases: {1: a}}, rejected: answer}",
             "exactly one of 'from', 'template' or 'by'"),
            ("{prompt: question, chosen: {by: labels, cases: {1: a, '1': b}}, rejected: answer}",
             "the label '1' is given twice"),
            ("{prompt: question, chosen: {by: labels, cases: {1: a, 0: b}}, rejected: {by: labels, cases: {1: b, 0: b}}}",
             r"for labels = '0', 'chosen' and 'rejected' both read 'b'"),
            ("{prompt: question, chosen: {by: labels, cases: {1: a, 0: b}}, rejected: {by: labels, cases: {1: b}}}",
             r"labels = '0' is a case of only one of 'chosen' and 'rejected'"),
            ("{prompt: question, chosen: {by: labels, cases: {true: a, false: b}, after: x}, rejected: answer}", None)):
        recipe.write_text(recipe_text(gsm_like).replace(prefs, f"    columns: {columns}", 1))
        if expected is None:  # a valid mapping; YAML's true is the label "true"
            import yaml

            from posttrain.pipeline.recipe import DatasetEntry

            # checked as an entry: the recipe's sft stage could not train on preference rows
            entry = DatasetEntry.model_validate({"path": str(gsm_like), "columns": yaml.safe_load(columns)})
            assert entry.columns["chosen"].cases == {"true": "a", "false": "b"}
            continue
        with pytest.raises(RecipeError, match=expected):
            load_recipe(recipe)
