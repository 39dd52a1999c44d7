"""The hand-written loops' optimizer (posttrain.training.adamw_with_warmup)."""

import torch

from posttrain.training import adamw_with_warmup


def _params(device="cpu"):
    torch.manual_seed(0)
    return list(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 1)).to(device).parameters())


def _steps(optimizer, params, n=5):
    for step in range(n):
        for p in params:
            p.grad = torch.sin(p.detach() * (step + 1))  # a deterministic, non-trivial gradient
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_fused_adamw_where_the_device_has_it_with_the_same_update_as_torchs_default():
    fused_params, plain_params = _params(), _params()
    fused, _ = adamw_with_warmup(fused_params, 1e-2, 0.1, 0)
    plain = torch.optim.AdamW(plain_params, lr=1e-2, weight_decay=0.1)
    assert fused.defaults["fused"] is True  # the CPU has the fused kernel (torch >= 2.4)
    assert not plain.defaults["fused"]
    _steps(fused, fused_params)
    _steps(plain, plain_params)
    for a, b, start in zip(fused_params, plain_params, _params()):
        assert not torch.equal(a, start)  # the steps moved it
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_parameters_on_two_devices_at_once_get_torchs_default():
    # The fused kernel takes one device's parameters; the optimizer is built all the same.
    optimizer, _ = adamw_with_warmup(_params() + _params("meta"), 1e-2, 0.0, 0)
    assert not optimizer.defaults.get("fused")
