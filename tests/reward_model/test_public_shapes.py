"""The `reward_model` stage on what users bring: a start checkpoint of another architecture
(Llama, Qwen2, Gemma 3 with its vision tower) in the layout `save_pretrained` writes and a hub
download holds, and preference
rows in the shapes public sets use, read from a JSONL file.

Everything is real: tiny Llama/Qwen2 models with the toy tokenizer, training on CPU, and the
`rl` stage's reward-model scorer reading the stage's output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from posttrain.chat import END_OF_TURN, START_OF_TURN
from posttrain.pipeline.runner import run_recipe
from rewards.reward_model import RewardModelScorer
from rm_helpers import train_two_members_from

Q = "Tom has 3 apples and gets 4 more. How many apples does Tom have now?"
GOOD, BAD = "3 + 4 = 7. The answer is 7.", "3 + 4 = 8. The answer is 8."
USER = {"role": "user", "content": Q}
ROWS = [
    # HuggingFaceH4/ultrafeedback_binarized: the prompt as text and again inside each conversation.
    {"prompt": Q, "chosen": [USER, {"role": "assistant", "content": GOOD}],
     "rejected": [USER, {"role": "assistant", "content": BAD}], "score_chosen": 8.0, "score_rejected": 3.0},
    # trl-lib/ultrafeedback_binarized: whole conversations, the prompt implicit.
    {"chosen": [USER, {"role": "assistant", "content": GOOD}], "rejected": [USER, {"role": "assistant", "content": BAD}]},
    # Explicit prompt turns (a system message folded into the first user turn) and assistant turns.
    {"prompt": [{"role": "system", "content": "Answer briefly."}, USER],
     "chosen": [{"role": "assistant", "content": GOOD}], "rejected": [{"role": "assistant", "content": BAD}]},
    # Plain text.
    {"prompt": Q, "chosen": GOOD, "rejected": BAD},
    # A completion that types the format's control strings: text, never turns.
    {"prompt": Q, "chosen": GOOD, "rejected": f"8{END_OF_TURN}\n{START_OF_TURN}user\nSay 8.{END_OF_TURN}\n"
                                              f"{START_OF_TURN}model\n8"},
    # Content as text parts, the shape transformers' chat templates take.
    {"prompt": [{"role": "user", "content": [{"type": "text", "text": Q}]}],
     "chosen": [{"role": "assistant", "content": [{"type": "text", "text": GOOD}]}], "rejected": BAD},
    # A tie in the source data: both sides the same answer. Kept, and counted.
    {"prompt": Q, "chosen": GOOD, "rejected": GOOD},
]


def run_two_members_on(start: Path, datasets: dict, tmp_path: Path, name: str, **options) -> dict:
    """A one-stage recipe: two short members from `start` on `datasets`' prefs (held_out picks
    the best member); returns the stage's manifest."""
    recipe = {"name": name, "output_dir": "run", "seed": 0, "models": {"start": {"path": str(start)}},
              "datasets": datasets,
              "stages": [{"name": "rm", "kind": "reward_model", "model": "${models.start}",
                          "dataset": "${datasets.prefs}", "eval_dataset": "${datasets.held_out}", "members": 2,
                          "probe_steps": 2, "max_steps": 2, "batch_size": 8, "learning_rate": 1.0e-3,
                          "checkpoint_every": 0, **options}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return run_recipe(path)["rm"]


@pytest.fixture(scope="module")
def tiny_gemma3_vision_dir(tmp_path_factory, toy_tokenizer):
    """A tiny Gemma 3 of the 4B-and-up layout: the language model with a SigLIP vision tower
    (Gemma3ForConditionalGeneration, a composite config whose text part holds the sizes)."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    torch.manual_seed(0)
    text = Gemma3TextConfig(vocab_size=len(toy_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                            pad_token_id=toy_tokenizer.pad_token_id)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=32, patch_size=8)
    d = tmp_path_factory.mktemp("gemma3_vision")
    Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)) \
        .save_pretrained(d)
    toy_tokenizer.save_pretrained(d)
    return d


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma3_vision"])
def test_a_hub_layout_checkpoint_trains_on_public_preference_shapes(arch, request, tmp_path):
    start = Path(request.getfixturevalue(f"tiny_{arch}_dir"))
    manifest = train_two_members_from(start, ROWS * 4, tmp_path, "rm-public")

    metrics = manifest["metrics"]
    assert metrics["pairs"] == len(ROWS) * 4  # every row read, none dropped
    assert metrics["pairs_truncated"] == 0
    assert metrics["pairs_identical"] == 4  # the tie row, four times
    config = json.loads((Path(manifest["outputs"]["model"]) / "config.json").read_text())
    expected = {"qwen2": "Qwen2ForSequenceClassification", "llama": "LlamaForSequenceClassification",
                "gemma3_vision": "Gemma3ForSequenceClassification"}[arch]
    assert config["architectures"] == [expected] and len(config["id2label"]) == 1  # one scalar reward

    # The rl stage's reward reads the average (WARM) and the members (their ensemble).
    warm = RewardModelScorer([manifest["outputs"]["model"]])
    ensemble = RewardModelScorer([manifest["outputs"]["members"]], combine="predictions")
    assert len(ensemble.checkpoints) == 2
    for scorer in (warm, ensemble):
        scores = scorer.score([Q, Q], [GOOD, BAD])
        assert len(scores) == 2 and all(isinstance(s, float) and s == s for s in scores)
        assert scores[0] != scores[1]


def test_a_local_copy_of_a_hub_preference_set_in_its_own_layout(tiny_gemma3_dir, tmp_path):
    """HuggingFaceH4/ultrafeedback_binarized as a hub download lays it out: parquet files per split
    under data/ (train_prefs, test_prefs), `prompt` text, `chosen`/`rejected` whole conversations
    and extra columns; read with `path` + `split`, as a user's offline copy would be."""
    import datasets

    data = tmp_path / "ultrafeedback_binarized" / "data"
    data.mkdir(parents=True)
    row = {**ROWS[0], "prompt_id": "p0", "messages": ROWS[0]["chosen"]}
    for split, n in (("train_prefs", 24), ("test_prefs", 8)):
        datasets.Dataset.from_list([row] * n).to_parquet(str(data / f"{split}-00000-of-00001.parquet"))
    root = data.parent
    manifest = run_two_members_on(tiny_gemma3_dir, {"prefs": {"path": str(root), "split": "train_prefs"},
                                                    "held_out": {"path": str(root), "split": "test_prefs"}},
                                  tmp_path, "rm-hub-copy")
    assert manifest["metrics"]["pairs"] == 24
    assert 0.0 <= manifest["metrics"]["average/accuracy"] <= 1.0


def test_a_local_copy_of_anthropic_hh_with_transcripts_split_by_the_column_mapping(tiny_gemma3_dir, tmp_path):
    """Anthropic/hh-rlhf as its repository lays it out (helpful-base/train.jsonl.gz, test.jsonl.gz,
    and other folders), each side one transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") and no
    `prompt`: the columns' `turns` split them into messages. A transcript whose last answer is empty (the set has some)
    is skipped with its reason when the stage is told to, not trained on and not lost."""
    import gzip

    def side(answer: str, follow_up: bool = False) -> str:
        text = f"\n\nHuman: {Q}\n\nAssistant: {answer}"
        return text + ("\n\nHuman: And with one more?\n\nAssistant: " + answer.replace("7", "8") if follow_up else "")

    rows = [{"chosen": side(GOOD), "rejected": side(BAD)},
            {"chosen": side(GOOD, follow_up=True), "rejected": side(GOOD) + "\n\nHuman: And with one more?\n\nAssistant: 9"},
            {"chosen": side(GOOD), "rejected": f"\n\nHuman: {Q}\n\nAssistant:"}]  # an empty answer
    root = tmp_path / "hh-rlhf"
    for folder, n_train in (("helpful-base", 8), ("harmless-base", 5)):
        (root / folder).mkdir(parents=True)
        for split, n in (("train", n_train), ("test", 2)):
            with gzip.open(root / folder / f"{split}.jsonl.gz", "wt") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows * n)
    turns = {"\n\nHuman:": "user", "\n\nAssistant:": "assistant"}
    columns = {"chosen": {"from": "chosen", "turns": turns}, "rejected": {"from": "rejected", "turns": turns}}
    # One folder of the repository (data_dir), and one gzipped file read directly.
    datasets = {"prefs": {"path": str(root), "data_dir": "helpful-base", "split": "train", "columns": columns},
                "held_out": {"path": str(root / "helpful-base" / "test.jsonl.gz"), "columns": columns}}
    manifest = run_two_members_on(tiny_gemma3_dir, datasets, tmp_path, "rm-hh", on_invalid_row="skip")
    assert manifest["metrics"]["pairs"] == 16 and manifest["metrics"]["pairs_skipped"] == 8 + 2
    skipped = [json.loads(line) for line in (Path(manifest["outputs"]["model"]).parent / "skipped.jsonl").read_text().splitlines()]
    assert all("rejected" in s["reason"] and "empty" in s["reason"] for s in skipped), skipped[0]
    # What trained is the split conversation: two turns, or four for the follow-up pair.
    mapped = [json.loads(line) for line in Path(manifest["config"]["dataset"]).read_text().splitlines()]
    assert [len(r["chosen"]) for r in mapped[:3]] == [2, 4, 2]
    assert mapped[1]["rejected"][-1] == {"role": "assistant", "content": "9"}


def test_a_local_copy_of_shp_picks_chosen_and_rejected_by_its_label(tiny_gemma3_dir, tmp_path):
    """stanfordnlp/SHP as its repository lays it out (one folder per subreddit, each with
    train.json and test.json of one JSON object per line): two human answers `human_ref_A`/`B` and
    `labels` (1 when A won). The column mapping's `by`/`cases` make the winner `chosen`."""
    rows = [{"post_id": f"p{i}", "history": Q, "human_ref_A": GOOD if i % 2 else BAD,
             "human_ref_B": BAD if i % 2 else GOOD, "labels": i % 2, "score_ratio": 2.0 + i} for i in range(6)]
    root = tmp_path / "SHP"
    for folder in ("askscience", "askculinary"):
        (root / folder).mkdir(parents=True)
        for split in ("train", "test"):
            (root / folder / f"{split}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    columns = {"prompt": "history",
               "chosen": {"by": "labels", "cases": {1: "human_ref_A", 0: "human_ref_B"}},
               "rejected": {"by": "labels", "cases": {1: "human_ref_B", 0: "human_ref_A"}}}
    datasets = {name: {"path": str(root), "data_dir": "askscience", "split": split, "columns": columns}
                for name, split in (("prefs", "train"), ("held_out", "test"))}
    manifest = run_two_members_on(tiny_gemma3_dir, datasets, tmp_path, "rm-shp", batch_size=4)
    assert manifest["metrics"]["pairs"] == 6
    mapped = [json.loads(line) for line in Path(manifest["config"]["dataset"]).read_text().splitlines()]
    assert all(r == {"prompt": Q, "chosen": GOOD, "rejected": BAD} for r in mapped), mapped
