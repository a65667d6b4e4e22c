import pytest
import torch

# References are exact fp32: no TF32 anywhere in the test session (pyops' own kernels never use it unless asked).
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.cuda` tests (and the cuda half of the `device` fixture) are skipped, not failed, without a GPU."""
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    return request.param


def tolerances(dtype):
    """(rtol, atol) for comparing against a float64 reference."""
    return {
        torch.float64: (1e-10, 1e-12),
        torch.float32: (1e-5, 1e-6),
        torch.float16: (1e-2, 1e-3),
        torch.bfloat16: (1e-2, 1e-2),
    }[dtype]
