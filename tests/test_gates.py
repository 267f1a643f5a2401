import math

import pytest
import torch

from wsss.models.gates import HardConcreteGate


def test_penalty_matches_hand_computed_open_probabilities():
    gate = HardConcreteGate(3)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([1.0, -2.0, 0.0]))
    # sigmoid(log_alpha - beta * log(-gamma / zeta)) with beta 0.33, gamma -0.1, zeta 1.1
    expected = torch.tensor([0.8570872527, 0.2299321150, 0.6881115651])
    assert torch.allclose(gate.open_probability(), expected, atol=1e-6)


def test_eval_gates_are_hard_and_open_iff_log_alpha_positive():
    gate = HardConcreteGate(3).eval()
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([1.0, -2.0, 0.0]))
    assert gate().tolist() == [1.0, 0.0, 0.0]


def test_training_sample_follows_stretched_concrete_formula():
    gate = HardConcreteGate(4, init=0.5).train()
    torch.manual_seed(3)
    sampled = gate()
    torch.manual_seed(3)
    u = torch.rand(4).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + 0.5) / 0.33)
    expected = (s * 1.2 - 0.1).clamp(0, 1)
    assert torch.allclose(sampled, expected, atol=1e-6)


@pytest.mark.parametrize(("init", "value"), [(20.0, 1.0), (-20.0, 0.0)])
def test_saturated_gates_are_exactly_open_or_closed(init, value):
    gate = HardConcreteGate(8, init=init).train()
    assert torch.all(gate() == value)


def test_inactive_gates_are_one_and_penalty_gradient_reaches_log_alpha():
    gate = HardConcreteGate(2, init=-5.0).train()
    gate.active = False
    assert gate().tolist() == [1.0, 1.0]
    gate.open_probability().sum().backward()
    assert torch.all(gate.log_alpha.grad > 0)
    assert math.isfinite(float(gate.log_alpha.grad.sum()))
