"""Write the weights files the CLI recipe searches over: ``recipes/cli/weights/{mlp-s,cnn-s,resnet-xs}.safetensors``.

Usage::

    python recipes/cli/make_weights.py [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from digits import make_weights

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "weights")
    for path in make_weights(parser.parse_args().out):
        print(path)
