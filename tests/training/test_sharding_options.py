"""`sharding` on the training stages, in one process: what it asks of sft's Trainer, what a single
process does with it, and the stages that refuse it. (Sharded training itself runs under torchrun
in test_data_parallel.py and test_launch.py.)"""

from __future__ import annotations

import pytest

from posttrain.modeling import load_causal_lm
from posttrain.stages.sft import SFTStageConfig, _fsdp_arguments
from posttrain.training import TrainingSession


def test_sft_fsdp_asks_the_trainer_for_fsdp2_over_the_decoder_layers(tiny_gemma3_dir):
    from trl import SFTConfig

    cfg = SFTStageConfig(model="m", dataset="d", sharding="fsdp")
    model = load_causal_lm(str(tiny_gemma3_dir))
    assert _fsdp_arguments(cfg, model, world_size=1) == {}  # one process has nothing to shard over
    args = SFTConfig(output_dir="unused", use_cpu=True, report_to="none", **_fsdp_arguments(cfg, model, world_size=2))
    assert args.fsdp_plugin_args["fsdp_version"] == 2
    assert args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "Gemma3DecoderLayer"
    assert args.fsdp_plugin_args["state_dict_type"] == "FULL_STATE_DICT"  # the saved model is whole
    assert not args.fsdp_plugin_args.get("cpu_offload")
    offloaded = SFTConfig(output_dir="unused", use_cpu=True, report_to="none", **_fsdp_arguments(
        SFTStageConfig(model="m", dataset="d", sharding="fsdp", fsdp_offload=True), model, world_size=2))
    assert offloaded.fsdp_plugin_args["cpu_offload"] is True


@pytest.mark.parametrize("options, problem", [({"lora": {"r": 4}}, "lora"), ({"deepspeed": "z3.json"}, "deepspeed")])
def test_sft_fsdp_refuses_what_it_cannot_combine_with(options, problem):
    with pytest.raises(ValueError, match=problem):
        SFTStageConfig(model="m", dataset="d", sharding="fsdp", **options)


def test_one_process_trains_unsharded_and_says_so(tiny_gemma3_dir):
    session = TrainingSession("fp32", seed=0, sharding="fsdp")
    model = session.prepare(load_causal_lm(str(tiny_gemma3_dir)), learning_rate=1e-3)
    facts = session.describe(4, "sequences")
    assert facts["sharding"] == "none" and facts["world_size"] == 1
    assert facts["param_bytes_per_rank"] == sum(p.numel() * p.element_size() for p in model.parameters())
    session.close()
