"""A reference ResNet in plain torch.nn, built the way torchvision (and timm's ResNet-D) build it.

Written from the papers and the libraries' documented module layout, not imported from them,
so the parity tests need only torch. The state-dict keys are the libraries' keys:
`conv1`, `bn1`, `layer{i}.{j}.conv{k}`, `.bn{k}`, `.downsample.{0,1}` (`{1,2}` after the
average pool of ResNet-D), `fc`; the deep stem is `conv1.{0..6}` then `bn1`.

`widths` and `stem_width` default to torchvision's 64/128/256/512 and 64; smaller values give
a small net of the same layout for fast tests. Import only after `pytest.importorskip('torch')`.
"""

from __future__ import annotations

import torch
from torch import nn


def conv3x3(inplanes: int, planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's v1.5 bottleneck: the stride on the 3x3 conv."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000, groups=1, width_per_group=64,
                 widths=(64, 128, 256, 512), stem_width=64, deep_stem=False, avg_down=False):
        super().__init__()
        self.groups, self.base_width, self.avg_down = groups, width_per_group, avg_down
        self.inplanes = stem_width
        if deep_stem:  # timm's ResNet-C/D stem: three 3x3 convs, widths w/2, w/2, w
            half = stem_width // 2
            self.conv1 = nn.Sequential(
                conv3x3(3, half, 2), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
                conv3x3(half, half), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
                conv3x3(half, stem_width))
        else:
            self.conv1 = nn.Conv2d(3, stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.num_stages = len(layers)  # torchvision's 4, or fewer for a small test net
        for i, (width, count) in enumerate(zip(widths, layers, strict=True), start=1):
            setattr(self, f'layer{i}', self._make_layer(block, width, count, 1 if i == 1 else 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            out = planes * block.expansion
            if self.avg_down:  # timm: Sequential(pool or identity, conv 1x1, bn)
                pool = (nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
                        if stride > 1 else nn.Identity())
                downsample = nn.Sequential(pool, conv1x1(self.inplanes, out),
                                           nn.BatchNorm2d(out))
            else:
                downsample = nn.Sequential(conv1x1(self.inplanes, out, stride),
                                           nn.BatchNorm2d(out))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups,
                                base_width=self.base_width))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f'layer{i}')(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


# name -> (block, blocks per stage, keyword arguments), as the libraries define them.
ARCHITECTURES = {
    'resnet18': (BasicBlock, (2, 2, 2, 2), {}),
    'resnet34': (BasicBlock, (3, 4, 6, 3), {}),
    'resnet50': (Bottleneck, (3, 4, 6, 3), {}),
    'resnet101': (Bottleneck, (3, 4, 23, 3), {}),
    'resnet152': (Bottleneck, (3, 8, 36, 3), {}),
    'wide_resnet50_2': (Bottleneck, (3, 4, 6, 3), {'width_per_group': 128}),
    'resnext50_32x4d': (Bottleneck, (3, 4, 6, 3), {'groups': 32, 'width_per_group': 4}),
    'resnet50d': (Bottleneck, (3, 4, 6, 3), {'deep_stem': True, 'avg_down': True}),
}


def build(name: str, layers: tuple[int, ...] | None = None, **kwargs) -> ResNet:
    """The named net; `layers` (blocks per stage) and `kwargs` change its size, not its kind."""
    block, default_layers, defaults = ARCHITECTURES[name]
    return ResNet(block, layers or default_layers, **{**defaults, **kwargs})


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights AND random BN statistics and affine parameters, in eval mode.

    Conv weights keep torch's random init; BN gets running means around 0, variances in
    [0.5, 1.5], scales in [0.5, 1] and biases around 0, so the activations stay O(1) through
    the depth and the logits are O(1) numbers (an absolute tolerance then means something).
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            module.reset_parameters()
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            with torch.no_grad():
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                module.weight.copy_(0.5 + 0.5 * torch.rand(n, generator=generator))
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))
                module.num_batches_tracked.fill_(7)
    return model.eval()
