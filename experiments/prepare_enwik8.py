"""Prepare enwik8 for training: bytes, 90M/5M/5M split (test kept aside as test.bin).

    # download http://mattmahoney.net/dc/enwik8.zip to data/, then:
    python experiments/prepare_enwik8.py --input data/enwik8.zip --out runs/data/enwik8

Takes a few seconds; does nothing when --out is already prepared.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from scfa_jax.data import enwik8  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument(
    "--input", default="data/enwik8.zip", help="enwik8.zip, the extracted enwik8 file, or their folder"
  )
  parser.add_argument("--out", default=str(enwik8.DEFAULT_FOLDER), help="prepared folder to write")
  parser.add_argument(
    "--any_size", action="store_true", help="accept a file that is not 10^8 bytes (split 90/5/5 %%)"
  )
  args = parser.parse_args(argv)
  try:
    folder = enwik8.prepare(
      args.input, args.out, expected_bytes=None if args.any_size else enwik8.ENWIK8_BYTES
    )
  except (FileNotFoundError, ValueError) as error:
    sys.exit(f"error: {error}")
  print(f"enwik8 prepared in {folder} (train.bin, val.bin, test.bin, meta.json)")
  return folder


if __name__ == "__main__":
  main()
