"""NFN featurizer: a permutation-equivariant neural functional (Zhou et al. 2023), with a statistics fallback.

Built on the PyPI package ``nfn`` (0.1.2, MIT; imported lazily): two ``NPLinear`` layers (equivariant to permuting
the hidden neurons of every layer, with learned input/output position embeddings), ReLU, ``HNPPool`` (invariant
pooling), then ``Linear -> ReLU -> Linear`` to the embedding. Unlike upstream, the layers are registered
submodules, created once and trained with the surrogate.

Native architectures
    Chains of ``Linear``/``Conv2d`` layers, as found by the tracer, with any parameter-free operations in between
    (activations, max/average pooling, flattening). A ``Linear`` that reads a flattened ``C x k`` feature map (a
    CNN ending in ``AdaptiveAvgPool2d(2) -> Flatten -> Linear``) computes what a convolution whose kernel covers
    the whole map computes; it enters the functional as that convolution, weight ``[out, C, 1, k]``. Permuting
    the ``C`` channels moves their ``k`` weights together, so the NP layers stay equivariant to it. There is one
    functional (and head) per network spec (depth, input/output sizes, kernel sizes), built the first time a
    module of that spec is seen; hidden widths may differ between the modules of one spec.

Fallback
    Every other architecture (normalisation, residual additions, attention, embeddings, grouped or 1-d/3-d
    convolutions, code the tracer cannot follow) is embedded from the per-tensor statistics that
    :class:`~lightning_fms.weights.stats.StatsFeaturizer` computes, through a trainable linear projection of its
    own (one per architecture signature, built on first sight), with one ``warnings.warn`` per architecture
    saying why. ``fallback=False`` raises an :class:`FMSError` instead.

Trunk and readout (``trainable``)
    The trunk of a native architecture is its functional (NP layers and pooling), the readout its head MLP; the
    trunk of a fallback architecture is the statistics (no parameters), the readout its projection. With
    ``trainable="readout"`` (the CPU default of ``"auto"``) the functionals stay at their seeded initialisation,
    their pooled output is computed once per key (:class:`~lightning_fms.weights.base.TrunkCache`) and a
    training step runs the heads and projections only; ``"all"`` (the GPU default) trains every part. The NP
    layers act on each network of a batch separately, so a cached row does not depend on the batch it was
    computed in.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_fms.errors import FMSError
from lightning_fms.extras import import_optional
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
from lightning_fms.weights.schema import NodeType
from lightning_fms.weights.stats import StatsFeaturizer
from lightning_fms.weights.topology import GraphTopology, module_tensors

SpecKey = tuple[Any, ...]
Shapes = list[tuple[int, ...]]


def _import_nfn() -> Any:
    """The ``nfn`` package (the ``nfn`` extra), with its ``common`` and ``layers`` modules loaded."""
    for module in ("nfn.common", "nfn.layers"):
        import_optional(module, "nfn", "the 'nfn' featurizer")
    return import_optional("nfn", "nfn", "the 'nfn' featurizer")


@dataclass(frozen=True)
class ChainLayer:
    """One layer of a chain the functional reads natively.

    Attributes:
        weight: Name of the weight tensor.
        bias: Name of the bias tensor, or ``None``.
        positions: Positions ``k`` per channel of the flattened feature map a ``Linear`` reads (1: none).
        layout: How the flattened map is laid out: ``"major"`` (index ``c * k + r``) or ``"minor"``
            (index ``r * C + c``).
    """

    weight: str
    bias: str | None
    positions: int = 1
    layout: str = "major"


_OTHER_OPERATIONS: dict[int, str] = {
    NodeType.BATCHNORM: "normalisation",
    NodeType.LAYERNORM: "normalisation",
    NodeType.GROUPNORM: "normalisation",
    NodeType.INSTANCENORM: "normalisation",
    NodeType.RMSNORM: "normalisation",
    NodeType.NORM_GROUP: "normalisation",
    NodeType.ADD: "residual additions",
    NodeType.MUL: "elementwise products",
    NodeType.PARAM_OP: "parameter operations (positional embeddings, layer scales)",
    NodeType.EMBEDDING: "embeddings",
    NodeType.ATTN_Q: "attention",
    NodeType.ATTN_K: "attention",
    NodeType.ATTN_V: "attention",
    NodeType.ATTN_OUT: "attention",
    NodeType.ATTN_HEAD: "attention",
    NodeType.MERGE: "concatenations",
}


def nfn_chain(topo: GraphTopology) -> tuple[tuple[ChainLayer, ...] | None, str]:
    """The layers of a chain the functional reads natively, or why the topology is not one.

    Args:
        topo: A traced topology (:data:`~lightning_fms.weights.graph.TOPOLOGY_CACHE`).

    Returns:
        ``(layers, "")`` for a chain of ``Linear``/``Conv2d`` layers (a ``Linear`` may read a flattened feature
        map), else ``(None, reason)``, ``reason`` completing a sentence that starts with the network's name.
    """
    if topo.fallback or topo.symmetry is None:
        return None, f"could not be read by the tracer ({topo.fallback_reason})"
    sym = topo.symmetry
    skip = (NodeType.INPUT, NodeType.LINEAR, NodeType.CONV)
    other = sorted({_OTHER_OPERATIONS.get(t, NodeType(t).name.lower()) for t in sym.set_types if t not in skip})
    if other:
        return None, f"is not a plain Linear/Conv2d chain (it has {', '.join(other)})"
    if not topo.layers:
        return None, "has no Linear/Conv2d layers"
    first = topo.layers[0]
    if len(first.in_segments) != 1 or sym.set_types[first.in_segments[0][0]] != NodeType.INPUT:
        return None, "does not start with a layer reading its input"
    flattened = {name: (layout, k) for name, axis, _, layout, k, _ in sym.param_axes if axis == 1 and k > 1}
    out: list[ChainLayer] = []
    prev: int | None = None
    for rec in topo.layers:
        if rec.kind not in ("linear", "conv") or rec.weight is None:
            return None, f"has a {rec.kind} layer"
        if prev is not None and rec.in_segments != ((prev, 0, sym.set_sizes[prev]),):
            return None, "branches (its layers do not form one chain)"
        positions, layout = 1, "major"
        if not rec.plain:
            if rec.kind == "conv":
                return None, f"has a grouped or transposed convolution ({rec.weight})"
            if rec.weight not in flattened:
                return None, f"has a transposed linear map ({rec.weight})"
            found, positions = flattened[rec.weight]
            layout = found or "major"
        out.append(ChainLayer(rec.weight, rec.bias, positions, layout))
        prev = rec.out_set
    return tuple(out), ""


def _spec_key(shapes: Shapes) -> SpecKey:
    """What fixes a functional: depth, input and output sizes, kernel shapes (not the hidden widths)."""
    return (len(shapes), shapes[0][1], shapes[-1][0], tuple(tuple(s[2:]) for s in shapes))


def _encode_specs(specs: list[Shapes]) -> Tensor:
    """Weight shapes per spec, flattened: ``-1`` after every shape, ``-2`` between specs."""
    values: list[int] = []
    for i, shapes in enumerate(specs):
        if i:
            values.append(-2)
        values += [v for shape in shapes for v in (*shape, -1)]
    return torch.tensor(values, dtype=torch.long)


def _decode_specs(value: Tensor) -> list[Shapes]:
    specs: list[Shapes] = []
    shapes: Shapes = []
    cur: list[int] = []
    for v in value.tolist():
        if v == -1:
            shapes.append(tuple(cur))
            cur = []
        elif v == -2:
            specs.append(shapes)
            shapes = []
        else:
            cur.append(v)
    if shapes:
        specs.append(shapes)
    return specs


class _Arch(NamedTuple):
    signature: str
    name: str
    chain: tuple[ChainLayer, ...] | None  # None: statistics fallback
    reason: str


class _Native(NamedTuple):
    weights: list[Tensor]
    biases: list[Tensor]


class _Fallback(NamedTuple):
    signature: str
    features: Tensor


class NFNFeaturizer(Featurizer):
    """Neural-functional embedding of MLP/CNN chains, statistics for other architectures (see the module docstring).

    Args:
        embedding_dim: Output size ``d``.
        channels: Channels of the NP layers.
        num_layers: Number of ``NPLinear`` layers.
        hidden_dim: Hidden width of the head MLP.
        io_embed: Learned input/output position embeddings (breaks the input/output permutation symmetry that
            the network does not have).
        fallback: Embed architectures the functional cannot read from weight statistics (with a warning);
            ``False`` raises an :class:`FMSError` for them.
        fallback_tensors: Tensors described by the statistics fallback (``num_tensors`` of ``stats``).
        fallback_selection: ``"first"`` or ``"spread"`` (``selection`` of ``stats``).
        value_cache_bytes: Budget of the cache of inputs (weight tensors, statistics) by key (a quarter of it
            again for the cached functional outputs).
        trainable: ``"all"`` (functionals, heads and fallback projections are trained through the surrogate's
            likelihood), ``"readout"`` (the functionals stay at their seeded initialisation and their pooled
            output is cached by key; only the heads and fallback projections are trained), or ``"auto"``
            (default): ``"all"`` on a GPU, ``"readout"`` on a CPU, where training the functionals made a
            100-observation decision of the demo cost 268 s from scratch and 8.7 s warm-started.
    """

    def __init__(
        self,
        embedding_dim: int = 32,
        channels: int = 16,
        num_layers: int = 2,
        hidden_dim: int = 128,
        io_embed: bool = True,
        fallback: bool = True,
        fallback_tensors: int = 16,
        fallback_selection: str = "first",
        value_cache_bytes: int = 1 << 28,
        trainable: str = "auto",
    ) -> None:
        super().__init__(embedding_dim)
        self.trainable = check_trainable(trainable)
        if fallback_selection not in ("first", "spread"):
            raise FMSError(f"fallback_selection must be 'first' or 'spread', got {fallback_selection!r}")
        if int(fallback_tensors) < 1:
            raise FMSError(f"fallback_tensors must be positive, got {fallback_tensors!r}")
        self._nfn = _import_nfn()
        self.channels = int(channels)
        self.num_layers = int(num_layers)
        self.hidden_dim = int(hidden_dim)
        self.io_embed = bool(io_embed)
        self.fallback = bool(fallback)
        self.fallback_tensors = int(fallback_tensors)
        self.fallback_selection = fallback_selection
        # the functional and head of the first spec seen keep their names (state dicts of one architecture)
        self.functional: nn.Module | None = None
        self.head: nn.Sequential | None = None
        self.extra_functionals = nn.ModuleList()
        self.extra_heads = nn.ModuleList()
        self.fallbacks = nn.ModuleList()
        self._specs: list[Shapes] = []
        self._spec_index: dict[SpecKey, int] = {}
        self._fallback_signatures: list[str] = []
        self._fallback_index: dict[str, int] = {}
        self._archs: dict[str, _Arch] = {}
        self._values = ByteLRU(value_cache_bytes)
        self._pooled = TrunkCache(value_cache_bytes // 4)
        # what the lazily built parts were built for, so that a fresh featurizer can rebuild them from a state dict
        # of tensors: the weight shapes of every spec (flattened, -1 after each shape, -2 between specs) and the
        # architecture signature of every fallback projection
        self.register_buffer("spec_shapes", torch.zeros(0, dtype=torch.long))
        self.register_buffer("fallback_signatures", signatures_to_tensor([]))

    def clear_cache(self) -> None:
        """Forget the cached inputs (and, with ``trainable="readout"``, the cached functional outputs)."""
        self._values.clear()
        self._pooled.clear()

    def is_readout_parameter(self, name: str) -> bool:
        """Whether ``name`` belongs to a head or a fallback projection (the functionals are the trunk)."""
        return name.startswith(("head.", "extra_heads.", "fallbacks."))

    # ------------------------------------------------------------------ architectures

    def _arch(self, module: nn.Module) -> _Arch:
        """Classify ``module``'s architecture (once; warns when it falls back, raises without ``fallback``)."""
        signature = architecture_signature(module)
        arch = self._archs.get(signature)
        if arch is None:
            chain, reason = nfn_chain(topology_quietly(module))
            if chain is not None:
                tensors = module_tensors(module)
                for layer in chain:
                    dims = tensors[layer.weight].dim()
                    if dims not in (2, 4):
                        chain, reason = None, f"has a 1-d or 3-d convolution ({layer.weight} has {dims} dimensions)"
                        break
            arch = _Arch(signature, type(module).__qualname__, chain, reason)
            self._archs[signature] = arch
            if chain is None and self.fallback:
                numel = sum(p.numel() for p in module.parameters())
                warnings.warn(
                    f"the 'nfn' featurizer embeds {arch.name} ({numel:,} parameters) from per-tensor weight "
                    f"statistics through a trainable projection, not with the neural functional: {arch.name} {reason}",
                    stacklevel=2,
                )
        if arch.chain is None and not self.fallback:
            raise FMSError(
                f"the 'nfn' featurizer with fallback=False embeds plain chains of Linear/Conv2d layers only; "
                f"{arch.name} {arch.reason}; use 'gmn' or 'stats', or fallback=True"
            )
        return arch

    def _weights(self, module: nn.Module, chain: tuple[ChainLayer, ...]) -> tuple[list[Tensor], list[Tensor]]:
        tensors = module_tensors(module)
        weights, biases = [], []
        for layer in chain:
            w = tensors[layer.weight]
            if layer.positions > 1:  # a Linear on a flattened C x k map: the convolution covering the map
                out_f, k = w.shape[0], layer.positions
                w = w.reshape(out_f, -1, k) if layer.layout == "major" else w.reshape(out_f, k, -1).transpose(1, 2)
                w = w.unsqueeze(2)
            fan_in = w[0].numel()
            scale = float(fan_in) ** 0.5  # default initialisations -> O(1) values (a per-layer constant: equivariant)
            b = tensors[layer.bias] if layer.bias is not None else w.new_zeros(w.shape[0])
            weights.append(w * scale)
            biases.append(b * scale)
        return weights, biases

    def _entry(self, module: nn.Module) -> _Native | _Fallback:
        """The inputs of one module (everything that does not depend on the featurizer's parameters)."""
        arch = self._arch(module)
        if arch.chain is None:
            part = self.fallbacks[self._fallback_part(arch.signature)]
            return _Fallback(arch.signature, part.features(module))
        return _Native(*self._weights(module, arch.chain))

    # ------------------------------------------------------------------ lazily built parts

    def _native_part(self, shapes: Shapes) -> int:
        """Index of the functional for weights of these shapes (built if new)."""
        index = self._spec_index.get(_spec_key(shapes))
        return self._build_native(shapes) if index is None else index

    def _build_native(self, shapes: Shapes) -> int:
        nfn = self._nfn
        weights = [torch.zeros(shape) for shape in shapes]
        wsf = nfn.common.WeightSpaceFeatures(
            [w[None, None] for w in weights], [w.new_zeros(1, 1, w.shape[0]) for w in weights]
        )
        spec = nfn.common.network_spec_from_wsfeat(wsf)
        layers: list[nn.Module] = []
        c_in = 1
        for _ in range(self.num_layers):
            layers += [
                nfn.layers.NPLinear(spec, c_in, self.channels, io_embed=self.io_embed),
                nfn.layers.TupleOp(nn.ReLU()),
            ]
            c_in = self.channels
        layers.append(nfn.layers.HNPPool(spec))
        functional = nn.Sequential(*layers).to(self.device, self.dtype)
        n_out = nfn.layers.HNPPool.get_num_outs(spec) * self.channels
        head = nn.Sequential(
            nn.Flatten(), nn.Linear(n_out, self.hidden_dim), nn.ReLU(), nn.Linear(self.hidden_dim, self.embedding_dim)
        ).to(self.device, self.dtype)
        if not self._specs:
            self.functional, self.head = functional, head
        else:
            self.extra_functionals.append(functional)
            self.extra_heads.append(head)
        index = len(self._specs)
        self._specs.append([tuple(s) for s in shapes])
        self._spec_index[_spec_key(shapes)] = index
        self.spec_shapes = _encode_specs(self._specs).to(self.device)
        self._apply_trainable()
        return index

    def _native_modules(self, index: int) -> tuple[nn.Module, nn.Module]:
        if index == 0:
            assert self.functional is not None and self.head is not None
            return self.functional, self.head
        return self.extra_functionals[index - 1], self.extra_heads[index - 1]

    def _fallback_part(self, signature: str) -> int:
        """Index of the statistics projection of an architecture (built if new)."""
        index = self._fallback_index.get(signature)
        if index is not None:
            return index
        part = StatsFeaturizer(
            self.embedding_dim,
            num_tensors=self.fallback_tensors,
            selection=self.fallback_selection,
            value_cache_bytes=0,  # inputs are cached here
        )
        self.fallbacks.append(part.to(self.device, self.dtype))
        index = len(self._fallback_signatures)
        self._fallback_signatures.append(signature)
        self._fallback_index[signature] = index
        self.fallback_signatures = signatures_to_tensor(self._fallback_signatures).to(self.device)
        return index

    def _part(self, entry: _Native | _Fallback) -> int:
        if isinstance(entry, _Native):
            return self._native_part([tuple(w.shape) for w in entry.weights])
        return self._fallback_part(entry.signature)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):  # noqa: ANN001, D102
        # a fresh featurizer loading a trained one's state first rebuilds the parts it records, in the same order;
        # a state recorded before some parts existed (a prefix of ours) keeps ours
        stale = self._trunk_state_changes(state_dict, prefix)  # compared before parts are rebuilt
        key = prefix + "spec_shapes"
        if key in state_dict:
            stored = _decode_specs(state_dict[key])
            stored_keys = [_spec_key(s) for s in stored]
            ours = [_spec_key(s) for s in self._specs]
            if stored_keys != ours[: len(stored_keys)]:
                if stored_keys[: len(ours)] != ours:
                    stale = True  # the functionals are rebuilt: which one serves which spec may change
                    self.functional, self.head = None, None
                    self.extra_functionals, self.extra_heads = nn.ModuleList(), nn.ModuleList()
                    self._specs, self._spec_index = [], {}
                for shapes in stored[len(self._specs) :]:
                    self._build_native(shapes)
            state_dict[key] = self.spec_shapes
        key = prefix + "fallback_signatures"
        stored_sigs = tensor_to_signatures(state_dict[key]) if key in state_dict else []
        ours_sigs = self._fallback_signatures
        if stored_sigs != ours_sigs[: len(stored_sigs)]:
            if stored_sigs[: len(ours_sigs)] != ours_sigs:
                self.fallbacks = nn.ModuleList()
                self._fallback_signatures, self._fallback_index = [], {}
            for signature in stored_sigs[len(self._fallback_signatures) :]:
                self._fallback_part(signature)
        state_dict[key] = self.fallback_signatures
        if stale:
            self._pooled.clear()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    # ------------------------------------------------------------------ the contract

    def prepare(self, modules: Sequence[nn.Module]) -> None:
        """Build the functionals and fallback projections for the architectures of ``modules``, in order."""
        for module in modules:
            arch = self._arch(module)
            if arch.chain is None:
                self._fallback_part(arch.signature)
            else:
                self._native_part([tuple(w.shape) for w in self._weights(module, arch.chain)[0]])

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
        if len(self._pooled):  # "auto" on a GPU trains the functionals: outputs cached on a CPU would go stale
            self._pooled.clear()
        entries, groups = self._group(modules, keys)
        out = self._ref.new_zeros(len(modules), self.embedding_dim)
        for group, idx in groups.items():
            batch = [entries[i] for i in idx]
            if group[0] == "stats":
                feats = torch.stack([e.features for e in batch if isinstance(e, _Fallback)])
                emb = self.fallbacks[group[1]].proj(feats.to(self.device, self.dtype))
            else:
                native = [e for e in batch if isinstance(e, _Native)]
                emb = self._native_modules(group[1])[1](self.trunk(group[1], native))
            out = out.index_copy(0, torch.tensor(idx, device=out.device), emb)
        return out

    def _group(
        self, modules: Sequence[nn.Module], keys: Sequence[Hashable] | None
    ) -> tuple[list[_Native | _Fallback], dict[tuple[Any, ...], list[int]]]:
        """The inputs of every module (cached by key) and the positions of each batch (part, hidden widths)."""
        entries: list[_Native | _Fallback] = []
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, module in enumerate(modules):
            key = keys[i] if keys is not None else None
            entry = self._values.get(key) if key is not None else None
            if entry is None:
                entry = self._entry(module)
                if key is not None:
                    self._values.put(key, entry)
            entries.append(entry)
            part = self._part(entry)  # built here, in the order architectures are first seen
            if isinstance(entry, _Native):  # modules of different hidden widths run in separate batches
                group: tuple[Any, ...] = ("nfn", part, tuple(tuple(w.shape) for w in entry.weights))
            else:
                group = ("stats", part)
            groups.setdefault(group, []).append(i)
        return entries, groups

    def _readout_forward(self, modules: Sequence[nn.Module], keys: Sequence[Hashable] | None) -> Tensor:
        """``trainable="readout"``: heads and projections on cached inputs (a whole batch is cached by its keys)."""
        batch_key = ("heads", tuple(keys), self.device, self.dtype) if keys is not None else None
        memo = self._pooled.batches.get(batch_key) if batch_key is not None else None
        if memo is None:
            memo = self._readout_inputs(modules, keys)
            if batch_key is not None:
                self._pooled.batches.put(batch_key, memo)
        inputs, inverse = memo
        layers = [self.fallbacks[index].proj if stats else self._native_modules(index)[1] for stats, index, _ in inputs]
        return gather_rows([layer(features) for layer, (_, _, features) in zip(layers, inputs)], inverse)

    def _readout_inputs(
        self, modules: Sequence[nn.Module], keys: Sequence[Hashable] | None
    ) -> tuple[list[tuple[bool, int, Tensor]], Tensor | None]:
        """The inputs of the heads and projections, one batch per head or projection.

        Returns:
            ``(is_fallback, part, features)`` per batch, the features being the statistics ``[b, num_tensors * 9]``
            of a fallback or the functional's cached output ``[b, channels, n_pool]`` (networks of one spec and
            different hidden widths share a head: the pooled size depends on the spec only), and the
            :func:`~lightning_fms.weights.base.inverse_order` of the batches.
        """
        entries, groups = self._group(modules, keys)
        merged: dict[tuple[bool, int], tuple[list[int], list[Tensor]]] = {}
        for group, idx in groups.items():
            batch = [entries[i] for i in idx]
            if group[0] == "stats":  # the statistics are the trunk, cached as inputs; the projection is trained
                feats = torch.stack([e.features for e in batch if isinstance(e, _Fallback)]).to(self.device, self.dtype)
            else:
                native = [e for e in batch if isinstance(e, _Native)]
                sub_keys = [keys[i] for i in idx] if keys is not None else None
                compute = functools.partial(self._trunk_of, group[1], native)
                feats = self._pooled.rows(sub_keys, len(native), self.device, self.dtype, compute, memo=False)
            positions, parts = merged.setdefault((group[0] == "stats", group[1]), ([], []))
            positions.extend(idx)
            parts.append(feats)
        inputs = [(stats, index, torch.cat(parts)) for (stats, index), (_, parts) in merged.items()]
        return inputs, inverse_order([positions for positions, _ in merged.values()], self.device)

    def trunk(self, index: int, native: Sequence[_Native]) -> Tensor:
        """Functional ``index`` (NP layers and invariant pooling) on networks of one spec and one set of widths.

        Args:
            index: Which functional (its spec's index).
            native: ``B`` inputs of networks of that spec with equal hidden widths.

        Returns:
            The pooled features, shape ``[B, channels, n_pool]``.
        """
        nfn = self._nfn
        ws = [torch.stack([e.weights[j] for e in native]).unsqueeze(1) for j in range(len(native[0].weights))]
        bs = [torch.stack([e.biases[j] for e in native]).unsqueeze(1) for j in range(len(native[0].biases))]
        wsf = nfn.common.WeightSpaceFeatures(
            [w.to(self.device, self.dtype) for w in ws], [b.to(self.device, self.dtype) for b in bs]
        )
        return self._native_modules(index)[0](wsf)

    def _trunk_of(self, index: int, native: Sequence[_Native], todo: list[int]) -> Tensor:
        return self.trunk(index, [native[j] for j in todo])
