"""Problem 3: folding BatchNorm into the preceding conv/linear layers of the homework's network, exactly."""
import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import pyops
from pyops.demo._timing import check, compare

TITLE = "Problem 3 - conv + BatchNorm + ReLU fusion: max ||model(x) - fused(x)||^2 < 1e-8"


class HomeworkNet(nn.Module):
    """The homework's CIFAR network: (N, 3, 32, 32) → (N, 10), calling its layers by attribute."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc1, self.bn3 = nn.Linear(16 * 32 * 32, 1024), nn.BatchNorm1d(1024)
        self.fc2 = nn.Linear(1024, 10)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.fc1(x.flatten(1))))
        return self.relu(self.fc2(x))


def randomize_batchnorms_(model, generator):
    """Gives every BatchNorm of model random running statistics and affine parameters (as training would), so that
    folding is tested on something other than the identity. Returns model."""
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, _BatchNorm):
                for tensor, low, high in ((bn.running_mean, -0.5, 0.5), (bn.running_var, 0.5, 2.0),
                                          (bn.weight, 0.5, 1.5), (bn.bias, -0.5, 0.5)):
                    if tensor is not None:
                        tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)
    return model


def max_squared_error(model, fused, batches):
    """max over batches and samples of ||model(x) - fused(x)||^2 (per-sample squared norm)."""
    with torch.no_grad():
        return max((model(x) - fused(x)).flatten(1).pow(2).sum(1).max().item() for x in batches)


def homework_setup(seed=0, batches=5, batch_size=100):
    """(eval-mode HomeworkNet with random BatchNorm statistics, its fusion, batches of CIFAR-sized inputs in [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = randomize_batchnorms_(HomeworkNet(), g).eval()
    inputs = [torch.rand(batch_size, 3, 32, 32, generator=g) for _ in range(batches)]
    return model, pyops.fuse(model), inputs


def checks():
    model, fused, inputs = homework_setup()
    error = max_squared_error(model, fused, inputs)
    ok = check("homework network, 5 batches of 100 CIFAR-sized inputs: max ||model(x) - fused(x)||^2", error,
               error < 1e-8, "{:.3g}")
    kinds = sorted({type(m).__name__ for m in fused.modules() if not list(m.children())})
    ok &= check("no BatchNorm left; fused module kinds", kinds, not any("BatchNorm" in k for k in kinds), "{}")
    return ok


def timings():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, fused, inputs = homework_setup(batches=1)
    model, fused, x = model.to(device), fused.to(device), inputs[0].to(device)
    with torch.no_grad():
        compare("homework network, batch 100, fp32", lambda: fused(x), lambda: model(x), "eager", repeat=5)
        resnet = torchvision.models.resnet18().eval().to(device)
        image = torch.rand(1, 3, 224, 224, device=device)
        fused_resnet = pyops.fuse(resnet)
        compare("torchvision resnet18, batch 1, 3x224x224, fp32", lambda: fused_resnet(image), lambda: resnet(image),
                "eager", repeat=5)
