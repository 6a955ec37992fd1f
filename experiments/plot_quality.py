"""Validation loss of runs against steps and against training time: one figure and a table.

    python experiments/plot_quality.py runs/quality_*_8k/metrics.jsonl --out quality.png
    python experiments/plot_quality.py experiments/results/quality_*_h200.jsonl --out quality_h200.png

Reads the metrics.jsonl of each run (as `experiments/train_lm.py` writes it: a "run" record
with the config, device and versions, then "train", "eval" and, in hash mode, "buckets"
records). Panels: validation loss against optimizer steps (equal steps) and against
training seconds (equal time: compilation, evaluation and checkpoints left out). The table
gives per run the final validation loss and its difference from the dense run's, steps,
training seconds, median tokens/s, the loss each run had reached when the fastest-finishing
run stopped (equal time), and in hash mode the largest bucket over the mean and the pair
share of the last evaluation (mean over layers). --json writes the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def read(path: Path) -> dict:
  records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  run = next((r for r in records if r["kind"] == "run"), None)
  if run is None:
    raise ValueError(f"{path} has no run record (metrics of experiments/train_lm.py expected)")
  model = run["config"]["model"]
  name = model["attention"]
  if name == "hash":
    name = f"hash{model['num_buckets']}" + ("" if model.get("center_hash", True) else "_plain")
  elif name == "qk_drop":
    name = f"drop{round(model['drop_rate'] * 100)}"
  evals = [r for r in records if r["kind"] == "eval"]
  trains = [r for r in records if r["kind"] == "train"]
  buckets = [r for r in records if r["kind"] == "buckets"]
  return {"name": name, "path": str(path), "run": run, "evals": evals, "trains": trains, "buckets": buckets}


def _short(device: str) -> str:
  """'gpu:NVIDIA H100 80GB HBM3 x1' -> 'H100'."""
  return next((w for w in device.split() if w[:1] in "HABL" and w[1:].isdigit()), device)


def loss_at_time(run: dict, seconds: float) -> float:
  """Validation loss at a training time, interpolated between evaluations."""
  times = [e.get("train_s", 0.0) for e in run["evals"]]
  losses = [e["val_loss"] for e in run["evals"]]
  return float(np.interp(seconds, times, losses))


def table(runs: list[dict]) -> list[dict]:
  dense = next((r for r in runs if r["name"] == "dense"), None)
  # Equal time compares runs of the first run's device only: other GPUs run at other speeds.
  device = runs[0]["run"]["device"]
  same = [r for r in runs if r["run"]["device"] == device]
  equal_time = min(r["evals"][-1].get("train_s", 0.0) for r in same)
  rows = []
  for r in runs:
    last = r["evals"][-1]
    row = {
        "run": r["name"], "seed": r["run"]["config"]["seed"], "device": r["run"]["device"],
        "steps": last["step"], "val_loss": last["val_loss"], "train_s": last.get("train_s"),
        "tokens_per_s": float(np.median([t["tokens_per_s"] for t in r["trains"][1:] or r["trains"]])),
        "equal_time_s": equal_time if r in same else None,
        "val_loss_at_equal_time": loss_at_time(r, equal_time) if r in same else None,
    }  # fmt: skip
    if dense is not None:
      row["vs_dense"] = last["val_loss"] / dense["evals"][-1]["val_loss"] - 1
    if r["buckets"]:
      layers = r["buckets"][-1]["layers"]
      row["max_bucket_over_mean"] = float(np.mean([x["max_over_mean"] for x in layers]))
      row["pair_share"] = float(np.mean([x["pair_share"] for x in layers]))
    rows.append(row)
  return rows


def plot(runs: list[dict], path: Path) -> None:
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  devices = {r["run"]["device"] for r in runs}
  for r in runs:
    evals = r["evals"][1:]  # the loss at step 0 (ln 257) would squash the interesting range
    label = r["name"] if len(devices) == 1 else f"{r['name']} ({_short(r['run']['device'])})"
    by_step.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-", ms=3, label=label)
    if r["run"]["device"] == runs[0]["run"]["device"]:  # times of other GPUs do not compare
      by_time.plot([e.get("train_s", 0.0) for e in evals], [e["val_loss"] for e in evals], "o-", ms=3, label=label)
  by_step.set(xlabel="optimizer step", ylabel="validation loss (nats per byte)", title="equal steps")
  by_time.set(xlabel="training time (s)", title="equal time")
  by_step.legend()
  model = runs[0]["run"]["config"]["model"]
  where = runs[0]["run"]["device"] + ("" if len(devices) == 1 else " (equal time: runs of this device only)")
  fig.suptitle(f"GPT {model['n_layer']} x {model['n_embd']}, T={model['block_size']}, {where}", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("metrics", nargs="+", type=Path, help="metrics.jsonl files, one per run")
  parser.add_argument("--out", type=Path, default=None, help="PNG to write")
  parser.add_argument("--json", type=Path, default=None, help="table as JSON")
  args = parser.parse_args(argv)
  try:
    runs = [read(p) for p in args.metrics]
  except (OSError, ValueError, KeyError) as error:
    sys.exit(f"error: {error}")
  rows = table(runs)
  keys = list(dict.fromkeys(k for row in rows for k in row if k not in ("device",)))
  print(" | ".join(keys))
  for row in rows:
    print(" | ".join(f"{row[k]:.4g}" if isinstance(row.get(k), float) else str(row.get(k, "-")) for k in keys))
  if args.out:
    plot(runs, args.out)
    print(f"wrote {args.out}")
  if args.json:
    args.json.write_text(json.dumps(rows, indent=1) + "\n")
  return rows


if __name__ == "__main__":
  main()
