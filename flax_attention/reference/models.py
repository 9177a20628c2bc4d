"""PyTorch reference ResNets (NCHW), written from the specification.

State_dict key names follow torchvision (plain), senet.pytorch (`se`), timm (`se` with 1x1
convs), Jongchan/attention-module (`cbam` in blocks, `bam1..3` between stages) and
murufeng/EPSANet (`conv2` is the PSA). Attention modules come from `reference.layers`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flax_attention.reference.layers import BAMRef, CBAMRef, PSARef, SELayer, TimmCBAM, TimmSE


def timm_se_hidden(c: int) -> int:
    return max(8, int(c / 16 + 4) // 8 * 8)


# Preset -> (PyTorch attribute name, factory(channels)).
ATTENTION = {
    "se": ("se", lambda c: SELayer(c, c // 16, bias=False)),
    "se_timm": ("se", lambda c: TimmSE(c, timm_se_hidden(c))),
    "cbam": ("cbam", lambda c: CBAMRef(c, 16)),
    "cbam_timm": ("se", lambda c: TimmCBAM(c, max(1, round(c / 16)))),
}


def conv_bn(cin: int, cout: int, k: int, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout)


def downsample(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(*conv_bn(cin, cout, 1, stride))


class TorchBlock(nn.Module):
    """Residual block: the `convs` (with ReLU between), attention on the branch, add, ReLU."""

    expansion = 1
    attention_name: str | None = None

    def set_attention(self, attention: str | None, channels: int) -> None:
        if attention is not None:
            self.attention_name, factory = ATTENTION[attention]
            setattr(self, self.attention_name, factory(channels))

    def branch(self, x):
        raise NotImplementedError

    def forward(self, x):
        y = self.branch(x)
        if self.attention_name is not None:
            y = getattr(self, self.attention_name)(y)
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(y + shortcut)


class TorchBasicBlock(TorchBlock):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, attention: str | None = None):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(cin, planes, 3, stride)
        self.conv2, self.bn2 = conv_bn(planes, planes, 3)
        self.set_attention(attention, planes)
        self.downsample = downsample(cin, planes, stride)

    def branch(self, x):
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


class TorchBottleneck(TorchBlock):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, attention: str | None = None):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(cin, planes, 1)
        self.conv2, self.bn2 = conv_bn(planes, planes, 3, stride)
        self.conv3, self.bn3 = conv_bn(planes, planes * 4, 1)
        self.set_attention(attention, planes * 4)
        self.downsample = downsample(cin, planes * 4, stride)

    def branch(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return self.bn3(self.conv3(y))


class TorchEPSABlock(TorchBlock):
    """murufeng EPSABlock: conv2 is PSA(planes, planes) holding the stride."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, attention: str | None = None):
        super().__init__()
        assert attention is None
        self.conv1, self.bn1 = conv_bn(cin, planes, 1)
        self.conv2, self.bn2 = PSARef(planes, planes, stride=stride), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = conv_bn(planes, planes * 4, 1)
        self.downsample = downsample(cin, planes * 4, stride)

    def branch(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return self.bn3(self.conv3(y))


class TorchResNet(nn.Module):
    """torchvision stem/head; `bam=True` puts Jongchan's BAM after layer1..3 (`bam1..3`)."""

    def __init__(self, block, layers, num_classes=1000, attention=None, bam=False):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(3, 64, 7, 2)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = 64
        for i, depth in enumerate(layers):
            planes = 64 * 2**i
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(cin, planes, stride, attention))
                cin = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            if bam and i < len(layers) - 1:
                self.add_module(f"bam{i + 1}", BAMRef(cin))
        self.num_stages = len(layers)
        self.bam = bam
        self.fc = nn.Linear(cin, num_classes)

    def forward_features(self, x):
        """(logits, [stage outputs]) for NCHW `x`."""
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        feats = []
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
            if self.bam and i < self.num_stages - 1:
                x = getattr(self, f"bam{i + 1}")(x)
            feats.append(x)
        return self.fc(x.mean((2, 3))), feats

    def forward(self, x):
        return self.forward_features(x)[0]


DEPTHS = {
    18: (TorchBasicBlock, (2, 2, 2, 2)),
    34: (TorchBasicBlock, (3, 4, 6, 3)),
    50: (TorchBottleneck, (3, 4, 6, 3)),
    101: (TorchBottleneck, (3, 4, 23, 3)),
    152: (TorchBottleneck, (3, 8, 36, 3)),
}
FAMILIES = {  # registry prefix -> TorchResNet keywords
    "resnet": {},
    "se_resnet": {"attention": "se"},
    "seresnet": {"attention": "se_timm"},
    "cbam_resnet": {"attention": "cbam"},
    "bam_resnet": {"bam": True},
}
EPSANETS = {"epsanet50_small": (3, 4, 6, 3), "epsanet101_small": (3, 4, 23, 3)}


def torch_model(name: str, num_classes: int = 1000) -> TorchResNet:
    """The PyTorch reference of registered model `name` (e.g. `cbam_resnet18`)."""
    if name in EPSANETS:
        return TorchResNet(TorchEPSABlock, EPSANETS[name], num_classes)
    prefix = name.rstrip("0123456789")
    block, layers = DEPTHS[int(name[len(prefix) :])]
    return TorchResNet(block, layers, num_classes, **FAMILIES[prefix])


def randomize_batchnorms_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random affine parameters and running statistics in every BatchNorm (in place)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                shape = m.running_mean.shape
                m.weight.copy_(torch.rand(shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(shape, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(shape, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(shape, generator=gen) + 0.5)
    return model


def reference(name: str, num_classes: int = 1000, seed: int = 0) -> TorchResNet:
    """A randomly initialised reference model in eval mode with non-trivial BatchNorms."""
    torch.manual_seed(seed)
    model = torch_model(name, num_classes)
    for m in model.modules():  # torchvision's init keeps deep activations from vanishing
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return randomize_batchnorms_(model, seed).eval()
