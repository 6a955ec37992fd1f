"""Prepare MNIST for autoregressive pixel modelling: 785-token records (start + 784 pixels).

    pip install tensorflow-datasets array_record   # only where you prepare; TensorFlow not needed
    python experiments/prepare_mnist.py --out runs/data/mnist

tfds downloads MNIST (11 MB) into --tfds_data_dir (default ~/tensorflow_datasets) on
first use. Offline: build it elsewhere with
'tfds build mnist --file_format=array_record --data_dir DIR', copy DIR here and pass
--tfds_data_dir DIR --no_download. Nothing to do when --out is already prepared.
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
  parser.add_argument(
    "--no_download", action="store_true", help="only read what --tfds_data_dir already holds"
  )
  args = parser.parse_args(argv)
  try:
    folder = mnist.prepare(args.out, data_dir=args.tfds_data_dir, download=not args.no_download)
  except (ImportError, RuntimeError, ValueError) as error:
    sys.exit(f"error: {error}")
  print(f"MNIST prepared in {folder} (train.bin, val.bin, meta.json)")
  return folder


if __name__ == "__main__":
  main()
