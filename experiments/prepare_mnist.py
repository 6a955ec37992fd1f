"""Prepare MNIST for autoregressive pixel modelling: 785-token records (start + 784 pixels).

    pip install tensorflow-datasets tensorflow importlib_resources   # only where you prepare
    python experiments/prepare_mnist.py --out runs/data/mnist

tfds downloads MNIST (11 MB) into --tfds_data_dir (default ~/tensorflow_datasets) on
first use and builds it in array_record format; that build (not the reading) needs
TensorFlow. Without TensorFlow: download train-images-idx3-ubyte.gz and
t10k-images-idx3-ubyte.gz from https://storage.googleapis.com/cvdf-datasets/mnist/
into data/mnist and run
    python experiments/prepare_mnist.py --idx_dir data/mnist --out runs/data/mnist
An array_record build made elsewhere: --tfds_data_dir DIR --no_download. Nothing to do
when --out is already prepared.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from scfa_jax.data import mnist  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default=str(mnist.DEFAULT_FOLDER), help="prepared folder to write")
  parser.add_argument("--tfds_data_dir", default=None, help="tfds data_dir (default ~/tensorflow_datasets)")
  parser.add_argument("--no_download", action="store_true", help="only read what --tfds_data_dir holds")
  parser.add_argument(
    "--idx_dir", default=None, help="read the original IDX .gz files from here instead of tfds"
  )
  args = parser.parse_args(argv)
  try:
    folder = mnist.prepare(
      args.out, data_dir=args.tfds_data_dir, download=not args.no_download, idx_dir=args.idx_dir
    )
  except (ImportError, RuntimeError, ValueError, FileNotFoundError) as error:
    sys.exit(f"error: {error}")
  print(f"MNIST prepared in {folder} (train.bin, val.bin, meta.json)")
  return folder


if __name__ == "__main__":
  main()
