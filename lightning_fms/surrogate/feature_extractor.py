"""The deep kernel's input side: rows packed into one tensor, and the network that maps it to GP features.

A packed row is ``[x (D), budget (1), curve (W, if used), embedding (E, with a featurizer)]``:

* :func:`pack_rows` builds the first three parts; the real entries of each curve go through the
  targets' standardisation (padding stays 0), so curve and targets share units;
* :class:`WeightsBranch` appends FMS's weights embedding: it owns the featurizer, the state a full fit
  restarts it from, and the lookup of each row's embedding;
* :class:`FeatureExtractor` is DyHPO's network: an ``[x, budget]`` MLP, a curve CNN with global max
  pooling, and a fusing layer that also reads the embedding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_fms.surrogate._base import SurrogateRows
from lightning_fms.surrogate.numerics import cpu_state_dict


def pack_rows(
    rows: SurrogateRows,
    *,
    use_curve: bool,
    curve_width: int,
    mu: float,
    std: float,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """``[x, budget, standardised curve]`` of ``N`` rows, without the weights embedding.

    Args:
        rows: The rows; curves may be narrower than ``curve_width`` (zero-padded here) or wider
            (cut; only padding may be cut, which the surrogate checks before).
        use_curve: Whether to include the curve (``False``: ``[x, budget]`` only).
        curve_width: Width ``W`` of the curve part.
        mu: Mean of the targets' standardisation.
        std: Standard deviation of the targets' standardisation.
        device: Device of the result.
        dtype: Floating type of the result.

    Returns:
        Shape ``[N, D + 1 + W]`` (``[N, D + 1]`` without the curve).

    """
    parts = [rows.x.to(device, dtype), rows.budget.to(device, dtype).unsqueeze(-1)]
    if use_curve:
        curves = rows.curves.to(device, torch.float64)
        n, width = curves.shape
        if width < curve_width:
            curves = torch.cat([curves, curves.new_zeros(n, curve_width - width)], dim=-1)
        curves = curves[:, :curve_width]
        lengths = rows.curve_lengths.to(device).clamp(0, curve_width)
        real = torch.arange(curve_width, device=device).unsqueeze(0) < lengths.unsqueeze(-1)
        curves = torch.where(real, (curves - mu) / std, torch.zeros_like(curves))
        parts.append(curves.to(dtype))
    return torch.cat(parts, dim=-1)


class WeightsBranch:
    """FMS's weights input of the deep kernel: a featurizer and the state every full fit restarts it from.

    Args:
        featurizer: A module with an ``embedding_dim: int`` attribute whose ``forward(modules, keys=None)``
            returns a differentiable ``[len(modules), embedding_dim]`` tensor (given rows with a
            ``reference_index`` it is called with ``references=`` too). It is moved to ``device``.
        device: Where the featurizer runs.

    Raises:
        ValueError: If ``featurizer`` has no integer ``embedding_dim >= 1``.

    """

    def __init__(self, featurizer: nn.Module, device: torch.device) -> None:
        embedding_dim = getattr(featurizer, "embedding_dim", None)
        if not isinstance(embedding_dim, int) or embedding_dim < 1:
            raise ValueError("featurizer must have an integer attribute embedding_dim >= 1")
        self.featurizer = featurizer
        self.embedding_dim = embedding_dim
        featurizer.to(device)
        self.initial_state = cpu_state_dict(featurizer)

    def embed(self, rows: SurrogateRows, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Embeddings of the rows' weights, ``[N, E]`` (differentiable unless under ``no_grad``).

        Raises:
            ValueError: If the featurizer's output does not have shape ``[len(rows.weights), E]``.

        """
        assert rows.weights is not None and rows.weight_index is not None
        keys = None if rows.weight_keys is None else list(rows.weight_keys)
        if rows.reference_index is None:
            table = self.featurizer(list(rows.weights), keys)
        else:  # each run's starting weights, for featurizers that read how far training moved them
            references = [rows.weights[i] for i in rows.reference_index.tolist()]
            table = self.featurizer(list(rows.weights), keys, references=references)
        if table.shape != (len(rows.weights), self.embedding_dim):
            raise ValueError(
                f"featurizer returned shape {tuple(table.shape)}, expected [{len(rows.weights)}, {self.embedding_dim}]"
            )
        return table.to(device, dtype)[rows.weight_index.to(device)]

    def restart(self) -> None:
        """Reset the featurizer to its initial state (for a full fit) and put it in eval mode.

        Parts built after construction (NFN and FLAT build per-architecture parts when they first meet an
        architecture) are recorded first, so that they restart from their first values too.
        """
        for key, value in cpu_state_dict(self.featurizer).items():
            self.initial_state.setdefault(key, value)
        self.featurizer.load_state_dict(self.initial_state)
        self.featurizer.eval()

    def state_dict(self) -> dict[str, Any]:
        """The featurizer's current and initial states (CPU tensors)."""
        return {"featurizer": cpu_state_dict(self.featurizer), "featurizer_init": dict(self.initial_state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.initial_state = {key: value.clone() for key, value in state["featurizer_init"].items()}
        self.featurizer.load_state_dict(state["featurizer"])


class FeatureExtractor(nn.Module):
    """DyHPO's extractor: ``[x, budget]`` MLP, curve CNN, optional weight embedding, fused to ``output_dim``.

    Args:
        x_dim: Number of encoded hyperparameters ``D``.
        curve_width: Width ``W`` of the packed curve.
        use_curve: Whether packed rows hold a curve (and the CNN exists).
        embedding_dim: Width ``E`` of the packed weights embedding (0: none).
        hidden: Units of the ``[x, budget]`` layer.
        output_dim: Dimension ``F`` of the GP's input features.
        cnn_channels: Output channels ``C`` of the curve convolution.
        cnn_kernel: Kernel size of the curve convolution (at most ``W``).

    """

    def __init__(
        self,
        *,
        x_dim: int,
        curve_width: int,
        use_curve: bool,
        embedding_dim: int,
        hidden: int,
        output_dim: int,
        cnn_channels: int,
        cnn_kernel: int,
    ) -> None:
        super().__init__()
        self.hp_end = x_dim + 1
        self.curve_end = self.hp_end + (curve_width if use_curve else 0)
        self.embedding_dim = embedding_dim
        self.hp = nn.Sequential(nn.Linear(x_dim + 1, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU())
        self.curve = nn.Conv1d(1, cnn_channels, cnn_kernel) if use_curve else None
        fused = hidden + (cnn_channels if use_curve else 0) + embedding_dim
        self.out = nn.Sequential(nn.Linear(fused, output_dim), nn.LeakyReLU())

    def forward(self, packed: Tensor) -> Tensor:
        """Map packed rows ``[N, D + 1 (+ W) (+ E)]`` to GP features ``[N, output_dim]``."""
        parts = [self.hp(packed[:, : self.hp_end])]
        if self.curve is not None:
            curve = packed[:, self.hp_end : self.curve_end].unsqueeze(1)  # [N, 1, W]
            parts.append(self.curve(curve).amax(dim=-1))  # global max pool -> [N, C]
        if self.embedding_dim:
            parts.append(packed[:, self.curve_end :])
        return self.out(torch.cat(parts, dim=-1))


__all__ = ["FeatureExtractor", "WeightsBranch", "pack_rows"]
