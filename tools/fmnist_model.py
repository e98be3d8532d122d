"""Small residual CNN for 1x28x28 Fashion-MNIST images.

This module holds only the ``nn.Module`` definition so that other scripts in
``tools/`` can rebuild the PyTorch model and load ``models/fmnist_resnet.pt``::

    import torch
    from fmnist_model import FmnistResNet
    model = FmnistResNet()
    model.load_state_dict(torch.load("models/fmnist_resnet.pt"))
    model.eval()

Inputs are expected already normalised (see ``models/README.md``); the model
itself does no normalisation.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with a residual Add.

    When ``stride != 1`` or the channel count changes, the shortcut is a
    1x1 conv + BN projection; otherwise it is the identity.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_ch != out_ch:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class FmnistResNet(nn.Module):
    """ResNet-style classifier: stem, three stages, global pool, linear head.

    Default layout (input 1x28x28)::

        stem    Conv3x3(1->32) + BN + ReLU                 32x28x28
        layer1  BasicBlock(32->32)        identity add     32x28x28
        layer2  BasicBlock(32->64,  s=2)  1x1 projection   64x14x14
        layer3  BasicBlock(64->128, s=2)  1x1 projection  128x7x7
        head    GlobalAvgPool -> Flatten -> Linear(128->10)
    """

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128), num_classes: int = 10) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.stem = nn.Sequential(
            nn.Conv2d(1, w1, 3, padding=1, bias=False),
            nn.BatchNorm2d(w1),
            nn.ReLU(inplace=True),
        )
        self.layer1 = BasicBlock(w1, w1, stride=1)
        self.layer2 = BasicBlock(w1, w2, stride=2)
        self.layer3 = BasicBlock(w2, w3, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(w3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.pool(x)
        x = self.flatten(x)
        return self.fc(x)
