"""Real neuron permutations: reorder hidden units consistently across all the tensors that touch them.

The permutation group comes from the traced parameter graph (:class:`SymmetryInfo`): neuron sets tied by identity
edges (residual additions, normalisations, parameter operations) share one permutation; attention layers permute
heads and, within each head, query/key dimensions jointly and value dimensions separately; network inputs and
outputs, grouped convolutions and norm groups are left in place. Applying it leaves the network function unchanged
(up to floating-point rounding), which the tests check.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TypeVar

import torch
from torch import Tensor, nn

from lightning_fms.errors import FMSError
from lightning_fms.weights.graph import TOPOLOGY_CACHE
from lightning_fms.weights.schema import GraphOptions, NodeType
from lightning_fms.weights.topology import SymmetryInfo

T = TypeVar("T", nn.Module, Mapping[str, Tensor])


class PermutationPlan:
    """The neuron permutation group of one architecture, ready to sample from.

    Args:
        sym: The symmetry description of a traced topology.
    """

    def __init__(self, sym: SymmetryInfo) -> None:
        self.sym = sym
        n = len(sym.set_sizes)
        parent = list(range(n))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        frozen = set(sym.frozen)
        for segs, sid in sym.ties:
            if len(segs) == 1 and segs[0][1] == 0 and segs[0][2] == sym.set_sizes[segs[0][0]] == sym.set_sizes[sid]:
                a, b = find(segs[0][0]), find(sid)
                if a != b:
                    parent[a] = b
            else:
                frozen.add(sid)
                frozen.update(s for s, _, _ in segs)
        for _, _, segs, _, _, _ in sym.param_axes:
            for s, lo, hi in segs:
                if lo != 0 or hi != sym.set_sizes[s]:
                    frozen.add(s)
        for i, t in enumerate(sym.set_types):
            if t == NodeType.INPUT:
                frozen.add(i)
        self.root = [find(i) for i in range(n)]
        members: dict[int, list[int]] = {}
        for i, r in enumerate(self.root):
            members.setdefault(r, []).append(i)
        frozen_roots = {self.root[i] for i in frozen}
        self.attention: list[tuple[int, int, int, int]] = []
        structured: set[int] = set()
        for qs, ks, vs, heads in sym.attention:
            rq, rv = self.root[qs], self.root[vs]
            ok = (
                rq not in frozen_roots
                and rv not in frozen_roots
                and sorted(members[rq]) == sorted((qs, ks))
                and members[rv] == [vs]
            )
            structured.update((rq, rv))
            if ok:
                self.attention.append((rq, rv, sym.set_sizes[qs], heads))
        self.free = [
            r
            for r in members
            if r not in frozen_roots and r not in structured and sym.set_types[r] != NodeType.ATTN_HEAD
        ]

    @property
    def num_permutable(self) -> int:
        """How many independent neuron groups are permuted."""
        return len(self.free) + len(self.attention)

    def sample(self, generator: torch.Generator | None = None) -> dict[int, Tensor]:
        """Draw a permutation: class root -> index vector (new position ``i`` takes old unit ``p[i]``)."""
        perms: dict[int, Tensor] = {}
        for r in self.free:
            perms[r] = torch.randperm(self.sym.set_sizes[r], generator=generator)
        for rq, rv, e, heads in self.attention:
            hd = e // heads
            order = torch.randperm(heads, generator=generator)
            qk = [order[j] * hd + torch.randperm(hd, generator=generator) for j in range(heads)]
            vv = [order[j] * hd + torch.randperm(hd, generator=generator) for j in range(heads)]
            perms[rq] = torch.cat(qk)
            perms[rv] = torch.cat(vv)
        return perms

    def apply(self, tensors: Mapping[str, Tensor], perms: dict[int, Tensor]) -> dict[str, Tensor]:
        """Permute tensors (returns a new dict; tensors not touched are shared)."""
        out = dict(tensors)
        sym = self.sym
        for name, axis, segs, layout, k, rows in sym.param_axes:
            if name not in out or not any(self.root[s] in perms for s, _, _ in segs):
                continue
            parts, offset = [], 0
            for s, lo, hi in segs:
                p = perms.get(self.root[s])
                local = p[lo:hi] - lo if p is not None else torch.arange(hi - lo)
                parts.append(local + offset)
                offset += hi - lo
            idx = torch.cat(parts)
            if k > 1:
                ar = torch.arange(k)
                if layout == "minor":
                    idx = (ar.unsqueeze(1) * offset + idx.unsqueeze(0)).reshape(-1)
                else:
                    idx = (idx.unsqueeze(1) * k + ar.unsqueeze(0)).reshape(-1)
            t = out[name]
            idx = idx.to(t.device)
            if rows is None:
                out[name] = t.index_select(axis, idx)
            else:
                ax2, start, stop = rows
                t = t.clone()
                block = t.narrow(ax2, start, stop - start)
                block.copy_(block.index_select(axis, idx))
                out[name] = t
        return out


def plan_for(module: nn.Module) -> PermutationPlan | None:
    """The permutation plan of ``module``'s architecture (``None`` when it falls back to statistics)."""
    topo = TOPOLOGY_CACHE.get(module, GraphOptions())
    if topo.fallback or topo.symmetry is None:
        return None
    plan = getattr(topo, "_permutation_plan", None)
    if plan is None:
        plan = PermutationPlan(topo.symmetry)
        topo._permutation_plan = plan  # type: ignore[attr-defined]
    return plan


def _chain_plan(state: Mapping[str, Tensor]) -> PermutationPlan:
    """Plan for a bare state dict of a plain chain ``[w1, (b1), w2, (b2), ...]`` (MLP/CNN, optional flatten)."""
    names = list(state)
    layers: list[tuple[str, str | None]] = []
    i = 0
    while i < len(names):
        w = state[names[i]]
        if w.dim() < 2:
            raise FMSError(f"cannot infer the layers of a bare state dict at {names[i]!r}; pass module=")
        b = None
        if i + 1 < len(names) and state[names[i + 1]].dim() == 1 and state[names[i + 1]].numel() == w.shape[0]:
            b = names[i + 1]
            i += 1
        layers.append((names[i - (1 if b else 0)], b))
        i += 1
    sym = SymmetryInfo()
    sizes = [state[w].shape[0] for w, _ in layers]
    sym.set_sizes = sizes
    sym.set_types = [int(NodeType.LINEAR)] * len(sizes)
    sym.set_starts = [0] * len(sizes)
    sym.frozen = {len(sizes) - 1}
    for j, (w, b) in enumerate(layers):
        seg = ((j, 0, sizes[j]),)
        sym.param_axes.append((w, 0, seg, None, 1, None))
        if b is not None:
            sym.param_axes.append((b, 0, seg, None, 1, None))
        if j > 0:
            n_in = state[w].shape[1]
            if n_in % sizes[j - 1]:
                raise FMSError(f"{w!r} reads {n_in} features after a layer of {sizes[j - 1]} units")
            k = n_in // sizes[j - 1]
            sym.param_axes.append((w, 1, ((j - 1, 0, sizes[j - 1]),), "major" if k > 1 else None, k, None))
    return PermutationPlan(sym)


def permute_hidden_units(
    module_or_state: T,
    generator: torch.Generator | None = None,
    *,
    module: nn.Module | None = None,
) -> T:
    """Apply a random permutation of hidden neurons/channels that leaves the network function unchanged.

    Args:
        module_or_state: A module (a permuted deep copy is returned) or a state dict (a permuted dict is returned).
        generator: Random generator (default: the global one).
        module: For a state dict, a module of its architecture to read the structure from. Without it the state
            dict must be a plain chain ``[w1, b1, w2, b2, ...]`` of Linear/Conv layers (flattening allowed).

    Returns:
        The permuted module or state dict. Architectures that fall back to statistics are returned unchanged.
    """
    if isinstance(module_or_state, nn.Module):
        plan = plan_for(module_or_state)
        clone = copy.deepcopy(module_or_state)
        if plan is None:
            return clone
        state = clone.state_dict()
        new = plan.apply(state, plan.sample(generator))
        clone.load_state_dict(new)
        return clone
    state = dict(module_or_state)
    plan = plan_for(module) if module is not None else _chain_plan(state)
    if plan is None:
        return state  # type: ignore[return-value]
    return plan.apply(state, plan.sample(generator))  # type: ignore[return-value]
