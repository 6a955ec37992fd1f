"""Prepare OpenWebText2 for training: GPT-2 BPE tokens (uint16), 0.05% of documents held out.

    # download openwebtext2.jsonl.zst.tar (https://openwebtext2.readthedocs.io/), then:
    mkdir -p data/openwebtext2 && tar xf openwebtext2.jsonl.zst.tar -C data/openwebtext2
    python experiments/prepare_openwebtext2.py --input data/openwebtext2 --out runs/data/openwebtext2

Needs the GPT-2 BPE files: tiktoken downloads them on first use; offline, put
vocab.bpe and encoder.json in one folder and pass --bpe_dir. Interrupted? Run the same
command again: finished shards are kept. Roughly an hour or two on 16 cores for the full release
(about 17M documents, ~16B tokens: a 32 GB train.bin, plus as much again for the per-shard files
while joining); nothing to do when --out is already prepared.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from scfa_jax.data import openwebtext2  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument(
    "--input", default="data/openwebtext2", help="folder of *.jsonl.zst shards or of *.txt documents"
  )
  parser.add_argument("--out", default=str(openwebtext2.DEFAULT_FOLDER), help="prepared folder to write")
  parser.add_argument(
    "--bpe_dir", default=None, help="folder with the GPT-2 vocab.bpe and encoder.json (offline use)"
  )
  parser.add_argument(
    "--workers", type=int, default=None, help="encoding processes (default: CPU count, at most 16)"
  )
  parser.add_argument(
    "--val_fraction", type=float, default=openwebtext2.VAL_FRACTION, help="share of documents held out"
  )
  parser.add_argument("--seed", type=int, default=openwebtext2.SEED, help="seed of the validation draw")
  parser.add_argument(
    "--keep_shards", action="store_true", help="keep the per-shard token files after joining them"
  )
  args = parser.parse_args(argv)
  try:
    folder = openwebtext2.prepare(
        args.input, args.out, bpe_dir=args.bpe_dir, workers=args.workers, seed=args.seed,
        val_fraction=args.val_fraction, keep_shards=args.keep_shards,
    )  # fmt: skip
  except (FileNotFoundError, ValueError, RuntimeError) as error:
    sys.exit(f"error: {error}")
  print(f"OpenWebText2 prepared in {folder} (train.bin, val.bin, meta.json)")
  return folder


if __name__ == "__main__":
  main()
