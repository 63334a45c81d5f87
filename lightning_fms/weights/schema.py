"""The vocabulary of parameter graphs: node and edge types, feature columns and the options that shape a graph.

The conventions these encode are in the docstring of :mod:`lightning_fms.weights.graph`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from lightning_fms.weights._stats import NUM_STATS, STAT_NAMES


class NodeType(IntEnum):
    """Node types (column ``type`` of ``node_attr``)."""

    INPUT = 0
    LINEAR = 1
    CONV = 2
    BATCHNORM = 3
    LAYERNORM = 4
    GROUPNORM = 5
    INSTANCENORM = 6
    RMSNORM = 7
    ADD = 8
    MUL = 9
    PARAM_OP = 10
    EMBEDDING = 11
    ATTN_Q = 12
    ATTN_K = 13
    ATTN_V = 14
    ATTN_OUT = 15
    ATTN_HEAD = 16
    NORM_GROUP = 17
    TENSOR = 18  # statistics fallback: one node per tensor
    MERGE = 19  # concatenation of two activations along a non-feature dimension


class EdgeType(IntEnum):
    """Edge types (column ``type`` of the edge features)."""

    LINEAR = 0
    CONV = 1
    CONV_TRANSPOSE = 2
    FLAT_LINEAR = 3
    RESIDUAL = 4
    NORM = 5
    PARAM_OP = 6
    MUL = 7
    ATTN_Q = 8
    ATTN_K = 9
    ATTN_V = 10
    ATTN_OUT = 11
    ATTN_QK = 12
    HEAD_IN = 13
    HEAD_OUT = 14
    NORM_GROUP = 15
    SEQUENCE = 16  # statistics fallback: tensor i -> tensor i+1


NUM_NODE_TYPES = len(NodeType)
NUM_EDGE_TYPES = len(EdgeType)

#: Node feature columns that depend only on the architecture.
NODE_STATIC_FEATURES: tuple[str, ...] = (
    "type",
    "depth",
    "rel_depth",
    "io_pos",
    "part",
    "num_parts",
    "has_bias",
    "has_affine",
    "has_running",
    "has_stats",
    "log_numel",
)
#: Node feature columns read from the weights (zero where the flag above says absent).
NODE_VALUE_FEATURES: tuple[str, ...] = ("bias", "gamma", "beta", "running_mean", "running_var", *STAT_NAMES)
#: Edge feature columns after the kernel values.
EDGE_STATIC_FEATURES: tuple[str, ...] = (
    "type",
    "depth",
    "rel_depth",
    "head",
    "kernel_h",
    "kernel_w",
    "stride",
    "log_fan_in",
)
#: Per-edge-group features (an edge group is the edges one layer creates; ``head`` varies per edge and is apart).
GROUP_FEATURES: tuple[str, ...] = ("type", "depth", "rel_depth", "kernel_h", "kernel_w", "stride", "log_fan_in")

NS = {name: i for i, name in enumerate(NODE_STATIC_FEATURES)}
NV = {name: i for i, name in enumerate(NODE_VALUE_FEATURES)}
GF = {name: i for i, name in enumerate(GROUP_FEATURES)}
STAT_COLUMNS = slice(NV["q0"], NV["q0"] + NUM_STATS)


@dataclass(frozen=True)
class GraphOptions:
    """Options that change a parameter graph (and so are part of the topology cache key).

    Attributes:
        max_kernel_size: ``(Kh, Kw)`` grid every kernel vector is padded (or pooled) to.
        include_running_stats: Add BatchNorm/InstanceNorm running mean/variance as node features.
    """

    max_kernel_size: tuple[int, int] = (3, 3)
    include_running_stats: bool = True

    @property
    def kernel_numel(self) -> int:
        """``Kh * Kw``."""
        return self.max_kernel_size[0] * self.max_kernel_size[1]
