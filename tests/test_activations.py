"""pyops.activations, the one table of the fused ops' activations: its names, codes, torch functions, in-place forms
and modules agree with each other, with torch.nn.functional (conftest's references) and with the C++ side (the op's
check of a code, activation_aten: linear_bias_act computes float64 by ATen's product and that pass)."""
import pytest
import torch
from torch import nn

import pyops
from pyops.activations import ACTIVATIONS, FUNCTIONS, IN_PLACE, MODULES
from conftest import ACTIVATION_REFERENCES


def values():
    """Both signs, the kinks of ReLU6/Hardswish/Hardsigmoid (0, ±3, 6), large magnitudes, -0 and NaN."""
    v = torch.linspace(-9, 9, 181, dtype=torch.float64)
    return torch.cat([v, torch.tensor([-3.0, 3.0, 6.0, 0.0, -0.0, 1e30, -1e30, float("nan")], dtype=torch.float64)])


def test_the_table_names_every_activation_once_with_consecutive_codes():
    assert set(ACTIVATIONS) == set(ACTIVATION_REFERENCES) == set(FUNCTIONS) == set(IN_PLACE)
    assert sorted(ACTIVATIONS.values()) == list(range(len(ACTIVATIONS))) and ACTIVATIONS["none"] == 0
    assert sorted(MODULES.values()) == sorted(set(ACTIVATIONS) - {"none"})
    assert pyops.nn.ACTIVATIONS == tuple(ACTIVATIONS)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_functions_and_in_place_forms_compute_torch_s_activation(name):
    x = values()
    want = ACTIVATION_REFERENCES[name](x)
    torch.testing.assert_close(FUNCTIONS[name](x), want, rtol=0, atol=0, equal_nan=True)
    y = x.clone()
    assert IN_PLACE[name](y) is y or name == "none"
    torch.testing.assert_close(y, want, rtol=0, atol=0, equal_nan=True)
    for cls, module_name in MODULES.items():
        if module_name == name:
            torch.testing.assert_close(cls()(x), want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_the_ops_apply_the_activation_of_each_code(name):
    """The C++ side's activation of each code (activation_aten, on the float64 path) is torch's, NaN kept."""
    x = values().reshape(-1, 1)
    out = pyops.linear_bias_act(x, torch.ones(1, 1, dtype=torch.float64), None, name)
    torch.testing.assert_close(out, ACTIVATION_REFERENCES[name](x), rtol=0, atol=0, equal_nan=True)
    raw = torch.ops.pyops.linear_bias_act(x, torch.ones(1, 1, dtype=torch.float64), None, ACTIVATIONS[name])
    torch.testing.assert_close(raw, out, rtol=0, atol=0, equal_nan=True)


def test_codes_past_the_table_are_refused_by_name():
    x, w = torch.ones(2, 3), torch.ones(4, 3)
    with pytest.raises(ValueError, match=r"argument 'activation' must be 0 \(none\).* 6 \(sigmoid\), got 7"):
        torch.ops.pyops.linear_bias_act(x, w, None, len(ACTIVATIONS))
    with pytest.raises(ValueError, match="got -1"):
        torch.ops.pyops.conv2d_bias_act(x.view(1, 2, 3, 1), torch.ones(4, 2, 1, 1), None, [1, 1], [0, 0], [1, 1], 1,
                                        -1, None)
    with pytest.raises(ValueError, match="'activation' must be one of"):
        pyops.linear_bias_act(x, w, None, "gelu")
    with pytest.raises(ValueError, match="argument 'relu' must be True, False, one of"):
        pyops.nn.LinearBNReLU.from_modules(nn.Linear(3, 4), None, nn.GELU())
