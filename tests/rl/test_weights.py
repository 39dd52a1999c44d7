"""The EMA anchor update of WARP / J-BOND."""

import pytest
import torch

from posttrain.weights import ema_update_


class Tied(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.embed = torch.nn.Embedding(3, 2)
        self.head = torch.nn.Linear(2, 3, bias=False)
        self.head.weight = self.embed.weight  # tied, as in the tiny Gemma models
        self.proj = torch.nn.Linear(2, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.fill_(value)


def test_ema_moves_the_anchor_a_fraction_mu_towards_the_model():
    anchor, model = Tied(1.0), Tied(3.0)
    ema_update_(anchor, model, 0.25)
    for p in anchor.parameters():
        # (1 - 0.25) * 1 + 0.25 * 3 = 1.5 ; the tied weight is updated once, not twice
        assert torch.allclose(p, torch.full_like(p, 1.5))


def test_ema_with_mu_zero_keeps_the_anchor_and_mu_one_copies_the_model():
    anchor, model = Tied(1.0), Tied(3.0)
    ema_update_(anchor, model, 0.0)
    assert all(torch.all(p == 1.0) for p in anchor.parameters())
    ema_update_(anchor, dict(model.state_dict()), 1.0)
    assert all(torch.all(p == 3.0) for p in anchor.parameters())


def test_ema_repeated_steps_follow_the_closed_form():
    anchor, model = Tied(0.0), Tied(1.0)
    for _ in range(10):
        ema_update_(anchor, model, 0.1)
    expected = 1 - 0.9 ** 10
    assert torch.allclose(anchor.proj.weight, torch.full((2, 2), expected))


def test_ema_names_a_missing_parameter():
    anchor = Tied(0.0)
    with pytest.raises(KeyError, match="proj.bias"):
        ema_update_(anchor, {k: v for k, v in Tied(1.0).state_dict().items() if k != "proj.bias"}, 0.5)


def test_linear_average_is_uniform_by_default_and_takes_weights():
    from posttrain.weights import linear_average

    a, b = Tied(1.0), Tied(3.0)
    avg = linear_average([a, b.state_dict()])
    assert set(avg) == set(a.state_dict())
    assert all(torch.allclose(t, torch.full_like(t, 2.0)) for t in avg.values())
    weighted = linear_average([a, b], weights=[0.75, 0.25])
    assert torch.allclose(weighted["proj.weight"], torch.full((2, 2), 1.5))


def test_linear_average_names_a_missing_or_misshaped_tensor():
    from posttrain.weights import linear_average

    a = Tied(1.0).state_dict()
    missing = {k: v for k, v in a.items() if k != "proj.bias"}
    with pytest.raises(ValueError, match="proj.bias"):
        linear_average([a, missing])
    with pytest.raises(ValueError, match="proj.bias"):
        linear_average([missing, a])
    misshaped = dict(a, **{"proj.weight": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match="proj.weight"):
        linear_average([a, misshaped])
