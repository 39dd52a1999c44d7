"""Configuration, prompt fitting and drift: the parts that need no model."""

import pytest
import torch

from posttrain.rollout import (DriftMonitor, OverlongPromptError, RolloutConfig, RolloutDriftError, RolloutDriftWarning,
                               RolloutError, SamplingParams, create_engine, logprob_drift)
from posttrain.rollout.prompts import fit_prompts
from posttrain.rollout.vllm_engine import check_gpu_options


def test_server_mode_needs_a_url():
    with pytest.raises(ValueError, match="server_url"):
        RolloutConfig(mode="server")


def test_drift_stop_threshold_below_warn_threshold_is_rejected():
    with pytest.raises(ValueError, match="drift_stop_threshold"):
        RolloutConfig(drift_warn_threshold=0.1, drift_stop_threshold=0.01)


def test_unknown_config_key_is_rejected():
    with pytest.raises(ValueError, match="kv_cache_gb"):
        RolloutConfig(kv_cache_gb=1)


@pytest.mark.parametrize("option", [dict(tensor_parallel_size=2), dict(enable_sleep_mode=True),
                                    dict(gpu_memory_utilization=0.5),
                                    dict(mode="server", server_url="http://rollout:8000")])
def test_gpu_only_options_are_refused_clearly_without_cuda(option, tmp_path):
    config = RolloutConfig(backend="vllm", **option)
    with pytest.raises(RolloutError, match="needs CUDA"):
        check_gpu_options(config, has_cuda=False)
    check_gpu_options(config, has_cuda=True)  # the same options are accepted on a GPU node
    if not torch.cuda.is_available():
        # create_engine refuses before loading anything (the directory is empty)
        with pytest.raises(RolloutError, match="needs CUDA"):
            create_engine(str(tmp_path), config)


def test_sampling_greedy_scores_logprobs_at_temperature_one():
    assert SamplingParams(temperature=0).logprob_temperature == 1.0
    assert SamplingParams(temperature=0.7).logprob_temperature == 0.7


def test_overlong_prompt_error_names_the_prompt_and_lengths():
    with pytest.raises(OverlongPromptError, match=r"prompts\[1\]: 30 tokens.*max_model_len=32 - max_new_tokens=8"):
        fit_prompts([[2] * 5, [2] * 30], max_model_len=32, max_new_tokens=8, policy="error", bos_id=2)


def test_truncate_left_keeps_bos_and_the_end_and_counts():
    long = [2] + list(range(100, 130))
    out, truncated = fit_prompts([[2, 7], long], max_model_len=20, max_new_tokens=8, policy="truncate_left", bos_id=2)
    assert truncated == 1
    assert out[0] == [2, 7]
    assert len(out[1]) == 12 and out[1][0] == 2 and out[1][1:] == long[-11:]


def test_no_room_for_any_prompt_is_an_error():
    with pytest.raises(OverlongPromptError, match="leaves no room"):
        fit_prompts([[2]], max_model_len=16, max_new_tokens=16, policy="truncate_left", bos_id=2)


def test_drift_metrics_on_ragged_and_masked_inputs():
    m = logprob_drift([[-1.0, -2.0], [-3.0]], [torch.tensor([-1.0, -2.5]), torch.tensor([-3.1])])
    assert m["drift_max_abs"] == pytest.approx(0.5)
    assert m["drift_mean_abs"] == pytest.approx(0.2)
    padded = logprob_drift(torch.tensor([[-1.0, 0.0]]), torch.tensor([[-1.2, -9.0]]), mask=torch.tensor([[1, 0]]))
    assert padded["drift_max_abs"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="same sampled tokens"):
        logprob_drift([[-1.0]], [[-1.0, -2.0]])


def test_drift_monitor_warns_then_stops():
    monitor = DriftMonitor(warn=0.05, stop=0.5)
    assert monitor.check([[-1.0]], [[-1.0 + 1e-6]])["drift_mean_abs"] < 1e-5
    with pytest.warns(RolloutDriftWarning, match="drift_warn_threshold"):
        monitor.check([[-1.0]], [[-1.2]], step=3)
    with pytest.raises(RolloutDriftError, match="at step 4.*stale weights"):
        monitor.check([[-1.0]], [[-2.0]], step=4)
