"""The C++ Autograd kernels of every differentiable op (csrc/common/dispatch.h): a call autograd does not see goes
straight to the backend kernel, a call it sees goes through the op's Function, and where a Function cannot serve
(forward-mode AD, torch.func transforms) the forward ops run as their ATen composite."""
import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import pyops

WEIGHTS = {"conv1d": torch.randn(4, 4, 3, generator=torch.Generator().manual_seed(0)),
           "conv2d": torch.randn(4, 4, 3, 1, generator=torch.Generator().manual_seed(1)),
           "linear": torch.randn(5, 9, generator=torch.Generator().manual_seed(4))}
# One call of each op on x (2, 4, 9) float64, returning one tensor.
OP_CALLS = {
    "conv1d": lambda x: torch.ops.pyops.conv1d(x, WEIGHTS["conv1d"].to(x), None, 1, 1, 1, 1),
    "conv1d_bias_act": lambda x: torch.ops.pyops.conv1d_bias_act(x, WEIGHTS["conv1d"].to(x), None, 1, 1, 1, 1, 1,
                                                                 x.flip(-1)),
    "conv1d_backward_input": lambda x: torch.ops.pyops.conv1d_backward_input(x, WEIGHTS["conv1d"].to(x), 9, 1, 1, 1,
                                                                           1),
    "conv1d_backward_weight": lambda x: torch.ops.pyops.conv1d_backward_weight(x, x, 3, 1, 1, 1, 1),
    "conv1d_backward_weight_bias": lambda x: torch.ops.pyops.conv1d_backward_weight_bias(x, x, 3, 1, 1, 1, 1)[0],
    "smooth_max": lambda x: torch.ops.pyops.smooth_max(x, 2.0, -1, False),
    "smooth_max_backward": lambda x: torch.ops.pyops.smooth_max_backward(
        x.sum(-1), x, torch.ops.pyops.smooth_max(x.detach(), 2.0, -1, False), 2.0, -1, False),
    "conv2d_bias_act": lambda x: torch.ops.pyops.conv2d_bias_act(x.unsqueeze(-1), WEIGHTS["conv2d"].to(x), None,
                                                                 [1, 1], [1, 0], [1, 1], 1, 1, None),
    "conv2d_bn_relu": lambda x: torch.ops.pyops.conv2d_bn_relu(
        x.unsqueeze(-1), WEIGHTS["conv2d"].to(x), None, None, None, torch.zeros(4).to(x), torch.ones(4).to(x), 1e-5,
        [1, 1], [1, 0], [1, 1], 1, True, None),
    "linear_bias_act": lambda x: torch.ops.pyops.linear_bias_act(x, WEIGHTS["linear"].to(x), x[0, :, :5].sum(0), 1),
}


def make_input(device, requires_grad):
    x = torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(device)
    return x.requires_grad_(requires_grad)


@pytest.mark.parametrize("op", list(OP_CALLS))
@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "no_input_requires_grad"])
def test_calls_autograd_does_not_see_give_the_same_values_and_no_graph(device, op, context):
    """Same values as the recorded call, and no graph: the output has no grad_fn and requires no grad."""
    recorded = OP_CALLS[op](make_input(device, True))
    assert recorded.grad_fn is not None
    if context == "no_grad":
        with torch.no_grad():
            out = OP_CALLS[op](make_input(device, True))
    elif context == "inference_mode":
        with torch.inference_mode():
            out = OP_CALLS[op](make_input(device, False))
        assert out.is_inference()
    else:
        out = OP_CALLS[op](make_input(device, False))
    assert out.grad_fn is None and not out.requires_grad
    torch.testing.assert_close(out, recorded.detach(), rtol=0, atol=0)


FORWARD_OPS = ["conv1d", "conv1d_bias_act", "smooth_max", "conv2d_bias_act", "conv2d_bn_relu", "linear_bias_act"]


@pytest.mark.parametrize("op", FORWARD_OPS)
def test_forward_mode_ad_of_the_forward_ops(device, op):
    """A tangent reaches the op even with grad mode off; the forward ops then run as their ATen composite
    (csrc/common/dispatch.h), whose jvp must equal J·v for the Jacobian our backward kernels give."""
    x = make_input(device, False)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype).to(device)
    with torch.no_grad(), fwAD.dual_level():
        primal, tangent = fwAD.unpack_dual(OP_CALLS[op](fwAD.make_dual(x, v)))
    jacobian = torch.autograd.functional.jacobian(OP_CALLS[op], x)  # through the op's C++ Function
    torch.testing.assert_close(primal, OP_CALLS[op](x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tangent, (jacobian.flatten(primal.dim()) @ v.flatten()).view_as(primal),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("op", sorted(set(OP_CALLS) - set(FORWARD_OPS)))
def test_forward_mode_ad_of_the_backward_ops_is_refused(device, op):
    """The backward ops (called by our backward kernels, not by users) have no jvp: a tangent is refused, not
    dropped."""
    x = make_input(device, False)
    with torch.no_grad(), fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(RuntimeError, match="jvp is not implemented"):
            OP_CALLS[op](dual)


@pytest.mark.parametrize("op", FORWARD_OPS)
def test_torch_func_transforms(device, op):
    """torch.func.grad / jacrev / vmap(grad) (which refuse C++ autograd Functions) run the ATen composite and agree
    with torch.autograd through our backward kernels."""
    x = make_input(device, True)
    (expected,) = torch.autograd.grad(OP_CALLS[op](x).pow(2).sum(), x)
    torch.testing.assert_close(torch.func.grad(lambda t: OP_CALLS[op](t).pow(2).sum())(x.detach()), expected,
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.func.jacrev(OP_CALLS[op])(x.detach()),
                               torch.autograd.functional.jacobian(OP_CALLS[op], x.detach()), rtol=1e-10, atol=1e-12)
    per_sample = torch.func.vmap(torch.func.grad(lambda t: OP_CALLS[op](t.unsqueeze(0)).pow(2).sum()))(x.detach())
    loop = torch.stack([torch.autograd.grad(OP_CALLS[op](x[i:i + 1]).pow(2).sum(), x)[0][i] for i in range(len(x))])
    torch.testing.assert_close(per_sample, loop, rtol=1e-10, atol=1e-12)


def test_backward_ops_run_without_a_graph_unless_create_graph(device):
    """The backward ops that a backward calls build a graph only with create_graph (double backward)."""
    x = make_input(device, True)
    y = pyops.conv1d(x, WEIGHTS["conv1d"].to(x).requires_grad_(), None, 1, 1)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y), retain_graph=True)
    assert gx.grad_fn is None
    (gx2,) = torch.autograd.grad(y, x, torch.ones_like(y), create_graph=True)
    assert gx2.grad_fn is not None
    torch.testing.assert_close(gx2.detach(), gx, rtol=0, atol=0)


def test_composite_fold_freezes_the_statistics_and_folds_in_float64(device):
    """torch.func and forward-mode AD run conv2d_bn_relu's ATen composite: it differentiated the running
    statistics (the op's backward gives them none: frozen, FrozenBatchNorm2d's semantics) and folded in the
    statistics' dtype (float16 statistics under autocast: ~5e-4 off the op's float64 fold)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64).to(device)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64).to(device)
    mean, var = torch.randn(4, generator=g).to(device), (torch.rand(4, generator=g) + 0.5).to(device)

    def f(m, v, xx):
        return pyops.conv2d_bn_relu(xx, w, None, None, None, m, v, 1e-5, 1, 1).sum()

    grads = torch.func.grad(f, argnums=(0, 1))(mean, var, x)
    assert all(torch.count_nonzero(t) == 0 for t in grads)
    for stats_dtype in (torch.float16, torch.float32):
        m, v = mean.to(stats_dtype), var.to(stats_dtype)
        primal, _ = torch.func.jvp(lambda xx: f(m, v, xx), (x,), (torch.ones_like(x),))
        torch.testing.assert_close(primal, f(m, v, x), rtol=1e-12, atol=1e-10)


def test_relu_backward_passes_the_gradient_of_a_nan_output(device):
    """torch.relu's backward zeroes where the output is <= 0, F.relu6's (hardtanh's) where it is <= 0 or >= 6, so
    a NaN output passes the gradient of both (torch's CUDA kernels, its decompositions and its CPU kernels' scalar
    tails; the vectorized body of its CPU hardtanh_backward stops it: torch disagrees with itself there); the fused
    backward's masks `output > 0` (and `< 6`) stopped it."""
    x = torch.zeros(1, 1, 3, 4, dtype=torch.float64, device=device)
    w = torch.ones(1, 1, 1, 1, dtype=torch.float64, device=device)
    residual = torch.tensor([[[[math.nan, 1.0, -1.0, 7.0]] * 3]], dtype=torch.float64, device=device,
                            requires_grad=True)
    for activation, expected in (("relu", [1.0, 1.0, 0.0, 1.0]), ("relu6", [1.0, 1.0, 0.0, 0.0])):
        for create_graph in (False, True):
            y = pyops.conv_bn_relu.conv2d_bias_act(x, w, None, activation=activation, residual=residual)
            (grad,) = torch.autograd.grad(y.sum(), residual, create_graph=create_graph)
            assert grad[0, 0, 0].tolist() == expected


@pytest.mark.parametrize("op", list(OP_CALLS))
def test_compiled_autograd_traces_the_backward(device, op):
    """Compiled autograd (torch._dynamo.compiled_autograd) traces each op's C++ backward into its graph
    (is_traceable): without it every pyops node ran eagerly, a graph break, and fullgraph=True raised. Double
    backward too: the graph of the backward ops' own backward."""
    from torch._dynamo import compiled_autograd
    x = make_input(device, True)
    want = torch.autograd.grad(OP_CALLS[op](x).square().sum(), x)[0]
    torch._dynamo.reset()
    loss = OP_CALLS[op](x).square().sum()
    with compiled_autograd._enable(torch.compile(backend="aot_eager", fullgraph=True)):
        loss.backward()
    torch.testing.assert_close(x.grad, want)
