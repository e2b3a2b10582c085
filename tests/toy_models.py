"""Small models shared by several test files."""

from torch import nn


class TinyConvNet(nn.Module):
    """Minimal 2-layer conv net for testing: 3 → 4 → 8 channels, 3x3 kernels, no bias."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv2(self.conv1(x))
