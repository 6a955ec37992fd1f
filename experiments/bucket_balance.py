"""How balanced the GPT's hash buckets are over its first training steps.

    python experiments/bucket_balance.py --length=512 --batch=4 --steps=0,50,100 --positions=learned
    python experiments/bucket_balance.py --length=512 --batch=4 --steps=0,50,100 --positions=rope

Hash attention computes the causal pairs of tokens that share a bucket, so its cost per
layer follows the sum of squared bucket shares (1 / num_buckets for uniform buckets): the
benchmark of a training step (experiments/bench_model.py) is only as representative as
the buckets of the model state it times. This script trains the 122M preset in hash-16
mode with bench_model's schedule (the first steps of a 10,000-step run, AdamW, the
library's `Trainer`) on a prepared corpus and prints, at the given steps, the training
loss and `Trainer.bucket_balance` on the first training batch: one JSON line per step,
after a first line with the device, versions, code commit and arguments.
Runs on a CPU (slowly: about 6 s a step at T=512 x 4 on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

import numpy as np  # noqa: E402

from experiments.bench_model import SCHEDULE_STEPS, versions  # noqa: E402
from scfa_jax import train  # noqa: E402
from scfa_jax.data import batches, prepared, python_sources  # noqa: E402
from scfa_jax.model import POSITIONS, preset  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", default=None, help="prepared folder (default: the Python sources here)")
  parser.add_argument("--preset", default="gpt122m")
  parser.add_argument("--length", type=int, default=512, help="T")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--steps", default="0,13,50,100", help="comma-separated steps at which to measure")
  parser.add_argument("--positions", default="learned", choices=POSITIONS)
  parser.add_argument("--vocab_size", type=int, default=None, help="the preset's vocabulary unless given")
  parser.add_argument("--num_buckets", type=int, default=16)
  args = parser.parse_args(argv)
  checkpoints = sorted({int(x) for x in args.steps.split(",") if x})
  print(json.dumps({"kind": "run", "versions": versions(), "args": vars(args)}), flush=True)
  folder = args.data or python_sources.prepare(corpus="python")
  tokens = prepared.load(folder)[0]["train"]
  fields = {"positions": args.positions, **({"vocab_size": args.vocab_size} if args.vocab_size else {})}
  model = preset(args.preset, block_size=args.length, attention="hash", num_buckets=args.num_buckets,
                 **fields)  # fmt: skip
  config = train.TrainConfig(
      model=model, batch_size=args.batch, steps=SCHEDULE_STEPS, checkpoint_every=0, segment_documents=False
  )
  trainer = train.Trainer.create(config)
  windows = batches.train_batch(tokens, seed=config.seed, step=0, shape=(args.batch,), length=args.length)
  rows, done, loss = [], 0, None
  for target in checkpoints:
    while done < target:
      loss = trainer.train_step(tokens)
      done += 1
    layers = trainer.bucket_balance(windows)
    row = {
        "step": done, "loss": None if loss is None else float(loss), "T": args.length, "batch": args.batch,
        "positions": args.positions, "vocab_size": model.vocab_size, "num_buckets": args.num_buckets,
        "pair_share": float(np.mean([x["pair_share"] for x in layers])),
        "max_over_mean": float(np.mean([x["max_over_mean"] for x in layers])),
        "per_layer_pair_share": [round(x["pair_share"], 4) for x in layers],
    }  # fmt: skip
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


if __name__ == "__main__":
  main()
