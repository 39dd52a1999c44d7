"""The rl stage's config: BOND's options in their `bond` block or, as in older recipes, directly
under the stage; refused on algorithm rloo; and the runner's hash of a config unchanged by the block."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from posttrain.pipeline.recipe import RecipeError, load_recipe
from posttrain.stages.rl import BondOptions, RLStageConfig
from posttrain.stages.rl.warp import WarpStageConfig

BASE = dict(model="m", dataset="d.jsonl", rewards=[{"name": "math"}])


def _recipe(tmp_path, **stage_keys) -> str:
    """A recipe file with one rl stage on a tiny model and toy prompts, plus `stage_keys`."""
    stage = {"name": "rl", "kind": "rl", "model": "${models.student}", "dataset": "${datasets.prompts}",
             "rewards": [{"name": "math"}], **stage_keys}
    recipe = {"name": "bond_keys", "output_dir": str(tmp_path / "run"),
              "models": {"student": {"tiny": {"arch": "gemma3", "hidden_size": 64, "num_layers": 1, "num_heads": 2,
                                              "num_kv_heads": 1}}},
              "datasets": {"prompts": {"toy": {"task": "math", "n": 8, "split": "train", "format": "prompt"}}},
              "stages": [stage]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


def test_a_recipe_with_the_old_flat_bond_keys_loads_into_the_bond_block(tmp_path):
    recipe = load_recipe(_recipe(tmp_path, algorithm="bond", jeffreys_beta=0.3, bond_n=4))
    config = recipe.stages[0].config
    assert config.bond == BondOptions(jeffreys_beta=0.3, bond_n=4)
    assert config.anchor_samples == 4 and config.completions_per_prompt == 5


def test_a_recipe_with_the_bond_block_loads(tmp_path):
    bond = {"jeffreys_beta": 1.0, "kl_gamma": 0.1, "anchor_rollout": "engine"}
    config = load_recipe(_recipe(tmp_path, algorithm="jbond", bond=bond)).stages[0].config
    assert config.bond == BondOptions(jeffreys_beta=1.0, kl_gamma=0.1, anchor_rollout="engine")
    assert config.anchor_samples == 2


def test_a_bond_algorithm_without_options_gets_the_papers_defaults():
    config = RLStageConfig(**BASE, algorithm="jbond")
    assert config.bond == BondOptions() and config.bond.jeffreys_beta == 0.5 and config.anchor_ema == 0.02


def test_a_bond_option_on_algorithm_rloo_is_refused_with_the_key_and_the_fix(tmp_path):
    with pytest.raises(RecipeError, match="bond: BOND's options apply to algorithm jbond or bond; this stage runs "
                                          "algorithm rloo"):
        load_recipe(_recipe(tmp_path, bond={"jeffreys_beta": 0.3}))
    with pytest.raises(RecipeError, match="kl_gamma: applies to algorithm jbond or bond"):
        load_recipe(_recipe(tmp_path, kl_gamma=0.1))
    with pytest.raises(ValueError, match="jeffreys_beta: given both under the stage and in its bond block"):
        RLStageConfig(**BASE, algorithm="jbond", jeffreys_beta=0.2, bond={"jeffreys_beta": 0.3})
    with pytest.raises(ValueError, match="bond.nope"):
        RLStageConfig(**BASE, algorithm="bond", bond={"nope": 1})


def test_a_resolved_config_written_out_before_the_bond_block_still_validates():
    # Run directories made before the block hold resolved configs with BOND's defaults written out
    # flat on every rl stage, rloo included.
    old = RLStageConfig(**BASE).model_dump(mode="json")
    old.pop("bond")
    old.update(jeffreys_beta=0.5, kl_gamma=0.0, bond_n=8, anchor_rollout="swap")
    assert RLStageConfig.model_validate(old).bond is None
    jbond = RLStageConfig.model_validate({**old, "algorithm": "jbond", "jeffreys_beta": 0.3})
    assert jbond.bond.jeffreys_beta == 0.3


def _sha(config) -> str:
    hash_form = type(config).hash_form(config.model_dump(mode="json", exclude_unset=False))
    return hashlib.sha256(json.dumps(hash_form, sort_keys=True, default=str).encode()).hexdigest()


def test_the_runners_hash_of_a_config_is_the_one_before_the_bond_block():
    # Digests of the same configs computed with the flat BOND keys, before the block existed: a run
    # directory made then keeps matching its manifest and attempt, so it is skipped or resumed.
    assert _sha(RLStageConfig(**BASE)) == "9952083e9d59df7b16226d1f93bac2e9eb7be28dcfbd441d083e6940e5fb193f"
    flat = RLStageConfig(**BASE, algorithm="jbond", jeffreys_beta=0.3)
    block = RLStageConfig(**BASE, algorithm="jbond", bond={"jeffreys_beta": 0.3})
    assert _sha(flat) == _sha(block) == "01bd3d785e6ede4daff3f0e33b5e01250507775e8ba635b91556d3faa2075809"
    bond = RLStageConfig(**BASE, algorithm="bond", bond={"bond_n": 4, "anchor_rollout": "engine", "kl_gamma": 0.1})
    assert _sha(bond) == "534e9e1dac7a371f643aaf32f20f305aef869b136d63e8edb5bfa62ac013e2f9"
    warp = WarpStageConfig(**BASE, eval_dataset="e.jsonl")
    assert _sha(warp) == "17bff2ab2c1a451149707aef015b966fb57dd9541f4bdf09f0199f2e461157f7"
