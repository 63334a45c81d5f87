"""How far the frozen-layer memory estimate (lightning_fms.frozen.memory) is from the real peak of a training step.

For zoo networks wrapped in :class:`~lightning_fms.zoo.ImageClassifier` (SGD with momentum, as the tuner's trials
train; one model also with Adam), at trainable fractions 0.25, 0.5 and 1, the script

* estimates an epoch's device memory with :func:`~lightning_fms.frozen.memory.epoch_memory` (what GPU packing
  sizes an epoch's share with), and
* measures the peak of live tensor memory during one real training step (``zero_grad``, forward, backward,
  optimizer step; after one warm-up step, so the optimizer state exists) with ``torch.profiler``'s memory
  timeline on the CPU (``profile_memory=True``; the timeline is read through the profiler's private
  ``_memory_profile()``, which also sorts each tensor into parameters, gradients, optimizer state, inputs,
  activations, autograd detail and temporaries).

On a GPU the CUDA context (a few hundred MB per process), cuBLAS/cuDNN workspaces and the caching allocator's
rounding come on top of the measured peak; none of them can be measured on this CPU machine.

    python recipes/bench_memory_estimate.py            # about 20 s
    python recipes/bench_memory_estimate.py --json out.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import warnings
from collections import defaultdict
from typing import Any

import torch

MODELS: dict[str, dict[str, Any]] = {
    "mlp": {"class_path": "lightning_fms.zoo.MLP", "args": {"hidden": 64}, "image": 8, "batch": 64},
    "cnn": {"class_path": "lightning_fms.zoo.SmallCNN", "args": {"width": 16}, "image": 8, "batch": 64},
    "resnet-m": {"class_path": "lightning_fms.zoo.TinyResNet", "args": {"width": 16}, "image": 8, "batch": 128},
    "resnet-l": {
        "class_path": "lightning_fms.zoo.TinyResNet",
        "args": {"width": 32, "blocks_per_stage": 2},
        "image": 16,
        "batch": 128,
    },
    "resnet-l/adam": {
        "class_path": "lightning_fms.zoo.TinyResNet",
        "args": {"width": 32, "blocks_per_stage": 2},
        "image": 16,
        "batch": 128,
        "adam": True,
    },
    "vit-s": {
        "class_path": "lightning_fms.zoo.TinyViT",
        "args": {"patch_size": 4, "dim": 32, "depth": 2, "heads": 4},
        "image": 8,
        "batch": 128,
    },
    "vit-l": {
        "class_path": "lightning_fms.zoo.TinyViT",
        "args": {"patch_size": 2, "dim": 96, "depth": 6, "heads": 4},
        "image": 16,
        "batch": 64,
    },
}
"""Name -> network, input side, batch size (and ``adam``: Adam instead of SGD with momentum)."""
FRACTIONS = (0.25, 0.5, 1.0)
MB = 2**20


def _module(spec: dict[str, Any]) -> torch.nn.Module:
    from lightning_fms.zoo import ImageClassifier

    module_name, _, name = spec["class_path"].rpartition(".")
    net = getattr(importlib.import_module(module_name), name)(image_size=spec["image"], num_classes=10, **spec["args"])
    module = ImageClassifier(net, lr=0.01, momentum=0.9, num_classes=10)
    if spec.get("adam"):
        module.configure_optimizers = lambda: torch.optim.Adam(module.parameters(), lr=1e-3)  # type: ignore[method-assign]
    return module


def measured_peak(module: torch.nn.Module, batch: Any, fraction: float) -> tuple[int, dict[str, int]]:
    """Peak live bytes of one training step at ``fraction`` and what they were at the peak, by category."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    from lightning_fms.frozen.levels import units_for_fraction
    from lightning_fms.frozen.memory import _first_optimizer
    from lightning_fms.frozen.units import layer_units, set_trainable_units

    set_trainable_units(module.net, units_for_fraction(fraction, len(layer_units(module.net))))
    optimizer = _first_optimizer(module.configure_optimizers())

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        module.training_step(batch, 0).backward()
        optimizer.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step()  # the optimizer state exists from here on, as in every later step
        activities = [ProfilerActivity.CPU]
        with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
            step()
    memory = prof._memory_profile()
    categories = memory._categories
    live: dict[str, int] = defaultdict(int)
    peak, at_peak = 0, {}
    for _, action, (key, version), size in memory.timeline:
        category = categories.get(key, version)
        name = category.name.lower() if category is not None else "unknown"
        if action in (Action.PREEXISTING, Action.CREATE):
            live[name] += size
        elif action == Action.DESTROY:
            live[name] -= size
        elif action == Action.INCREMENT_VERSION:
            before = categories.get(key, version - 1)
            live[before.name.lower() if before is not None else "unknown"] -= size
            live[name] += size
        total = sum(live.values())
        if total > peak:
            peak, at_peak = total, {k: v for k, v in live.items() if v}
    return peak, at_peak


def run(name: str) -> list[dict[str, Any]]:
    from lightning_fms.frozen.memory import epoch_memory

    spec = MODELS[name]
    torch.manual_seed(0)
    batch = (torch.rand(spec["batch"], 1, spec["image"], spec["image"]), torch.randint(0, 10, (spec["batch"],)))
    rows = []
    for fraction in FRACTIONS:
        torch.manual_seed(0)
        module = _module(spec)
        (estimate,) = epoch_memory(module, module.net, batch, [fraction])
        peak, parts = measured_peak(module, batch, estimate.fraction)
        rows.append(
            {
                "model": name,
                "fraction": estimate.fraction,
                "estimate_mb": estimate.total / MB,
                "params_mb": estimate.parameters / MB,
                "grads_mb": estimate.gradients / MB,
                "state_mb": estimate.optimizer_state / MB,
                "inputs_mb": estimate.inputs / MB,
                "activations_mb": estimate.activations / MB,
                "workspace_mb": estimate.workspace / MB,
                "peak_mb": peak / MB,
                "ratio": estimate.total / peak,
                "peak_parts_mb": {k: v / MB for k, v in sorted(parts.items())},
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | fraction | estimate MB (params + grads + state + batch + saved activations + workspace) | "
        "measured peak MB | "
        "estimate / peak | at the peak: activations + autograd detail + temporaries MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        parts = r["peak_parts_mb"]
        transient = sum(parts.get(k, 0.0) for k in ("activation", "autograd_detail", "temporary", "unknown"))
        lines.append(
            f"| {r['model']} | {r['fraction']:g} | {r['estimate_mb']:.2f} ({r['params_mb']:.2f} + {r['grads_mb']:.2f}"
            f" + {r['state_mb']:.2f} + {r['inputs_mb']:.2f} + {r['activations_mb']:.2f} + {r['workspace_mb']:.2f}) | "
            f"{r['peak_mb']:.2f} | "
            f"{r['ratio']:.2f} | {transient:.2f} |"
        )
    ratios = [r["ratio"] for r in rows]
    lines.append("")
    lines.append(
        f"estimate / peak over {len(rows)} cases: median {statistics.median(ratios):.2f}, "
        f"min {min(ratios):.2f}, max {max(ratios):.2f}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [row for name in args.models for row in run(name)]
    print(table(rows))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)


if __name__ == "__main__":
    main()
