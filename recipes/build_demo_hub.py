"""Build (or find cached) the demo model hub and print its entries.

Usage::

    python recipes/build_demo_hub.py [--out DIR] [--epochs N] [--force]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    import lightning_fms  # noqa: F401
except ImportError:  # running from a source checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_fms.errors import FMSError
from lightning_fms.zoo import DEFAULT_DEMO_EPOCHS, build_demo_hub, default_cache_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Pretrain the demo hub on digits 0-4 (or reuse the cached one).")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"hub folder (default: {default_cache_dir() / 'hubs' / 'demo'}; $LIGHTNING_FMS_CACHE moves it)",
    )
    parser.add_argument("--epochs", type=int, default=DEFAULT_DEMO_EPOCHS, help="pretraining epochs per entry")
    parser.add_argument("--force", action="store_true", help="rebuild even if a valid cached hub exists")
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else default_cache_dir() / "hubs" / "demo"

    start = time.perf_counter()
    try:
        hub = build_demo_hub(out, epochs=args.epochs, force=args.force, verbose=True)
    except FMSError as error:
        print(f"build_demo_hub: error: {error}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start

    print(f"hub {hub.name!r}: {len(hub)} entries in {hub.path} ({seconds:.1f}s)")
    header = f"{'name':<12} {'family':<9} {'params':>8} {'source val_acc':>15}"
    print(header)
    print("-" * len(header))
    for entry in hub:
        params = entry.metadata.get("params")
        if params is None:
            params = sum(p.numel() for p in hub.build(entry.name).parameters())
        acc = entry.metadata.get("source_val_acc")
        acc_text = f"{acc:.3f}" if isinstance(acc, (int, float)) else "?"
        print(f"{entry.name:<12} {entry.family:<9} {params:>8} {acc_text:>15}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
