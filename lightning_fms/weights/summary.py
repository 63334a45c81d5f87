"""SUMMARY featurizer: fixed statistics of the weights after epoch ``t`` and of how far training moved them.

Nothing is trained: the 20 numbers describe ``W_t`` and ``W_t - W_0`` (``W_0`` the hub entry's pretrained weights
the run started from) for any architecture, so a surrogate can read how a run is going from its checkpoint alone.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor, nn

from lightning_fms.errors import FMSError
from lightning_fms.weights.base import ByteLRU, Featurizer

#: What is computed per tensor: three statistics of ``W_t``, then two of ``W_t - W_0``.
TENSOR_FEATURES: tuple[str, ...] = ("mean", "std", "max_abs", "relative_change", "mean_abs_change")
#: How each per-tensor feature is summarised over the tensors of a network.
SUMMARIES: tuple[str, ...] = ("mean", "std", "min", "max")
#: The features, in output order (``"<tensor feature>/<summary>"``).
FEATURE_NAMES: tuple[str, ...] = tuple(f"{f}/{s}" for f in TENSOR_FEATURES for s in SUMMARIES)
#: Where the change features start in the output.
CHANGE_START = 3 * len(SUMMARIES)
# The relative change divides by max(||W_0||, RMS_FLOOR * sqrt(numel)): a tensor that starts at zero (a bias, a
# norm's shift) reads as moved by its RMS change over 1e-3 instead of dividing by zero.
RMS_FLOOR = 1e-3


def tensor_features(value: Tensor, reference: Tensor | None) -> Tensor:
    """The per-tensor features of one tensor.

    Args:
        value: A tensor of ``W_t`` (at least one element).
        reference: The same tensor of ``W_0`` (same shape), or ``None``.

    Returns:
        Shape ``[5]`` (float64): mean, population std and max ``|w|`` of ``value``, then
        ``||value - reference|| / ||reference||`` and ``mean |value - reference|`` (zeros without a reference).
    """
    w = value.detach().double().reshape(-1)
    out = torch.zeros(len(TENSOR_FEATURES), dtype=torch.float64, device=w.device)
    out[0] = w.mean()
    out[1] = w.std(unbiased=False) if w.numel() > 1 else 0.0
    out[2] = w.abs().max()
    if reference is not None:
        r = reference.detach().to(w.device, torch.float64).reshape(-1)
        delta = w - r
        scale = torch.clamp(r.norm(), min=RMS_FLOOR * w.numel() ** 0.5)
        out[3] = delta.norm() / scale
        out[4] = delta.abs().mean()
    return out


def summarise(per_tensor: Tensor) -> Tensor:
    """Mean, population std, min and max over tensors of each per-tensor feature.

    Args:
        per_tensor: Shape ``[T, F]`` with ``T >= 1``.

    Returns:
        Shape ``[F * 4]``: feature-major (the four summaries of feature 0, then of feature 1, ...).
    """
    std = per_tensor.std(0, unbiased=False) if per_tensor.shape[0] > 1 else torch.zeros_like(per_tensor[0])
    parts = [per_tensor.mean(0), std, per_tensor.amin(0), per_tensor.amax(0)]
    return torch.stack(parts, dim=1).reshape(-1)


class SummaryFeaturizer(Featurizer):
    """Fixed, architecture-agnostic summaries of ``W_t`` and ``W_t - W_0``; no trainable parameters.

    For every parameter tensor (and floating buffer, if asked) it computes the mean, std and max ``|w|`` of ``W_t``,
    the relative change ``||W_t - W_0|| / ||W_0||`` and the mean ``|W_t - W_0|``, and summarises each over the
    tensors by mean, std, min and max: :data:`FEATURE_NAMES`, ``embedding_dim = 20``. Without references the change
    features are zero. Tensors are paired with their reference by name, so a reference must have the module's
    architecture. Everything is computed in float64; the featurizer itself starts in float64 (``.float()`` makes
    its output float32). Rows are cached by ``(key, whether a reference was given)``: a key identifies one fixed set
    of weights and, with references, one fixed reference.

    Args:
        include_buffers: Also describe floating-point buffers (BatchNorm running statistics).
        value_cache_bytes: Budget of the cache of rows by key.
    """

    def __init__(self, include_buffers: bool = False, value_cache_bytes: int = 1 << 24) -> None:
        super().__init__(len(FEATURE_NAMES))
        self.include_buffers = bool(include_buffers)
        self._values = ByteLRU(value_cache_bytes)
        self.double()

    def clear_cache(self) -> None:
        """Forget the cached rows."""
        self._values.clear()

    def _tensors(self, module: nn.Module) -> dict[str, Tensor]:
        tensors = dict(module.named_parameters())
        if self.include_buffers:
            tensors.update((name, b) for name, b in module.named_buffers() if b.is_floating_point())
        return {name: t for name, t in tensors.items() if t.numel() > 0}

    def features(self, module: nn.Module, reference: nn.Module | None = None) -> Tensor:
        """The 20 features of one module, shape ``[20]`` (float64, on the CPU).

        Raises:
            FMSError: If the module has no (non-empty) tensor, or ``reference`` lacks one of its tensors or has
                another shape for it.
        """
        tensors = self._tensors(module)
        if not tensors:
            raise FMSError(f"the 'summary' featurizer found no weights in {type(module).__name__}")
        refs = self._tensors(reference) if reference is not None else None
        rows = []
        for name, value in tensors.items():
            ref = None
            if refs is not None:
                ref = refs.get(name)
                if ref is None or ref.shape != value.shape:
                    raise FMSError(
                        f"the reference of {type(module).__name__} has no tensor {name!r} of shape "
                        f"{tuple(value.shape)}: a reference must have its module's architecture"
                    )
            rows.append(tensor_features(value, ref))
        return summarise(torch.stack(rows)).cpu()

    def forward(
        self,
        modules: Sequence[nn.Module],
        keys: Sequence[Hashable] | None = None,
        references: Sequence[nn.Module] | None = None,
    ) -> Tensor:
        """Embed modules (see :meth:`Featurizer.forward`), shape ``[B, 20]``.

        Args:
            modules: ``B`` modules (``W_t``), of any architectures.
            keys: Optional key per module, for the cache.
            references: Optional ``B`` modules (``W_0`` of each run); without them the change features are 0.
        """
        self._check_keys(modules, keys, references)
        if len(modules) == 0:
            return self._ref.new_zeros(0, self.embedding_dim)
        rows = []
        for i, module in enumerate(modules):
            reference = references[i] if references is not None else None
            key = (keys[i], reference is not None) if keys is not None else None
            feats = self._values.get(key) if key is not None else None
            if feats is None:
                feats = self.features(module, reference)
                if key is not None:
                    self._values.put(key, feats)
            rows.append(feats)
        return torch.stack(rows).to(self.device, self.dtype)
