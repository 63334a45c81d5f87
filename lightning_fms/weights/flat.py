"""FLAT featurizer: all weights of a network flattened into a vector, then an MLP of that architecture.

Unlike upstream (one layer hard-wired to 4,970 inputs, "augmented" by shuffling vector entries), there is one MLP
per architecture signature, its input size taken from the first module of that architecture seen (built then, so
a hub of several architectures embeds in one call), and training-time augmentation applies *real* neuron
permutations of each architecture (:func:`permute_hidden_units`), which change the vector but not the function
the weights compute.

Trunk and readout (``trainable``): the trunk of an MLP is ``ReLU(Linear(P, hidden))``, its readout the last
``Linear(hidden, d)``. With ``trainable="readout"`` (the CPU default of ``"auto"``) the trunks stay at their seeded
initialisation, so they are fixed random ReLU features of the flattened weights, computed once per key
(:class:`~lightning_fms.weights.base.TrunkCache`); a training step runs the readouts only. Augmentation is off in
that mode (``augment`` is ignored): a fresh permutation every step changes the trunk's input and so its output,
which could then not be cached; keeping a few permuted copies per checkpoint instead would multiply the trunk's
cost and the cache by their number. ``"all"`` (the GPU default) trains the whole MLPs, with augmentation.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_fms.errors import FMSError
from lightning_fms.weights.base import (
    ByteLRU,
    Featurizer,
    TrunkCache,
    check_trainable,
    gather_rows,
    inverse_order,
    signatures_to_tensor,
    tensor_to_signatures,
    topology_quietly,
)
from lightning_fms.weights.graph import architecture_signature
from lightning_fms.weights.permutation import PermutationPlan, permute_hidden_units, plan_for

__all__ = ["FlatFeaturizer", "permute_hidden_units"]


@dataclass
class _Arch:
    """What the featurizer knows about one architecture (independent of its parameters and of load order)."""

    name: str
    names: tuple[str, ...]
    size: int
    # the permutation plan and the flat-vector index of every tensor entry (None: not looked up yet)
    index_plan: tuple[PermutationPlan | None, dict[str, Tensor]] | None = field(default=None, repr=False)


class FlatFeaturizer(Featurizer):
    """Flattened weights -> ``Linear(P, hidden) -> ReLU -> Linear(hidden, d)``, one MLP per architecture.

    Args:
        embedding_dim: Output size ``d``.
        hidden_dim: Hidden width of the MLPs.
        input_dim: Number of flattened values ``P`` of the first architecture (its MLP is built at once); default:
            every MLP is built when the first module of its architecture is seen (call :meth:`prepare` with the
            modules, or run one forward, before building an optimiser).
        augment: In training mode, permute the hidden units of every module at random before flattening (only
            when the whole MLPs are trained: not with ``trainable="readout"``, see the module docstring).
        include_buffers: Also flatten floating-point buffers (BatchNorm running statistics).
        seed: Seed of the augmentation's random generator.
        value_cache_bytes: Budget of the cache of flattened vectors by key (a quarter of it again for the cached
            trunk outputs).
        trainable: ``"all"`` (the whole MLPs are trained through the surrogate's likelihood, with augmentation),
            ``"readout"`` (the first layer of every MLP stays at its seeded initialisation and its ReLU output is
            cached by key; only the last layers are trained, without augmentation), or ``"auto"`` (default):
            ``"all"`` on a GPU, ``"readout"`` on a CPU.
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
        trainable: str = "auto",
    ) -> None:
        super().__init__(embedding_dim)
        self.trainable = check_trainable(trainable)
        self.hidden_dim = int(hidden_dim)
        self.augment = bool(augment)
        self.include_buffers = bool(include_buffers)
        self.input_dim: int | None = None
        # the MLP of the first architecture keeps its name (state dicts of one architecture)
        self.mlp: nn.Sequential | None = None
        self.extra_mlps = nn.ModuleList()
        self._signatures: list[str] = []  # architecture of MLP i (the first MLP may be unclaimed: built from input_dim)
        self._index: dict[str, int] = {}
        self._archs: dict[str, _Arch] = {}
        self._generator = torch.Generator().manual_seed(int(seed))
        self._values = ByteLRU(value_cache_bytes)
        self._hidden = TrunkCache(value_cache_bytes // 4)
        # the signature of every MLP's architecture, so that a fresh featurizer can rebuild them from a state dict
        self.register_buffer("signatures", signatures_to_tensor([]))
        if input_dim is not None:
            self._build(int(input_dim))

    # ------------------------------------------------------------------ per-architecture MLPs

    def _build(self, p: int, hidden_dim: int | None = None) -> None:
        """Append an MLP for ``p`` inputs (the first one becomes ``self.mlp``)."""
        hidden = self.hidden_dim if hidden_dim is None else int(hidden_dim)
        mlp = nn.Sequential(nn.Linear(p, hidden), nn.ReLU(), nn.Linear(hidden, self.embedding_dim))
        mlp.to(self.device, self.dtype)
        if self.mlp is None:
            self.mlp = mlp
            self.input_dim = p
        else:
            self.extra_mlps.append(mlp)
        self._apply_trainable()

    def is_readout_parameter(self, name: str) -> bool:
        """Whether ``name`` belongs to the last layer of an MLP (the first one is the trunk)."""
        return name.startswith("mlp.2.") or (name.startswith("extra_mlps.") and name.split(".")[2] == "2")

    def _mlp(self, index: int) -> nn.Sequential:
        if index == 0:
            assert self.mlp is not None
            return self.mlp
        return self.extra_mlps[index - 1]  # type: ignore[return-value]

    def _reset(self) -> None:
        self.mlp = None
        self.extra_mlps = nn.ModuleList()
        self.input_dim = None
        self._signatures, self._index = [], {}
        self.signatures = signatures_to_tensor([]).to(self.device)

    def _claim(self, index: int, signature: str) -> None:
        self._signatures.append(signature)
        self._index[signature] = index
        self.signatures = signatures_to_tensor(self._signatures).to(self.device)

    def _tensors(self, module: nn.Module) -> dict[str, Tensor]:
        out = {n: p.detach() for n, p in module.named_parameters()}
        if self.include_buffers:
            out.update({n: b.detach() for n, b in module.named_buffers() if b.is_floating_point()})
        return out

    def _arch(self, module: nn.Module) -> tuple[str, _Arch]:
        signature = architecture_signature(module)
        arch = self._archs.get(signature)
        if arch is None:
            tensors = self._tensors(module)
            arch = _Arch(type(module).__qualname__, tuple(tensors), sum(t.numel() for t in tensors.values()))
            self._archs[signature] = arch
        return signature, arch

    def _check(self, module: nn.Module) -> int:
        """Index of the MLP of ``module``'s architecture, built (or the unclaimed first one claimed) if new."""
        signature, arch = self._arch(module)
        index = self._index.get(signature)
        if index is not None:
            return index
        if arch.size == 0:
            raise FMSError(f"the 'flat' featurizer got {arch.name}, which has no parameters")
        index = len(self._signatures)
        if index == 0 and self.mlp is not None:  # built before any module was seen (input_dim, or an old state)
            if arch.size != self.input_dim:
                raise FMSError(
                    f"the 'flat' featurizer was built for {self.input_dim} values, {arch.name} has {arch.size}; "
                    "leave input_dim unset to size every architecture's MLP from its first module"
                )
        else:
            self._build(arch.size)
        self._claim(index, signature)
        return index

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):  # noqa: ANN001, D102
        # a fresh featurizer loading a trained one's state first rebuilds the MLPs it records, in the same order, for
        # the same architectures; a state recorded before some MLPs existed (a prefix of ours) keeps ours. A state
        # without signatures (one MLP, from before there were several) gives its MLP to the first module seen.
        stale = self._trunk_state_changes(state_dict, prefix)  # compared before MLPs are rebuilt
        key = prefix + "signatures"
        stored = tensor_to_signatures(state_dict[key]) if key in state_dict else []
        first = state_dict.get(prefix + "mlp.0.weight")
        ours = self._signatures
        same_first = first is None or (self.mlp is not None and tuple(self.mlp[0].weight.shape) == tuple(first.shape))
        if stored == ours[: len(stored)] and (stored or same_first):
            pass
        else:
            if not ours or stored[: len(ours)] != ours:
                stale = True  # the MLPs are rebuilt: which one serves which architecture may change
                self._reset()
            if not stored and first is not None:
                self.hidden_dim = int(first.shape[0])
                self._build(int(first.shape[1]))
            for index in range(len(self._signatures), len(stored)):
                weight = state_dict[prefix + ("mlp.0.weight" if index == 0 else f"extra_mlps.{index - 1}.0.weight")]
                if index == 0:
                    self.hidden_dim = int(weight.shape[0])
                self._build(int(weight.shape[1]), int(weight.shape[0]))
                self._claim(index, stored[index])
        state_dict[key] = self.signatures
        if stale:
            self._hidden.clear()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    # ------------------------------------------------------------------ inputs

    def prepare(self, modules: Sequence[nn.Module]) -> None:
        """Build the MLPs for the architectures of ``modules``, in order."""
        for module in modules:
            self._check(module)

    def clear_cache(self) -> None:
        """Forget the cached inputs (and, with ``trainable="readout"``, the cached trunk outputs)."""
        self._values.clear()
        self._hidden.clear()

    def flatten(self, module: nn.Module) -> Tensor:
        """The flattened weights of ``module`` (detached), shape ``[P]``."""
        self._check(module)
        _, arch = self._arch(module)
        tensors = self._tensors(module)
        return torch.cat([tensors[n].reshape(-1) for n in arch.names])

    def _gather_index(self, module: nn.Module) -> Tensor | None:
        """A random neuron permutation of ``module``'s architecture as an index into the flat vector."""
        _, arch = self._arch(module)
        if arch.index_plan is None:
            topo = topology_quietly(module)
            plan = plan_for(module)
            if topo.fallback:
                warnings.warn(
                    f"the 'flat' featurizer cannot augment {arch.name} with neuron permutations: it could not be "
                    f"read by the tracer ({topo.fallback_reason}); its weights are used as they are",
                    stacklevel=2,
                )
            if plan is None or plan.num_permutable == 0:
                arch.index_plan = (None, {})
            else:
                ids, offset = {}, 0
                tensors = self._tensors(module)
                for n in arch.names:
                    t = tensors[n]
                    ids[n] = torch.arange(offset, offset + t.numel()).view(t.shape)
                    offset += t.numel()
                arch.index_plan = (plan, ids)
        plan, ids = arch.index_plan
        if plan is None:
            return None
        permuted = plan.apply(ids, plan.sample(self._generator))
        return torch.cat([permuted[n].reshape(-1) for n in arch.names])

    def _flat(self, module: nn.Module, key: Hashable | None) -> Tensor:
        """:meth:`flatten`, cached by key."""
        flat = self._values.get(key) if key is not None else None
        if flat is None:
            flat = self.flatten(module)
            if key is not None:
                self._values.put(key, flat)
        return flat

    def forward(
        self,
        modules: Sequence[nn.Module],
        keys: Sequence[Hashable] | None = None,
        references: Sequence[nn.Module] | None = None,
    ) -> Tensor:
        """Embed modules (see :meth:`Featurizer.forward`), shape ``[B, embedding_dim]``; ``references`` are unused."""
        self._check_keys(modules, keys)
        if len(modules) == 0:
            return self._ref.new_zeros(0, self.embedding_dim)
        self._sync_trainable()
        if self.effective_trainable == "readout":
            return self._readout_forward(modules, keys)
        if len(self._hidden):  # "auto" on a GPU trains the trunks: outputs cached on a CPU would go stale
            self._hidden.clear()
        rows = []
        groups: dict[int, list[int]] = {}
        for i, module in enumerate(modules):
            flat = self._flat(module, keys[i] if keys is not None else None)
            groups.setdefault(self._check(module), []).append(i)
            if self.training and self.augment:
                idx = self._gather_index(module)
                if idx is not None:
                    flat = flat.index_select(0, idx.to(flat.device))
            rows.append(flat)
        if len(groups) == 1:
            (index,) = groups
            return self._mlp(index)(torch.stack(rows).to(self.device, self.dtype))
        out = self._ref.new_zeros(len(modules), self.embedding_dim)
        for index, idx in groups.items():
            x = torch.stack([rows[i] for i in idx]).to(self.device, self.dtype)
            out = out.index_copy(0, torch.tensor(idx, device=out.device), self._mlp(index)(x))
        return out

    def _readout_forward(self, modules: Sequence[nn.Module], keys: Sequence[Hashable] | None) -> Tensor:
        """``trainable="readout"``: last layers on cached trunk outputs (a whole batch is cached by its keys)."""
        batch_key = ("heads", tuple(keys), self.device, self.dtype) if keys is not None else None
        memo = self._hidden.batches.get(batch_key) if batch_key is not None else None
        if memo is None:
            memo = self._readout_inputs(modules, keys)
            if batch_key is not None:
                self._hidden.batches.put(batch_key, memo)
        inputs, inverse = memo
        return gather_rows([self._mlp(index)[2](hidden) for index, hidden in inputs], inverse)

    def _readout_inputs(
        self, modules: Sequence[nn.Module], keys: Sequence[Hashable] | None
    ) -> tuple[list[tuple[int, Tensor]], Tensor | None]:
        """The inputs of the last layers.

        No augmentation (see the module docstring); flattened weights are read only for trunk outputs not cached.

        Returns:
            ``(MLP index, trunk output [b, hidden])`` per architecture, and the
            :func:`~lightning_fms.weights.base.inverse_order` of these batches.
        """
        groups: dict[int, list[int]] = {}
        for i, module in enumerate(modules):
            groups.setdefault(self._check(module), []).append(i)
        inputs = []
        for index, idx in groups.items():
            sub_keys = [keys[i] for i in idx] if keys is not None else None
            compute = functools.partial(self._trunk_of, index, [modules[i] for i in idx], sub_keys)
            hidden = self._hidden.rows(sub_keys, len(idx), self.device, self.dtype, compute, memo=False)
            inputs.append((index, hidden))
        return inputs, inverse_order(list(groups.values()), self.device)

    def trunk(self, index: int, flats: Tensor) -> Tensor:
        """The first layer of MLP ``index`` and its ReLU.

        Args:
            index: Which MLP (its architecture's index).
            flats: Flattened weights of ``B`` modules of that architecture, shape ``[B, P]``.

        Returns:
            Shape ``[B, hidden]``.
        """
        mlp = self._mlp(index)
        return mlp[1](mlp[0](flats.to(self.device, self.dtype)))

    def _trunk_of(
        self, index: int, modules: Sequence[nn.Module], keys: Sequence[Hashable] | None, todo: list[int]
    ) -> Tensor:
        flats = [self._flat(modules[j], keys[j] if keys is not None else None) for j in todo]
        return self.trunk(index, torch.stack(flats))
