"""A reusable contract test suite for featurizers (:class:`~lightning_fms.weights.Featurizer`).

Subclass :class:`FeaturizerContract` in a pytest module, name the subclass ``Test...`` and implement
:meth:`~FeaturizerContract.make_featurizer`; pytest then runs every ``test_*`` method of the contract for it::

    from lightning_fms.testing.featurizers import FeaturizerContract
    from lightning_fms.weights import build_featurizer


    class TestMyFeaturizer(FeaturizerContract):
        def make_featurizer(self):
            return build_featurizer("gmn", embedding_dim=8, trainable="readout")

The contract, checked in float64 on :meth:`~FeaturizerContract.make_modules` (by default tiny networks of five
architectures from :mod:`lightning_fms.testing.networks`):

* **Neuron permutations**: permuting hidden units with :func:`~lightning_fms.weights.permute_hidden_units` (the
  network computes the same function) leaves the embedding unchanged, or (``permutation_invariant = False``)
  changes it.
* **Batching**: embedding a batch equals embedding each module alone, in any order.
* **State round trip**: the state dict survives ``torch.save`` / ``torch.load(weights_only=True)``, and a new
  featurizer (another seed) that loads it embeds identically, whatever order it then sees the architectures in.
  (A featurizer without parameters, such as ``"summary"``, has an empty state and embeds alike from any seed.)
* **References**: given each module's starting weights (``references``), the embedding still equals one by one,
  and permuting a module and its reference alike keeps it (if :attr:`permutation_invariant`).
"""

from __future__ import annotations

import copy
import io

import torch
from torch import Tensor, nn

from lightning_fms.testing.networks import mixed_architectures, tiny_mlp
from lightning_fms.weights import Featurizer, permute_hidden_units

__all__ = ["FeaturizerContract", "contract_networks"]


def contract_networks() -> list[nn.Module]:
    """The default modules of the contract: :func:`mixed_architectures` and an MLP of other hidden widths.

    Returns:
        Five small modules (float32, random weights from the global generator).
    """
    return [*mixed_architectures(), tiny_mlp((3, 9, 4, 2))]


class FeaturizerContract:
    """The behaviour every featurizer promises; subclass it as ``Test...`` and implement :meth:`make_featurizer`.

    Attributes:
        permutation_invariant: Whether embeddings ignore neuron permutations (``False`` for featurizers that read
            the weights in storage order, such as FLAT; the contract then checks the embedding does change).
        permutation_seeds: Seeds of the permutations tried per module.
        atol: Absolute tolerance of every comparison (featurizer and modules in float64).
    """

    permutation_invariant: bool = True
    permutation_seeds: tuple[int, ...] = (0, 1, 5)  # seed 5 swaps the attention heads of the default transformer
    atol: float = 1e-6

    def make_featurizer(self) -> Featurizer:
        """A new featurizer under test, initialised from the global random generator (the contract seeds it)."""
        raise NotImplementedError("subclasses of FeaturizerContract implement make_featurizer()")

    def make_modules(self) -> list[nn.Module]:
        """The modules to embed (the contract seeds the generator first and converts them to float64)."""
        return contract_networks()

    # ------------------------------------------------------------------------------------------- helpers

    def featurizer(self, seed: int = 0) -> Featurizer:
        """:meth:`make_featurizer` under ``torch.manual_seed(seed)``, in float64 and evaluation mode."""
        torch.manual_seed(seed)
        return self.make_featurizer().double().eval()

    def modules(self) -> list[nn.Module]:
        """:meth:`make_modules` under a fixed seed, in float64 and evaluation mode."""
        torch.manual_seed(12345)
        return [m.double().eval() for m in self.make_modules()]

    def assert_close(self, actual: Tensor, expected: Tensor, what: str) -> None:
        """Assert equal shapes and values within :attr:`atol`, naming ``what`` differs."""
        assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        gap = (actual - expected).abs().max().item() if actual.numel() else 0.0
        assert gap <= self.atol, f"{what}: embeddings differ by {gap:.3g} (atol {self.atol:g})"

    # --------------------------------------------------------------------------------------------- tests

    def test_neuron_permutations(self) -> None:
        """Permuting hidden units keeps the embedding (or, if not :attr:`permutation_invariant`, changes it)."""
        f = self.featurizer()
        modules = self.modules()
        base = f(modules)
        assert base.shape == (len(modules), f.embedding_dim) and torch.isfinite(base).all()
        for seed in self.permutation_seeds:
            permuted = [permute_hidden_units(m, torch.Generator().manual_seed(seed)) for m in modules]
            for m, p in zip(modules, permuted):  # the permutation is not the identity
                assert any(not torch.equal(a, b) for a, b in zip(m.state_dict().values(), p.state_dict().values()))
            out = f(permuted)
            if self.permutation_invariant:
                self.assert_close(out, base, f"permutation seed {seed}")
            else:
                gaps = (out - base).abs().amax(1)
                assert (gaps > self.atol).all(), f"permutation seed {seed}: some embeddings ignore the permutation"

    def test_batch_equals_one_by_one(self) -> None:
        """Each row of a batch is the module's own embedding, whatever else is in the batch and in what order."""
        f = self.featurizer()
        modules = self.modules()
        together = f(modules)
        alone = torch.cat([f([m]) for m in modules[::-1]]).flip(0)
        self.assert_close(alone, together, "one by one vs in a batch")
        self.assert_close(f(modules[::-1]).flip(0), together, "reversed batch")
        assert f([]).shape == (0, f.embedding_dim)

    def references(self, modules: list[nn.Module]) -> list[nn.Module]:
        """A reference (``W_0``) per module: a copy of the same architecture with perturbed weights."""
        g = torch.Generator().manual_seed(777)
        refs = []
        for m in modules:
            ref = copy.deepcopy(m)
            with torch.no_grad():
                for p in ref.parameters():
                    p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            refs.append(ref)
        return refs

    def test_references_follow_their_modules(self) -> None:
        """With references, rows are still per module, and permuting a module with its reference keeps its row."""
        f = self.featurizer()
        modules = self.modules()
        refs = self.references(modules)
        together = f(modules, references=refs)
        assert together.shape == (len(modules), f.embedding_dim) and torch.isfinite(together).all()
        alone = torch.cat([f([m], references=[r]) for m, r in zip(modules[::-1], refs[::-1])]).flip(0)
        self.assert_close(alone, together, "with references, one by one vs in a batch")
        if not self.permutation_invariant:
            return
        seed = self.permutation_seeds[0]
        permuted = [permute_hidden_units(m, torch.Generator().manual_seed(seed)) for m in modules]
        permuted_refs = [permute_hidden_units(r, torch.Generator().manual_seed(seed)) for r in refs]
        self.assert_close(f(permuted, references=permuted_refs), together, "module and reference permuted alike")

    def test_state_dict_round_trip(self) -> None:
        """A new featurizer loading the (``weights_only``-saved) state embeds identically."""
        f = self.featurizer(seed=0)
        modules = self.modules()
        out = f(modules)  # parts built lazily per architecture now exist and are part of the state
        buffer = io.BytesIO()
        torch.save(f.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        if any(True for _ in f.parameters()):  # a featurizer without parameters has no seed to tell apart
            other = self.featurizer(seed=1)(modules)
            gap = (other - out).abs().max()
            assert gap > self.atol, "another seed embeds identically: the test would prove nothing"
        fresh = self.featurizer(seed=1)
        fresh.load_state_dict(state)
        self.assert_close(fresh(modules[::-1]).flip(0), out, "loaded state, architectures in reverse order")
        self.assert_close(fresh(modules), out, "loaded state")
