"""A finished member is marked by its manifest (posttrain.manifests), and a run directory from
before members had manifests (a member marked by done.json) still resumes."""

from __future__ import annotations

import json

from posttrain.manifests import MANIFEST, completed
from posttrain.pipeline.runner import run_recipe
from posttrain.stages.reward_model import LEGACY_DONE, finished_member
from rm_helpers import train_two_members_from

ROWS = [{"prompt": f"What is {a} + 1?", "chosen": str(a + 1), "rejected": str(a + 2)} for a in range(8)]


def test_a_member_is_finished_only_with_a_complete_marker_and_its_model(tmp_path):
    member = tmp_path / "member_1"
    (member / "model").mkdir(parents=True)
    assert finished_member(member) is None  # a model without a marker: killed before the marker was written
    (member / MANIFEST).write_text(json.dumps({"status": "failed", "name": "member_1"}))
    assert finished_member(member) is None
    (member / MANIFEST).write_text('{"status": "complete", "na')  # cut short: not taken for complete
    assert finished_member(member) is None
    (member / MANIFEST).write_text(json.dumps({"status": "complete", "name": "member_1", "eval_accuracy": 0.75}))
    assert finished_member(member)["eval_accuracy"] == 0.75
    (member / "model").rmdir()
    assert finished_member(member) is None  # a marker without its model


def test_an_old_done_json_marks_a_member_finished(tmp_path):
    member = tmp_path / "member_2"
    (member / "model").mkdir(parents=True)
    (member / LEGACY_DONE).write_text(json.dumps({"name": "member_2", "seed": 2, "eval_accuracy": 0.5}))
    assert finished_member(member) == {"name": "member_2", "seed": 2, "eval_accuracy": 0.5}
    (member / LEGACY_DONE).write_text("{")  # half-written
    assert finished_member(member) is None


def test_a_run_directory_in_the_old_format_resumes_without_retraining_its_finished_member(tiny_gemma3_dir, tmp_path):
    first = train_two_members_from(tiny_gemma3_dir, ROWS, tmp_path, "old-format", max_steps=2)
    stage_dir = tmp_path / "run" / "rm"
    member_1, member_2 = stage_dir / "members" / "member_1", stage_dir / "members" / "member_2"
    assert completed(member_1) is not None and not (member_1 / LEGACY_DONE).exists()  # the new scheme

    # Rewrite the run as the previous version left it when killed during member 2: member 1 marked
    # by done.json (its bare record), member 2 unfinished, the stage's attempt in progress.
    record = json.loads((member_1 / MANIFEST).read_text())
    old_record = {k: v for k, v in record.items() if k not in ("status", "ended", "kind")}
    (member_1 / LEGACY_DONE).write_text(json.dumps(old_record))
    (member_1 / MANIFEST).unlink()
    (member_2 / MANIFEST).unlink()
    stage_manifest = json.loads((stage_dir / MANIFEST).read_text())
    (stage_dir / MANIFEST).unlink()
    (stage_dir / "attempt.json").write_text(json.dumps({"hash": stage_manifest["hash"]}))
    member_1_weights = next((member_1 / "model").glob("*.safetensors")).stat().st_mtime_ns
    member_2_weights = next((member_2 / "model").glob("*.safetensors")).stat().st_mtime_ns

    resumed = run_recipe(tmp_path / "recipe.yaml")["rm"]
    assert resumed["status"] == "complete"
    assert next((member_1 / "model").glob("*.safetensors")).stat().st_mtime_ns == member_1_weights  # not redone
    assert next((member_2 / "model").glob("*.safetensors")).stat().st_mtime_ns != member_2_weights  # retrained
    assert completed(member_2)["name"] == "member_2"  # written in the new scheme
    # Member 1's figures come from its old record; the retrained member 2 ends as it did before.
    for key in ("member_1/accuracy", "member_2/accuracy", "average/accuracy"):
        assert resumed["metrics"][key] == first["metrics"][key]


# The config as the runner hashed it before the stage inherited TrainingOptions (every default).
EARLIER_DUMP = {
    "model": "m", "dataset": "d", "eval_dataset": None, "eval_datasets": None, "members": 1, "seeds": None,
    "learning_rates": None, "dropouts": None, "member_models": None, "probe_steps": 50, "probe_learning_rate": 1e-3,
    "shared_steps": 0, "max_steps": 100, "batch_size": 16, "learning_rate": 1e-5, "warmup_steps": 0,
    "lr_scheduler": "constant", "weight_decay": 0.0, "max_grad_norm": 1.0, "max_length": 512,
    "max_tokens_per_microbatch": None, "on_invalid_row": "error", "center_rewards_coefficient": None,
    "label_flip_rate": 0.0, "average_best": None, "precision": "fp32", "lora": None, "gradient_checkpointing": False,
    "checkpoint_every": 50, "keep_checkpoints": 2, "logging_steps": 10, "report_to": []}


def test_the_stage_hashes_as_before_so_earlier_run_directories_stay_up_to_date():
    from posttrain.stages.reward_model import RewardModelStageConfig

    # Same keys and defaults: the runner's stage hash of an unchanged recipe is unchanged, so a
    # finished stage is skipped and a killed one resumes instead of being wiped as a new attempt.
    def hashed(**options):
        return RewardModelStageConfig.hash_form(RewardModelStageConfig(model="m", dataset="d", **options).model_dump(mode="json"))

    assert hashed() == EARLIER_DUMP
    # An option the shared base added counts once it is set.
    assert hashed(shard_optimizer=True) == {**EARLIER_DUMP, "shard_optimizer": True}
