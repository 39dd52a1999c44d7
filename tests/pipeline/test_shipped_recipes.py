"""Everything the repository ships for users to run: every recipe validates, every accelerate
config loads, and every documented install line names extras that exist and that CI resolves."""

import re
from pathlib import Path

import pytest

from posttrain.pipeline.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
LAUNCH = re.compile(r"accelerate launch --config_file (\S+)")
INSTALL = re.compile(r"make venv EXTRAS=([\w,]+)")


def test_the_repository_ships_recipes():
    assert {p.name for p in RECIPES} >= {"quickstart.yaml", "gemma3_1b_it.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_validates(path):
    recipe = load_recipe(path)  # raises RecipeError naming file, line and key path
    assert recipe.stages


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_shipped_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file

    assert load_config_from_file(str(path)).num_processes >= 1


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_launch_line_names_a_config_its_stages_accept(path):
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {s.kind for s in load_recipe(path).stages}
    for config in LAUNCH.findall(path.read_text()):
        assert (ROOT / config).is_file(), f"{path.name} launches with {config}, which does not exist"
        kind = str(load_config_from_file(str(ROOT / config)).distributed_type)
        # The hand-written loops refuse DeepSpeed ZeRO-3 (they shard with FSDP2); qat refuses FSDP too.
        if kinds & {"distill", "rl", "reward_model", "qat"}:
            assert "DEEPSPEED" not in kind, f"{path.name}: {config} is a DeepSpeed launch, which the loops refuse"
        if "qat" in kinds:
            assert "FSDP" not in kind, f"{path.name}: {config} shards the model, which qat refuses"


def test_documented_install_lines_name_real_extras_that_ci_resolves():
    tomllib = pytest.importorskip("tomllib")
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    checked = re.search(r"SETS=\(([^)]*)\)", (ROOT / ".ci" / "check_extras.sh").read_text()).group(1).split()
    documented = {(doc.name, m) for doc in [ROOT / "README.md", ROOT / "Makefile", *RECIPES]
                  for m in INSTALL.findall(doc.read_text())}
    assert any(m == "gpu,dev,trackers" for _, m in documented)
    for doc, line in documented:
        assert set(line.split(",")) <= extras, f"{doc}: EXTRAS={line} names an extra pyproject.toml lacks"
        assert line in checked, f"{doc}: EXTRAS={line} is not resolved by .ci/check_extras.sh"
