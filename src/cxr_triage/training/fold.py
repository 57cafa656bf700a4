"""Make a trained timm network plain for export at one input size: TF "same" padding made static, BatchNorm folded.

torch.fx cannot trace timm's ``Conv2dSame`` (its padding depends on the input size) nor fuse ``BatchNormAct2d``
(BatchNorm + activation in one module), which TF-ported networks such as ``tf_efficientnet_lite0`` use throughout.
The bundle's input size is fixed, so each ``Conv2dSame`` becomes a constant zero pad + plain convolution (no shape
arithmetic in the ONNX graph), and each convolution directly followed by a BatchNorm child is folded into one
convolution with a bias; the BatchNorm's activation (if any) stays. Checked against the original on real input.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

FOLD_TOL = 1e-3  # max |logit difference| folded vs original (fp32 rounding only)


class FoldError(RuntimeError):
    """The folded network does not reproduce the original."""


def _same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class StaticSamePad(nn.Module):
    """Constant zero padding (left, right, top, bottom) then a plain convolution: one input size's 'same' conv."""

    def __init__(self, pads: tuple[int, int, int, int], conv: nn.Conv2d) -> None:
        super().__init__()
        self.pads = pads
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(nn.functional.pad(x, self.pads))


def _is_dynamic_same(module: nn.Module) -> bool:
    return type(module).__name__ in ("Conv2dSame", "Conv2dSameExport")


def static_padding(model: nn.Module, size: int) -> nn.Module:
    """Replace every dynamic-'same' convolution (in place) by ``StaticSamePad`` for square ``size`` px input."""
    seen: dict[str, tuple[int, int]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, inp, name=name: seen.__setitem__(name, tuple(inp[0].shape[-2:])))
        for name, m in model.named_modules()
        if _is_dynamic_same(m)
    ]
    with torch.no_grad():
        model(torch.zeros(1, 1, size, size))
    for h in hooks:
        h.remove()
    for name, (ih, iw) in seen.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        k, s, d = old.kernel_size, old.stride, old.dilation
        top, bottom = _same_pads(ih, k[0], s[0], d[0])
        left, right = _same_pads(iw, k[1], s[1], d[1])
        conv = nn.Conv2d(old.in_channels, old.out_channels, k, s, 0, d, old.groups, old.bias is not None)
        conv.load_state_dict(old.state_dict())
        setattr(parent, child, StaticSamePad((left, right, top, bottom), conv))
    return model


def _conv_of(module: nn.Module) -> nn.Conv2d | None:
    if isinstance(module, StaticSamePad):
        return module.conv
    return module if isinstance(module, nn.Conv2d) else None


def _after_bn(bn: nn.BatchNorm2d) -> nn.Module:
    """What a BatchNorm module does after normalising: timm's BatchNormAct2d drops out and activates."""
    parts = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
    parts = [m for m in parts if not isinstance(m, nn.Identity)]
    return nn.Sequential(*parts) if parts else nn.Identity()


def fold_batchnorm(model: nn.Module) -> int:
    """Fold each BatchNorm2d child that directly follows a convolution child into it (in place); the count folded."""
    folded = 0
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (_, first), (bn_name, second) in zip(children, children[1:], strict=False):
            conv = _conv_of(first)
            if conv is None or not isinstance(second, nn.BatchNorm2d) or not second.track_running_stats:
                continue
            w, b = fuse_conv_bn_weights(
                conv.weight, conv.bias, second.running_mean, second.running_var, second.eps, second.weight, second.bias
            )
            conv.weight, conv.bias = w, b
            setattr(parent, bn_name, _after_bn(second))
            folded += 1
    return folded


def fold_for_export(model: nn.Module, size: int) -> nn.Module:
    """A folded copy of ``model`` (eval mode) for ``size`` px input; FoldError if its logits differ from the
    original's."""
    original = model.eval()
    folded = static_padding(copy.deepcopy(original), size)
    fold_batchnorm(folded)
    folded.eval()
    x = torch.linspace(-1, 1, 2 * size * size).reshape(2, 1, size, size)
    with torch.no_grad():
        diff = float((original(x) - folded(x)).abs().max())
    if diff > FOLD_TOL:
        raise FoldError(f"folded network differs from the original by {diff:.2e} in logits (> {FOLD_TOL})")
    return folded
