"""NFN featurizer: a permutation-equivariant neural functional (Zhou et al. 2023) for plain MLPs and 2-d CNNs.

Built on the PyPI package ``nfn`` (0.1.2, MIT; imported lazily): two ``NPLinear`` layers (equivariant to permuting
the hidden neurons of every layer, with learned input/output position embeddings), ReLU, ``HNPPool`` (invariant
pooling), then ``Linear -> ReLU -> Linear`` to the embedding. Unlike upstream, the layers are registered
submodules, created once and trained with the surrogate.

The network must be a chain of ``Linear``/``Conv2d`` layers (any parameter-free operations in between, global
pooling before the first ``Linear``), as found by the tracer; hidden widths may differ between modules (one
functional handles them all), but depth, input/output sizes and kernel sizes are fixed by the first module.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fms.errors import FMSError
from lightning_fms.weights.base import ByteLRU, Featurizer
from lightning_fms.weights.graph import TOPOLOGY_CACHE, GraphOptions, GraphTopology, NodeType, module_tensors


def _import_nfn() -> Any:
    try:
        import nfn.common
        import nfn.layers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise FMSError("the 'nfn' featurizer needs the package nfn (pip install nfn)") from exc
    return nfn


def chain_layers(topo: GraphTopology) -> list[tuple[str, str | None]] | None:
    """The ``(weight, bias)`` names of a plain Linear/Conv chain, in order, or ``None`` if it is not one."""
    if topo.fallback or topo.symmetry is None or not topo.layers:
        return None
    sym = topo.symmetry
    if any(t not in (NodeType.INPUT, NodeType.LINEAR, NodeType.CONV) for t in sym.set_types):
        return None
    layers = topo.layers
    first = layers[0]
    if len(first.in_segments) != 1 or sym.set_types[first.in_segments[0][0]] != NodeType.INPUT:
        return None
    out: list[tuple[str, str | None]] = []
    prev: int | None = None
    for rec in layers:
        if rec.kind not in ("linear", "conv") or not rec.plain or rec.weight is None:
            return None
        if prev is not None and rec.in_segments != ((prev, 0, sym.set_sizes[prev]),):
            return None
        out.append((rec.weight, rec.bias))
        prev = rec.out_set
    return out


class NFNFeaturizer(Featurizer):
    """Neural-functional embedding of plain MLPs/CNNs (see the module docstring).

    Args:
        embedding_dim: Output size ``d``.
        channels: Channels of the NP layers.
        num_layers: Number of ``NPLinear`` layers.
        hidden_dim: Hidden width of the head MLP.
        io_embed: Learned input/output position embeddings (breaks the input/output permutation symmetry that
            the network does not have).
        value_cache_bytes: Budget of the cache of weight tensors by key.
    """

    def __init__(
        self,
        embedding_dim: int = 32,
        channels: int = 16,
        num_layers: int = 2,
        hidden_dim: int = 128,
        io_embed: bool = True,
        value_cache_bytes: int = 1 << 28,
    ) -> None:
        super().__init__(embedding_dim)
        self._nfn = _import_nfn()
        self.channels = int(channels)
        self.num_layers = int(num_layers)
        self.hidden_dim = int(hidden_dim)
        self.io_embed = bool(io_embed)
        self.functional: nn.Module | None = None
        self.head: nn.Sequential | None = None
        self._spec: Any = None
        self._spec_key: tuple[Any, ...] | None = None
        self._values = ByteLRU(value_cache_bytes)
        # the weight shapes of the architecture the functional was built for (flattened, -1 separated), so that a
        # fresh featurizer can rebuild it from a state dict of tensors
        self.register_buffer("spec_shapes", torch.zeros(0, dtype=torch.long))

    def clear_cache(self) -> None:
        """Forget the cached inputs."""
        self._values.clear()

    def _weights(self, module: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        topo = TOPOLOGY_CACHE.get(module, GraphOptions())
        chain = chain_layers(topo)
        if chain is None:
            raise FMSError(
                f"the 'nfn' featurizer needs a plain chain of Linear/Conv2d layers; {type(module).__name__} has "
                "other layers (normalisation, residuals, attention, grouped or 1-d/3-d convolutions, or a flattened "
                "feature map); use 'gmn' or 'stats'"
            )
        tensors = module_tensors(module)
        weights, biases = [], []
        for w_name, b_name in chain:
            w = tensors[w_name]
            if w.dim() not in (2, 4):
                raise FMSError(f"the 'nfn' featurizer supports Linear and Conv2d layers; {w_name} has {w.dim()} dims")
            fan_in = w[0].numel()
            scale = float(fan_in) ** 0.5  # default initialisations -> O(1) values (a per-layer constant: equivariant)
            b = tensors[b_name] if b_name is not None else w.new_zeros(w.shape[0])
            weights.append(w * scale)
            biases.append(b * scale)
        return weights, biases

    def _spec_key_of(self, weights: list[Tensor]) -> tuple[Any, ...]:
        return (len(weights), weights[0].shape[1], weights[-1].shape[0], tuple(tuple(w.shape[2:]) for w in weights))

    def _build(self, weights: list[Tensor], biases: list[Tensor]) -> None:
        nfn = self._nfn
        wsf = nfn.common.WeightSpaceFeatures([w[None, None] for w in weights], [b[None, None] for b in biases])
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
        self.functional = nn.Sequential(*layers).to(self.device, self.dtype)
        n_out = nfn.layers.HNPPool.get_num_outs(spec) * self.channels
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(n_out, self.hidden_dim), nn.ReLU(), nn.Linear(self.hidden_dim, self.embedding_dim)
        ).to(self.device, self.dtype)
        self._spec = spec
        self._spec_key = self._spec_key_of(weights)
        flat = [v for w in weights for v in (*w.shape, -1)]
        self.spec_shapes = torch.tensor(flat, dtype=torch.long, device=self.device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):  # noqa: ANN001, D102
        key = prefix + "spec_shapes"
        stored = state_dict.get(key)
        if stored is not None and stored.numel() == 0 and self.spec_shapes.numel() > 0:
            state_dict[key] = self.spec_shapes  # a state recorded before the functional existed: keep ours
        elif stored is not None and stored.numel() > 0 and not torch.equal(stored.cpu(), self.spec_shapes.cpu()):
            shapes, cur = [], []
            for v in stored.tolist():
                if v == -1:
                    shapes.append(tuple(cur))
                    cur = []
                else:
                    cur.append(v)
            weights = [torch.zeros(shape) for shape in shapes]
            self._build(weights, [w.new_zeros(w.shape[0]) for w in weights])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    def _prepared(self, module: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        weights, biases = self._weights(module)
        key = self._spec_key_of(weights)
        if self._spec_key is None:
            self._build(weights, biases)
        elif key != self._spec_key:
            raise FMSError(
                f"the 'nfn' featurizer was built for networks with (layers, inputs, outputs, kernels) = "
                f"{self._spec_key}; {type(module).__name__} has {key}; use 'gmn' for hubs of several architectures"
            )
        return weights, biases

    def prepare(self, modules: Sequence[nn.Module]) -> None:
        """Build the functional for the architecture of ``modules[0]``."""
        if modules:
            self._prepared(modules[0])

    def forward(self, modules: Sequence[nn.Module], keys: Sequence[Hashable] | None = None) -> Tensor:
        """Embed modules (see :meth:`Featurizer.forward`); shape ``[B, embedding_dim]``."""
        self._check_keys(modules, keys)
        if len(modules) == 0:
            return self._ref.new_zeros(0, self.embedding_dim)
        entries = []
        for i, module in enumerate(modules):
            key = keys[i] if keys is not None else None
            entry = self._values.get(key) if key is not None else None
            if entry is None:
                entry = self._prepared(module)
                if key is not None:
                    self._values.put(key, entry)
            entries.append(entry)
        # modules of different hidden widths run in separate batches
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, (weights, _) in enumerate(entries):
            groups.setdefault(tuple(tuple(w.shape) for w in weights), []).append(i)
        out = self._ref.new_zeros(len(modules), self.embedding_dim)
        nfn = self._nfn
        assert self.functional is not None and self.head is not None
        for idx in groups.values():
            ws = [torch.stack([entries[i][0][j] for i in idx]).unsqueeze(1) for j in range(len(entries[idx[0]][0]))]
            bs = [torch.stack([entries[i][1][j] for i in idx]).unsqueeze(1) for j in range(len(entries[idx[0]][1]))]
            wsf = nfn.common.WeightSpaceFeatures(
                [w.to(self.device, self.dtype) for w in ws], [b.to(self.device, self.dtype) for b in bs]
            )
            emb = self.head(self.functional(wsf))
            out = out.index_copy(0, torch.tensor(idx, device=out.device), emb)
        return out
