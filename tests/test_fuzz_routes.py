"""The route fuzzer (tests/fuzz_routes.py, `make fuzz`) kept in working order: a few of its random layers through
every forced route and instruction set of each op, as `make fuzz` runs many."""
import pytest
import torch

import pyops
import fuzz_routes


@pytest.mark.parametrize("op", ["conv1d", "conv2d"])
def test_route_fuzzer_finds_no_failure(device, op, monkeypatch, capsys):
    name, make_case, check, env_var, paths = next(r for r in fuzz_routes.routes(device) if r[0] == op)
    monkeypatch.setenv(env_var, "auto")  # (restored after the test: run() sets it per route)
    isa = pyops._C.cpu_kernel_isa()
    isas = pyops._C.cpu_kernel_isas().split(",") if device == "cpu" else [None]
    try:
        failures = fuzz_routes.run(name, make_case, check, env_var, paths, isas, cases=12, seed=1, device=device,
                                   verbose=False)
    finally:
        pyops._C.set_cpu_kernel_isa(isa)
    assert failures == 0, capsys.readouterr().out
    assert "layers checked" in capsys.readouterr().out


def test_route_fuzzer_reports_a_wrong_result(monkeypatch, capsys):
    """A check that fails is counted and printed with the layer that reproduces it (the fuzzer cannot pass
    silently)."""
    monkeypatch.setenv("PYOPS_CONV1D_PATH", "auto")
    wrong = lambda case: {"output": 1.0}
    failures = fuzz_routes.run("conv1d", fuzz_routes.conv1d_case, wrong, "PYOPS_CONV1D_PATH", ["auto"], [None],
                               cases=3, seed=1, device="cpu", verbose=False)
    assert failures >= 1 and "FAIL conv1d PYOPS_CONV1D_PATH=auto" in capsys.readouterr().out
