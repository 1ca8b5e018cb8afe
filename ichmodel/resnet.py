"""ResNet18 built from ``torch.nn`` alone, module for module and draw for draw torchvision's.

``import torchvision`` costs ~1.4 s of CPU in every process that builds a model (its package imports
``torchvision.ops``, which imports ``torch._dynamo``): each Train worker, each prediction and ensemble job.
The backbone needs one class of it. :func:`resnet18` builds the same modules under the same names
(``conv1``, ``bn1``, ``layer1.0.downsample.0``, ..., ``fc``), in the same order and with the same
initialisation as ``torchvision.models.resnet18(weights=None)``, so it draws the same random numbers (a
seeded model is bit-identical; ``tests/test_model.py`` compares the two) and loads torchvision's ImageNet
``state_dict`` files unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

#: Blocks per stage of ResNet18.
RESNET18_LAYERS = (2, 2, 2, 2)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection; ``downsample`` matches the shortcut's shape."""

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    """``[N, 3, H, W] → [N, num_classes]``; :class:`ichmodel.model.Backbone` takes its trunk (no ``fc``)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, RESNET18_LAYERS[0])
        self.layer2 = self._make_layer(128, RESNET18_LAYERS[1], stride=2)
        self.layer3 = self._make_layer(256, RESNET18_LAYERS[2], stride=2)
        self.layer4 = self._make_layer(512, RESNET18_LAYERS[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():  # torchvision's initialisation, in its order
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000) -> ResNet18:
    """A randomly initialised ResNet18, as ``torchvision.models.resnet18(weights=None)`` would build it."""
    return ResNet18(num_classes)
