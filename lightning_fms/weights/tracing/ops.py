"""The catalogue of operations the interpreter recognises, grouped by how they move neurons.

The handler tables (:mod:`~lightning_fms.weights.tracing.functions`, :mod:`~lightning_fms.weights.tracing.methods`,
:mod:`~lightning_fms.weights.tracing.modules`) map every entry here to the semantics of its group.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: ``torch.nn`` layers without weights that keep the neurons where they are (activations, dropout, pooling, padding).
ACTIVATION_MODULES: tuple[type[nn.Module], ...] = tuple(
    getattr(nn, n)
    for n in (
        "ReLU ReLU6 LeakyReLU ELU SELU CELU GELU SiLU Mish Hardswish Hardsigmoid Hardtanh Sigmoid Tanh Softplus "
        "Softsign Tanhshrink Softshrink Hardshrink Threshold LogSigmoid Softmax LogSoftmax Softmin Softmax2d "
        "Dropout Dropout1d Dropout2d Dropout3d AlphaDropout FeatureAlphaDropout Identity "
        "MaxPool1d MaxPool2d MaxPool3d AvgPool1d AvgPool2d AvgPool3d AdaptiveAvgPool1d AdaptiveAvgPool2d "
        "AdaptiveAvgPool3d AdaptiveMaxPool1d AdaptiveMaxPool2d AdaptiveMaxPool3d LPPool1d LPPool2d Upsample "
        "UpsamplingNearest2d UpsamplingBilinear2d ZeroPad1d ZeroPad2d ZeroPad3d ConstantPad1d ConstantPad2d "
        "ConstantPad3d ReflectionPad1d ReflectionPad2d ReflectionPad3d ReplicationPad1d ReplicationPad2d "
        "ReplicationPad3d CircularPad1d CircularPad2d CircularPad3d"
    ).split()
    if hasattr(nn, n)
)

#: Functions that keep the neurons of their first argument where they are (elementwise, pooling, resizing).
UNARY_FUNCTIONS: frozenset[Any] = frozenset(
    {
        torch.relu,
        torch.relu_,
        torch.sigmoid,
        torch.tanh,
        torch.exp,
        torch.log,
        torch.abs,
        torch.neg,
        torch.clamp,
        torch.clip,
        torch.erf,
        torch.square,
        torch.sqrt,
        torch.rsqrt,
        torch.sin,
        torch.cos,
        torch.softmax,
        torch.log_softmax,
        torch.clone,
        torch.detach,
        torch.nan_to_num,
        torch.dropout,
        operator.neg,
        operator.pos,
        F.relu,
        F.relu6,
        F.gelu,
        F.silu,
        F.elu,
        F.selu,
        F.celu,
        F.leaky_relu,
        F.mish,
        F.hardswish,
        F.hardsigmoid,
        F.hardtanh,
        F.softplus,
        F.softsign,
        F.tanhshrink,
        F.logsigmoid,
        F.sigmoid,
        F.tanh,
        F.threshold,
        F.dropout,
        F.dropout1d,
        F.dropout2d,
        F.dropout3d,
        F.alpha_dropout,
        F.feature_alpha_dropout,
        F.normalize,
        F.softmax,
        F.log_softmax,
        F.avg_pool1d,
        F.avg_pool2d,
        F.avg_pool3d,
        F.max_pool1d,
        F.max_pool2d,
        F.max_pool3d,
        F.adaptive_avg_pool1d,
        F.adaptive_avg_pool2d,
        F.adaptive_avg_pool3d,
        F.adaptive_max_pool1d,
        F.adaptive_max_pool2d,
        F.adaptive_max_pool3d,
        F.lp_pool1d,
        F.lp_pool2d,
        F.interpolate,
        F.upsample,
        F.pad,
    }
)
#: Functions recognised by name (they live in optional packages): per-sample random scaling, equivariant.
PASS_THROUGH_NAMES = frozenset({"stochastic_depth", "drop_path", "drop_block_2d", "drop_block_fast_2d"})
#: Methods that keep the neurons of their receiver where they are.
UNARY_METHODS = frozenset(
    (
        "relu relu_ sigmoid sigmoid_ tanh tanh_ exp exp_ log abs abs_ neg clamp clamp_ clamp_min clamp_max clip "
        "contiguous float double half bfloat16 to type type_as clone detach softmax log_softmax sqrt rsqrt "
        "square sin cos erf cpu cuda requires_grad_ masked_fill masked_fill_ nan_to_num"
    ).split()
)

#: Elementwise binary operations, by function: the operation they apply (``add``, ``sub``, ``mul``, ``div``,
#: ``matmul``).
BINARY_FUNCTIONS: dict[Callable[..., Any], str] = {
    operator.add: "add",
    operator.iadd: "add",
    torch.add: "add",
    operator.sub: "sub",
    operator.isub: "sub",
    torch.sub: "sub",
    torch.subtract: "sub",
    operator.mul: "mul",
    operator.imul: "mul",
    torch.mul: "mul",
    torch.multiply: "mul",
    operator.truediv: "div",
    operator.itruediv: "div",
    torch.div: "div",
    torch.true_divide: "div",
    operator.matmul: "matmul",
    torch.matmul: "matmul",
    torch.mm: "matmul",
}
#: Elementwise binary operations, by tensor method name.
BINARY_METHODS: dict[str, str] = {
    "add": "add",
    "add_": "add",
    "__add__": "add",
    "__radd__": "add",
    "sub": "sub",
    "sub_": "sub",
    "__sub__": "sub",
    "mul": "mul",
    "mul_": "mul",
    "__mul__": "mul",
    "__rmul__": "mul",
    "div": "div",
    "div_": "div",
    "__truediv__": "div",
    "matmul": "matmul",
    "mm": "matmul",
}
#: Powers (the exponent must not carry neurons).
POW_FUNCTIONS: frozenset[Any] = frozenset({operator.pow, torch.pow})
POW_METHODS = frozenset({"pow", "__pow__"})
#: Reductions (over the features: a value without neurons; over other dimensions: the features move).
REDUCE_FUNCTIONS: frozenset[Any] = frozenset(
    {
        torch.mean,
        torch.sum,
        torch.amax,
        torch.amin,
        torch.max,
        torch.min,
        torch.std,
        torch.var,
        torch.norm,
        torch.logsumexp,
        torch.prod,
    }
)
REDUCE_METHODS = frozenset({"mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod"})
#: Methods that read a tensor's layout, not its values.
LAYOUT_METHODS = frozenset({"size", "dim", "numel", "nelement", "stride", "data_ptr", "is_contiguous"})
#: Methods that create tensors from the receiver's dtype and device only (no neurons).
CREATE_METHODS = frozenset({"new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"})
#: Methods that broadcast or tile: the features stay where they are.
BROADCAST_METHODS = frozenset({"expand", "expand_as", "repeat", "broadcast_to"})
#: Functions that create tensors (no neurons).
CREATE_FUNCTIONS: frozenset[Any] = frozenset(
    {
        torch.zeros,
        torch.ones,
        torch.full,
        torch.arange,
        torch.randn,
        torch.rand,
        torch.empty,
        torch.zeros_like,
        torch.ones_like,
        torch.full_like,
        torch.rand_like,
        torch.randn_like,
        torch.empty_like,
        torch.tensor,
        torch.as_tensor,
        torch.eye,
        torch.linspace,
        torch.triu,
        torch.tril,
    }
)
