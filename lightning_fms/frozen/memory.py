"""The device memory of one training epoch at a trainable fraction (what a frozen-layer epoch needs of a GPU).

With the last ``k`` layer units trainable (:func:`lightning_fms.frozen.units.set_trainable_units`), an epoch holds
on its device:

* **parameters**: every parameter and buffer of the module, frozen ones too (the forward pass reads them);
* **gradients**: one tensor the size of each trainable parameter;
* **optimizer state**: ``slots`` tensors the size of each trainable parameter (SGD with momentum 1, Adam and
  AdamW 2, :func:`optimizer_slots`); PyTorch's optimizers create no state for a parameter whose ``.grad`` is
  ``None``, so frozen parameters get none;
* **inputs**: the batch;
* **activations**: what autograd keeps from one training step's forward for its backward. It is counted, not
  modelled: the module's training step runs once on one real batch under
  :func:`torch.autograd.graph.saved_tensors_hooks`, and each saved storage that is not a parameter, a buffer or
  the batch is counted once. The frozen prefix records no graph, so at low fractions only the trainable suffix
  (and the tensor entering it) is kept;
* **workspace**: the largest input plus output of one module call in that forward pass (counted with forward
  hooks). It stands for what lives besides the saved activations: in the forward pass a frozen layer's input and
  output (freed right after, but there at once), in the backward pass the gradients in flight, which have the
  sizes of the activations.

Left out: the CUDA context (a few hundred MB per process), the caching allocator's rounding, cuBLAS/cuDNN
workspaces, and temporaries inside one module call (attention scores computed by a function, not a module).
``docs/benchmarks.md`` ("Ray (issue 13)") compares the estimate with the peak that ``torch.profiler`` measures.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_fms.errors import FMSError
from lightning_fms.frozen.levels import units_for_fraction
from lightning_fms.frozen.units import layer_units, set_trainable_units

__all__ = [
    "DEFAULT_OPTIMIZER_SLOTS",
    "MemoryEstimate",
    "batch_bytes",
    "epoch_memory",
    "module_optimizer_slots",
    "optimizer_slots",
    "resize_batch",
    "saved_activation_bytes",
]

log = logging.getLogger(__name__)

DEFAULT_OPTIMIZER_SLOTS = 2.0
"""State tensors per trainable parameter assumed when the optimizer is unknown (Adam's two moments)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training epoch keeps on its device at one trainable fraction.

    Attributes:
        fraction: The trainable fraction (``1.0``: every layer unit trains).
        parameters: Every parameter and buffer of the module.
        gradients: The gradients of the trainable parameters.
        optimizer_state: The optimizer's state of the trainable parameters.
        inputs: One batch.
        activations: What autograd saves for the backward pass of one training step.
        workspace: The largest input plus output of one module call in the forward pass.
    """

    fraction: float
    parameters: int
    gradients: int
    optimizer_state: int
    inputs: int
    activations: int
    workspace: int

    @property
    def total(self) -> int:
        """Bytes in all."""
        return self.parameters + self.gradients + self.optimizer_state + self.inputs + self.activations + self.workspace


def optimizer_slots(optimizer: torch.optim.Optimizer) -> float:
    """State tensors the optimizer keeps per trainable parameter, each the parameter's size.

    SGD: 1 with momentum, else 0; Adam, AdamW, NAdam, RAdam, Adamax: 2 (3 with ``amsgrad``); RMSprop: 1, plus 1
    with momentum and 1 when centered; Adagrad: 1; Adadelta: 2; anything else :data:`DEFAULT_OPTIMIZER_SLOTS`.
    Scalars such as Adam's step count are left out. With several parameter groups, the largest count.
    """
    counts = []
    for group in optimizer.param_groups:
        if isinstance(optimizer, torch.optim.SGD):
            counts.append(1.0 if group.get("momentum", 0.0) else 0.0)
        elif isinstance(
            optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adamax)
        ):
            counts.append(3.0 if group.get("amsgrad", False) else 2.0)
        elif isinstance(optimizer, torch.optim.RMSprop):
            counts.append(1.0 + bool(group.get("momentum", 0.0)) + bool(group.get("centered", False)))
        elif isinstance(optimizer, torch.optim.Adagrad):
            counts.append(1.0)
        elif isinstance(optimizer, torch.optim.Adadelta):
            counts.append(2.0)
        else:
            counts.append(DEFAULT_OPTIMIZER_SLOTS)
    return max(counts, default=DEFAULT_OPTIMIZER_SLOTS)


def _first_optimizer(configured: Any) -> torch.optim.Optimizer | None:
    """The first optimizer in what ``configure_optimizers`` returned (any of Lightning's forms)."""
    if isinstance(configured, torch.optim.Optimizer):
        return configured
    if isinstance(configured, Mapping):
        return _first_optimizer(configured.get("optimizer"))
    if isinstance(configured, (list, tuple)):
        for item in configured:
            found = _first_optimizer(item)
            if found is not None:
                return found
    return None


def module_optimizer_slots(module: nn.Module) -> float:
    """:func:`optimizer_slots` of the optimizer the module's ``configure_optimizers`` builds.

    A module without one, or whose ``configure_optimizers`` needs a Trainer, gets :data:`DEFAULT_OPTIMIZER_SLOTS`.
    """
    configure = getattr(module, "configure_optimizers", None)
    if not callable(configure):
        return DEFAULT_OPTIMIZER_SLOTS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimizer = _first_optimizer(configure())
    except Exception as error:  # noqa: BLE001 - e.g. a schedule that reads self.trainer
        log.debug("configure_optimizers failed outside a Trainer (%s); assuming %g slots", error, 2.0)
        return DEFAULT_OPTIMIZER_SLOTS
    return optimizer_slots(optimizer) if optimizer is not None else DEFAULT_OPTIMIZER_SLOTS


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _storage(tensor: torch.Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def batch_bytes(batch: Any) -> int:
    """Bytes of the tensors in a batch (nested tuples, lists and mappings), each storage once."""
    return sum(dict(_storage(t) for t in _tensors(batch)).values())


def resize_batch(batch: Any, size: int) -> Any:
    """``batch`` with ``size`` rows: every tensor with rows cut or repeated along its first dimension.

    Raises:
        FMSError: ``size`` is not a positive integer.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise FMSError(f"a batch size must be a positive integer, got {size!r}")
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0 or batch.shape[0] == 0:
            return batch
        repeats = -(-size // batch.shape[0])
        return batch.repeat(repeats, *([1] * (batch.dim() - 1)))[:size].contiguous()
    if isinstance(batch, Mapping):
        return type(batch)({k: resize_batch(v, size) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(resize_batch(v, size) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(resize_batch(v, size) for v in batch)
    return batch


def saved_activation_bytes(
    forward: Callable[[], Any], exclude: set[int] | None = None, modules: Sequence[nn.Module] = ()
) -> tuple[int, int]:
    """Bytes autograd saves for the backward pass while ``forward`` runs, and the largest module call's in + out.

    The graph is dropped, not run.

    Args:
        forward: Runs a forward pass (e.g. a training step without its backward).
        exclude: Storage addresses not to count as saved (parameters, buffers, the batch: counted elsewhere).
        modules: The modules whose calls are measured for the second number (forward hooks).

    Returns:
        ``(saved, workspace)``: the bytes of every distinct storage saved for backward, less ``exclude``; and the
        most bytes of distinct storages that one call of one of ``modules`` took in and gave out.
    """
    skip = set(exclude or ())
    saved: dict[int, int] = {}
    largest = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        address, nbytes = _storage(tensor)
        if address not in skip:
            saved[address] = max(saved.get(address, 0), nbytes)
        return tensor

    def measure(module: nn.Module, inputs: Any, output: Any) -> None:
        largest[0] = max(largest[0], sum(dict(_storage(t) for t in _tensors(inputs) + _tensors(output)).values()))

    hooks = [m.register_forward_hook(measure) for m in modules]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = forward()
        del out
    finally:
        for hook in hooks:
            hook.remove()
    return sum(saved.values()), largest[0]


def _loss_step(module: nn.Module, batch: Any, step: Callable[[Any], Any] | None) -> Callable[[], Any]:
    def run() -> Any:
        return step(batch) if step is not None else module.training_step(batch, 0)  # type: ignore[operator]

    return run


def epoch_memory(
    module: nn.Module,
    net: nn.Module,
    batch: Any,
    fractions: Sequence[float],
    *,
    step: Callable[[Any], Any] | None = None,
    slots: float | None = None,
) -> tuple[MemoryEstimate, ...]:
    """The memory estimate of a training epoch at each trainable fraction (see the module docstring).

    ``module`` is left as it was (``requires_grad`` and training mode restored).

    Args:
        module: The LightningModule (or any module) whose ``training_step(batch, 0)`` runs one forward pass;
            ``step`` replaces it.
        net: The part of ``module`` split into layer units (e.g. the hub network); the rest always trains.
        batch: One training batch, on the device the estimate is for.
        fractions: Trainable fractions in ``(0, 1]``.
        step: ``step(batch)`` to run instead of ``module.training_step``.
        slots: Optimizer state tensors per trainable parameter (default: :func:`module_optimizer_slots`).

    Returns:
        One :class:`MemoryEstimate` per fraction, in the order given.

    Raises:
        FMSError: ``net`` has no parameters to split into layer units.
    """
    n_units = len(layer_units(net))
    if n_units == 0:
        raise FMSError(f"{type(net).__name__} has no parameters to split into layer units")
    slots = module_optimizer_slots(module) if slots is None else float(slots)
    tensors = [*module.parameters(), *module.buffers()]
    stored = dict(_storage(t) for t in tensors)
    inputs = dict(_storage(t) for t in _tensors(batch))
    exclude = set(stored) | set(inputs)
    was_training = module.training
    saved_grad = {name: p.requires_grad for name, p in module.named_parameters()}
    measured: dict[int, tuple[int, int, int]] = {}
    try:
        module.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log outside a Trainer warns
            for k in sorted({units_for_fraction(f, n_units) for f in fractions}):
                set_trainable_units(net, k)
                trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
                run = _loss_step(module, batch, step)
                saved, workspace = saved_activation_bytes(run, exclude, list(module.modules()))
                measured[k] = (trainable, saved, workspace)
    finally:
        for name, p in module.named_parameters():
            p.requires_grad_(saved_grad[name])
        module.train(was_training)
    out = []
    for fraction in fractions:
        trainable, activations, workspace = measured[units_for_fraction(fraction, n_units)]
        out.append(
            MemoryEstimate(
                fraction=float(fraction),
                parameters=sum(stored.values()),
                gradients=trainable,
                optimizer_state=int(round(slots * trainable)),
                inputs=sum(inputs.values()),
                activations=activations,
                workspace=workspace,
            )
        )
    return tuple(out)
