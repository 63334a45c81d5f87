"""FLAT featurizer: all weights of one architecture flattened into a vector, then an MLP.

Unlike upstream (a layer hard-wired to 4,970 inputs, "augmented" by shuffling vector entries), the input size is
taken from the first module seen, a module of another architecture raises an :class:`FMSError` naming the
problem, and training-time augmentation applies *real* neuron permutations (:func:`permute_hidden_units`), which
change the vector but not the function the weights compute.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor, nn

from lightning_fms.errors import FMSError
from lightning_fms.weights.base import ByteLRU, Featurizer
from lightning_fms.weights.graph import architecture_signature
from lightning_fms.weights.permutation import PermutationPlan, permute_hidden_units, plan_for

__all__ = ["FlatFeaturizer", "permute_hidden_units"]


class FlatFeaturizer(Featurizer):
    """Flattened weights -> ``Linear(P, hidden) -> ReLU -> Linear(hidden, d)``, for one architecture at a time.

    Args:
        embedding_dim: Output size ``d``.
        hidden_dim: Hidden width of the MLP.
        input_dim: Number of flattened values ``P``; default: taken from the first module seen (call
            :meth:`prepare` or run one forward before building an optimiser).
        augment: In training mode, permute the hidden units of every module at random before flattening.
        include_buffers: Also flatten floating-point buffers (BatchNorm running statistics).
        seed: Seed of the augmentation's random generator.
        value_cache_bytes: Budget of the cache of flattened vectors by key.
    """

    def __init__(
        self,
        embedding_dim: int = 32,
        hidden_dim: int = 128,
        input_dim: int | None = None,
        augment: bool = True,
        include_buffers: bool = False,
        seed: int = 0,
        value_cache_bytes: int = 1 << 28,
    ) -> None:
        super().__init__(embedding_dim)
        self.hidden_dim = int(hidden_dim)
        self.augment = bool(augment)
        self.include_buffers = bool(include_buffers)
        self.input_dim: int | None = None
        self.mlp: nn.Sequential | None = None
        self._signature: str | None = None
        self._names: tuple[str, ...] = ()
        self._arch: str = ""
        self._generator = torch.Generator().manual_seed(int(seed))
        self._values = ByteLRU(value_cache_bytes)
        self._index_plan: tuple[PermutationPlan, dict[str, Tensor]] | None = None
        if input_dim is not None:
            self._build(int(input_dim))

    def _build(self, p: int) -> None:
        self.input_dim = p
        self.mlp = nn.Sequential(
            nn.Linear(p, self.hidden_dim), nn.ReLU(), nn.Linear(self.hidden_dim, self.embedding_dim)
        )
        self.mlp.to(self.device, self.dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):  # noqa: ANN001, D102
        # a fresh featurizer loading a trained one's state builds its MLP from the stored weight shapes first
        weight = state_dict.get(prefix + "mlp.0.weight")
        if weight is not None and (self.mlp is None or self.input_dim != weight.shape[1]):
            self.mlp = None
            self._signature = None
            self._index_plan = None
            self.hidden_dim = int(weight.shape[0])
            self._build(int(weight.shape[1]))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    def _tensors(self, module: nn.Module) -> dict[str, Tensor]:
        out = {n: p.detach() for n, p in module.named_parameters()}
        if self.include_buffers:
            out.update({n: b.detach() for n, b in module.named_buffers() if b.is_floating_point()})
        return out

    def _check(self, module: nn.Module) -> None:
        sig = architecture_signature(module)
        if sig == self._signature:
            return
        tensors = self._tensors(module)
        p = sum(t.numel() for t in tensors.values())
        if self._signature is None:
            if p == 0:
                raise FMSError(f"the 'flat' featurizer got {type(module).__name__}, which has no parameters")
            if self.input_dim is not None and p != self.input_dim:
                raise FMSError(
                    f"the 'flat' featurizer was built for {self.input_dim} values, "
                    f"{type(module).__name__} has {p}; use 'gmn' or 'stats' for hubs of several architectures"
                )
            if self.mlp is None:
                self._build(p)
            self._signature = sig
            self._names = tuple(tensors)
            self._arch = type(module).__name__
            return
        raise FMSError(
            f"the 'flat' featurizer handles one architecture and was built for {self._arch} "
            f"({self.input_dim} values); got {type(module).__name__} ({p} values, different layers); "
            "use 'gmn' or 'stats' for hubs of several architectures"
        )

    def prepare(self, modules: Sequence[nn.Module]) -> None:
        """Build the MLP for the architecture of ``modules[0]``."""
        if modules:
            self._check(modules[0])

    def clear_cache(self) -> None:
        """Forget the cached inputs."""
        self._values.clear()

    def flatten(self, module: nn.Module) -> Tensor:
        """The flattened weights of ``module`` (detached), shape ``[P]``."""
        self._check(module)
        tensors = self._tensors(module)
        return torch.cat([tensors[n].reshape(-1) for n in self._names])

    def _gather_index(self, module: nn.Module) -> Tensor | None:
        """A random neuron permutation of ``module``'s architecture as an index into the flat vector."""
        if self._index_plan is None:
            plan = plan_for(module)
            if plan is None or plan.num_permutable == 0:
                self._index_plan = (None, {})  # type: ignore[assignment]
            else:
                ids, offset = {}, 0
                for n in self._names:
                    t = self._tensors(module)[n]
                    ids[n] = torch.arange(offset, offset + t.numel()).view(t.shape)
                    offset += t.numel()
                self._index_plan = (plan, ids)
        plan, ids = self._index_plan  # type: ignore[misc]
        if plan is None:
            return None
        permuted = plan.apply(ids, plan.sample(self._generator))
        return torch.cat([permuted[n].reshape(-1) for n in self._names])

    def forward(self, modules: Sequence[nn.Module], keys: Sequence[Hashable] | None = None) -> Tensor:
        """Embed modules (see :meth:`Featurizer.forward`); shape ``[B, embedding_dim]``."""
        self._check_keys(modules, keys)
        if len(modules) == 0:
            return self._ref.new_zeros(0, self.embedding_dim)
        rows = []
        for i, module in enumerate(modules):
            key = keys[i] if keys is not None else None
            flat = self._values.get(key) if key is not None else None
            if flat is None:
                flat = self.flatten(module)
                if key is not None:
                    self._values.put(key, flat)
            else:
                self._check(module)
            if self.training and self.augment:
                idx = self._gather_index(module)
                if idx is not None:
                    flat = flat.index_select(0, idx.to(flat.device))
            rows.append(flat)
        x = torch.stack(rows).to(self.device, self.dtype)
        assert self.mlp is not None
        return self.mlp(x)
