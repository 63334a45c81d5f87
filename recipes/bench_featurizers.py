"""Benchmark the checkpoint featurizers: time and peak memory to embed networks.

Usage::

    python recipes/bench_featurizers.py                 # everything, markdown table on stdout
    python recipes/bench_featurizers.py --only resnet18 --repeats 5

Scenarios (each runs in a fresh subprocess, so peak memory is per scenario):

* ``resnet18``: a ResNet-18-shaped network (11.7 M parameters, 1.9 M channel-pair edges) with the GMN under
  ``torch.no_grad()``: *cold* (first call: tracing, topology, values, forward), *new checkpoint* (a second
  checkpoint of the same architecture: values re-read, forward) and *cached* (same key: forward only).
* ``batch100``: 100 checkpoints of one small MLP in one call, with gradients (a surrogate training step:
  forward + backward), *cold* (first call with keys) and *warm* (cached by keys); the same for every featurizer.
* ``small``: each of a few small networks alone, warm, forward + backward, for every featurizer that supports it.

Times are the best and the median of ``--repeats`` calls (the best is the robust estimate on a shared machine;
cold is a single call). Memory is the peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) of
the scenario's process minus its value right before the first embedding (after imports and model construction);
``tracemalloc`` would not see PyTorch's tensor allocations.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_fms.errors import FMSError  # noqa: E402
from lightning_fms.weights import build_featurizer  # noqa: E402
from lightning_fms.weights.registry import FEATURIZERS  # noqa: E402

# ------------------------------------------------------------------------------------------------------ networks


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """ResNet-18 shape: 7x7 stem, 4 stages of 2 basic blocks with 64-128-256-512 channels, 1000-way head."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, cin = [], 64
        for i, c in enumerate((64, 128, 256, 512)):
            stages.append(nn.Sequential(BasicBlock(cin, c, 1 if i == 0 else 2), BasicBlock(c, c)))
            cin = c
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def small_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip  # the Small CNN Zoo shape (4,970 parameters)


class SmallResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 32, 2))
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


class SmallTransformer(nn.Module):
    def __init__(self, d: int = 64, vocab: int = 100, length: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(1, length, d))
        layer = nn.TransformerEncoderLayer(d, 4, 128, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.emb(ids) + self.pos[:, : ids.shape[1]]).mean(1))


SMALL: dict[str, Callable[[], nn.Module]] = {
    "MLP 64-64-64-10": small_mlp,
    "CNN (Small CNN Zoo)": small_cnn,
    "ResNet (2 blocks, BN)": SmallResNet,
    "Transformer (2 layers, d=64)": SmallTransformer,
}

# -------------------------------------------------------------------------------------------------- measurement


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Best and median wall time of ``repeats`` calls (the best is robust to other load on a shared machine)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def run_resnet18(repeats: int) -> list[dict]:
    torch.manual_seed(0)
    a, b = ResNet18(), ResNet18()
    f = build_featurizer("gmn")
    rows = []
    base = peak_rss_mb()
    with torch.no_grad():
        t = time.perf_counter()
        f([a], keys=["a"])
        cold = time.perf_counter() - t
        g = f.graph_inputs([a], keys=["a"])
        extra = f"{g[0].num_nodes:,} nodes, {g[0].num_edges:,} edges"
        rows.append(dict(case="(a) ResNet-18, GMN, no grad", detail=f"cold: first call ({extra})", seconds=cold))
        case = "(a) ResNet-18, GMN, no grad"
        new, new_med = timed(lambda: f([b]), repeats)
        rows.append(dict(case=case, detail="new checkpoint of a known architecture", seconds=new, median=new_med))
        cached, cached_med = timed(lambda: f([a], keys=["a"]), repeats)
        rows.append(dict(case=case, detail="cached by key", seconds=cached, median=cached_med))
    peak = peak_rss_mb() - base
    for r in rows:
        r["params"] = params(a)
        r["peak_mb"] = peak
    return rows


def run_batch100(repeats: int) -> list[dict]:
    rows = []
    variants = [*((name, {}) for name in FEATURIZERS), ("gmn", {"trainable": "readout"})]
    for name, options in variants:
        torch.manual_seed(0)
        modules = [small_mlp() for _ in range(100)]
        keys = [("trial", i) for i in range(100)]
        f = build_featurizer(name, **options)
        f.train()
        base = peak_rss_mb()

        def step(f=f, modules=modules, keys=keys) -> None:  # noqa: ANN001
            out = f(modules, keys)
            out.square().mean().backward()

        t = time.perf_counter()
        step()
        cold = time.perf_counter() - t
        warm, warm_med = timed(step, repeats)
        peak = peak_rss_mb() - base
        label = name + "".join(f" {k}={v}" for k, v in options.items())
        case = f"(b) 100 x MLP 64-64-64-10, {label}, fwd+bwd"
        rows.append(dict(case=case, detail="cold: first call", seconds=cold, params=params(modules[0]), peak_mb=peak))
        rows.append(
            dict(
                case=case,
                detail="warm: cached by keys",
                seconds=warm,
                median=warm_med,
                params=params(modules[0]),
                peak_mb=peak,
            )
        )
    return rows


def run_small(repeats: int) -> list[dict]:
    rows = []
    for net, make in SMALL.items():
        for name in FEATURIZERS:
            torch.manual_seed(0)
            m = make()
            f = build_featurizer(name)
            base = peak_rss_mb()
            try:
                f([m]).sum().backward()  # cold call builds everything

                def step(f=f, m=m) -> None:  # noqa: ANN001
                    f([m]).sum().backward()

                warm, warm_med = timed(step, repeats)
            except FMSError as exc:
                rows.append(dict(case=f"(c) {net}", detail=f"{name}: n/a ({str(exc)[:60]}...)", seconds=None))
                continue
            extra = ""
            if name == "gmn":
                g = f.graph_inputs([m])[0]
                extra = f" ({g.num_nodes} nodes, {g.num_edges} edges)"
            rows.append(
                dict(
                    case=f"(c) {net}",
                    detail=f"{name}: warm, new values, fwd+bwd{extra}",
                    seconds=warm,
                    median=warm_med,
                    params=params(m),
                    peak_mb=peak_rss_mb() - base,
                )
            )
    return rows


SCENARIOS = {"resnet18": run_resnet18, "batch100": run_batch100, "small": run_small}


def table(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| case | params | measurement | time: best (median) | peak RSS delta |",
        "|---|---:|---|---:|---:|",
    ]
    for r in rows:
        sec = "n/a" if r.get("seconds") is None else f"{1000 * r['seconds']:.1f} ms"
        if r.get("median") is not None:
            sec += f" ({1000 * r['median']:.0f})"
        mem = "" if r.get("peak_mb") is None else f"{r['peak_mb']:.0f} MiB"
        p = f"{r['params']:,}" if r.get("params") else ""
        lines.append(f"| {r['case']} | {p} | {r['detail']} | {sec} | {mem} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=sorted(SCENARIOS), action="append", help="run only these scenarios")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (best and median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--scenario", help=argparse.SUPPRESS)  # internal: run one scenario, print JSON
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.scenario:
        print(json.dumps(SCENARIOS[args.scenario](args.repeats)))
        return
    rows: list[dict] = []
    load_before = os.getloadavg()[0]
    for name in args.only or list(SCENARIOS):
        cmd = [sys.executable, __file__, "--scenario", name, "--repeats", str(args.repeats)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows += json.loads(out.strip().splitlines()[-1])
    header = (
        f"torch {torch.__version__}, {torch.get_num_threads() if not args.threads else args.threads} threads, "
        f"{os.cpu_count()} CPUs, load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}; "
        f"best (median) of {args.repeats}; cold = one call; memory: peak RSS (getrusage ru_maxrss) delta per "
        "scenario process"
    )
    print(table(rows, header))


if __name__ == "__main__":
    main()
