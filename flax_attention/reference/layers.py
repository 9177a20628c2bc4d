"""PyTorch reference attention modules (NCHW), written from the specification.

They reproduce the reference implementations' functions and state_dict key names:
senet.pytorch and timm (SE), Jongchan/attention-module (CBAM, BAM), timm (CBAM),
murufeng/EPSANet (PSA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SELayer(nn.Module):
    """senet.pytorch / Caffe SE: keys fc.0 (Linear C->h) and fc.2 (Linear h->C)."""

    def __init__(self, channels: int, hidden: int, bias: bool = False):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden, bias=bias),
            nn.ReLU(),
            nn.Linear(hidden, channels, bias=bias),
            nn.Sigmoid(),
        )

    def forward(self, x):
        n, c = x.shape[:2]
        return x * self.fc(x.mean((2, 3))).view(n, c, 1, 1)


class TimmSE(nn.Module):
    """timm SEModule: keys fc1, fc2 (1x1 convs with bias)."""

    def __init__(self, channels: int, hidden: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=bias)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=bias)

    def forward(self, x):
        s = self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


def _lse_pool(x):
    flat = x.flatten(2)
    peak = flat.max(dim=2, keepdim=True)[0]
    return (peak + (flat - peak).exp().sum(dim=2, keepdim=True).log()).squeeze(2)


CHANNEL_POOLS = {
    "avg": lambda x: x.mean((2, 3)),
    "max": lambda x: x.amax((2, 3)),
    "lp": lambda x: x.pow(2).sum((2, 3)).sqrt(),
    "lse": _lse_pool,
}


class CBAMChannelGate(nn.Module):
    """Jongchan ChannelGate: shared MLP `mlp.{1,3}` over each pool, outputs summed."""

    def __init__(self, channels: int, reduction: int = 16, pool_types=("avg", "max")):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels, channels // reduction),
            nn.ReLU(),
            nn.Linear(channels // reduction, channels),
        )
        self.pool_types = pool_types

    def forward(self, x):
        total = sum(self.mlp(CHANNEL_POOLS[p](x)) for p in self.pool_types)
        return x * torch.sigmoid(total)[:, :, None, None]


class BasicConv(nn.Module):
    """Jongchan BasicConv used by the spatial gate: conv (no bias) + BN(momentum 0.01)."""

    def __init__(self, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01, affine=True)

    def forward(self, x):
        return self.bn(self.conv(x))


class CBAMSpatialGate(nn.Module):
    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.spatial = BasicConv(kernel_size)

    def forward(self, x):
        pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


class CBAMRef(nn.Module):
    """Jongchan CBAM: keys ChannelGate.*, SpatialGate.*."""

    def __init__(self, channels, reduction=16, pool_types=("avg", "max"), no_spatial=False, k=7):
        super().__init__()
        self.ChannelGate = CBAMChannelGate(channels, reduction, pool_types)
        self.no_spatial = no_spatial
        if not no_spatial:
            self.SpatialGate = CBAMSpatialGate(k)

    def forward(self, x):
        x = self.ChannelGate(x)
        return x if self.no_spatial else self.SpatialGate(x)


class ConvBN(nn.Module):
    """timm ConvNormAct without activation: keys conv, bn."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x):
        return self.bn(self.conv(x))


class TimmChannelAttn(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x):
        avg = self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        mx = self.fc2(F.relu(self.fc1(x.amax((2, 3), keepdim=True))))
        return x * torch.sigmoid(avg + mx)


class TimmSpatialAttn(nn.Module):
    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = ConvBN(2, 1, kernel_size)

    def forward(self, x):
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(pooled))


class TimmCBAM(nn.Module):
    """timm CbamModule: keys channel.fc{1,2}, spatial.conv.{conv,bn}."""

    def __init__(self, channels: int, hidden: int, kernel_size: int = 7):
        super().__init__()
        self.channel = TimmChannelAttn(channels, hidden)
        self.spatial = TimmSpatialAttn(kernel_size)

    def forward(self, x):
        return self.spatial(self.channel(x))


class BAMChannelGate(nn.Module):
    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = channels // reduction
        self.gate_c = nn.Sequential()
        self.gate_c.add_module("flatten", nn.Flatten())
        self.gate_c.add_module("gate_c_fc_0", nn.Linear(channels, hidden))
        self.gate_c.add_module("gate_c_bn_1", nn.BatchNorm1d(hidden))
        self.gate_c.add_module("gate_c_relu_1", nn.ReLU())
        self.gate_c.add_module("gate_c_fc_final", nn.Linear(hidden, channels))

    def forward(self, x):
        return self.gate_c(x.mean((2, 3)))[:, :, None, None]


class BAMSpatialGate(nn.Module):
    def __init__(self, channels: int, reduction: int, num_dilated: int, dilation: int):
        super().__init__()
        hidden = channels // reduction
        g = nn.Sequential()
        g.add_module("gate_s_conv_reduce0", nn.Conv2d(channels, hidden, 1))
        g.add_module("gate_s_bn_reduce0", nn.BatchNorm2d(hidden))
        g.add_module("gate_s_relu_reduce0", nn.ReLU())
        for i in range(num_dilated):
            conv = nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation)
            g.add_module(f"gate_s_conv_di_{i}", conv)
            g.add_module(f"gate_s_bn_di_{i}", nn.BatchNorm2d(hidden))
            g.add_module(f"gate_s_relu_di_{i}", nn.ReLU())
        g.add_module("gate_s_conv_final", nn.Conv2d(hidden, 1, 1))
        self.gate_s = g

    def forward(self, x):
        return self.gate_s(x)


class BAMRef(nn.Module):
    """Jongchan BAM: `x * (1 + sigmoid(channel (*) spatial))`, keys channel_att.*, spatial_att.*."""

    def __init__(self, channels, reduction=16, num_dilated=2, dilation=4, combine="product"):
        super().__init__()
        self.channel_att = BAMChannelGate(channels, reduction)
        self.spatial_att = BAMSpatialGate(channels, reduction, num_dilated, dilation)
        self.combine = combine

    def forward(self, x):
        c, s = self.channel_att(x), self.spatial_att(x)
        mixed = c * s if self.combine == "product" else c + s
        return x * (1 + torch.sigmoid(mixed))


class SEWeightModule(nn.Module):
    """murufeng SEWeightModule: keys fc1, fc2 (1x1 convs with bias), returns the sigmoid."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x):
        return torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class PSARef(nn.Module):
    """murufeng PSAModule: keys conv_{1..S}, se.fc{1,2}; reversed concatenation."""

    def __init__(self, inplanes, planes, kernels=(3, 5, 7, 9), stride=1, groups=(1, 4, 8, 16)):
        super().__init__()
        self.split = planes // len(kernels)
        for i, (k, g) in enumerate(zip(kernels, groups, strict=True)):
            conv = nn.Conv2d(
                inplanes, self.split, k, stride=stride, padding=k // 2, groups=g, bias=False
            )
            self.add_module(f"conv_{i + 1}", conv)
        self.branches = len(kernels)
        self.se = SEWeightModule(self.split)

    def forward(self, x):
        feats = [getattr(self, f"conv_{i + 1}")(x) for i in range(self.branches)]
        weights = torch.stack([self.se(f) for f in feats], dim=1).softmax(dim=1)
        weighted = [feats[i] * weights[:, i] for i in range(self.branches)]
        return torch.cat(weighted[::-1], dim=1)
