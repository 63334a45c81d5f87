"""Write the model hub of the agent's hub example: recipes/cli's weights files, described in a ``hub.yaml``.

The files are the ones ``recipes/cli/make_weights.py`` writes (self-describing safetensors: recipes/cli's
``DigitsFineTuner`` builds its network from one); the hub file gives the agent each entry's network and weights,
its ``W_0``. Usage::

    python recipes/agent/make_hub.py [--out DIR]      # default: recipes/agent/hub/{hub.yaml,weights/}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors import safe_open

from lightning_fms.hub import HubEntry, ModelHub, sha256_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "cli"))
from digits import make_weights  # noqa: E402  (recipes/cli/digits.py)


def make_hub(out_dir: str | Path = HERE / "hub", hub_dir: str | Path | None = None) -> Path:
    """Write ``out_dir/weights/*.safetensors`` and ``out_dir/hub.yaml``; returns the hub file.

    Args:
        out_dir: Where to write.
        hub_dir: Where the tiny hub the weights come from is built or reused (default: the cache).
    """
    out = Path(out_dir)
    entries = []
    for path in make_weights(out / "weights", hub_dir=hub_dir):
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
        entries.append(
            HubEntry(
                name=path.stem,
                family=path.stem.split("-")[0],
                class_path=meta["class_path"],
                init_args=json.loads(meta["init_args"]),
                weights=path,
                sha256=sha256_file(path),
            )
        )
    return ModelHub(entries, name="cli-weights").to_yaml(out / "hub.yaml")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "hub")
    print(make_hub(parser.parse_args().out))
