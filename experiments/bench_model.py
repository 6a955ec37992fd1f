"""Training throughput of the paper's 122M shared-QK GPT: dense (cuDNN) vs hash-16 (SCFA).

    python experiments/bench_model.py                        # T=8192 x 4 and T=16384 x 2
    python experiments/bench_model.py --cases=8192x4 --steps=20 --remat

Times whole optimizer steps of `scfa_jax.train.Trainer` (AdamW, bf16 matmuls, float32
params, data sampling included) after warm-up, prints a table and writes JSON with
the device and library versions to experiments/results/. The DESIGN.md bar: a plain-JAX
version of this model ran 319k tokens/s at T=8192 and 232k at T=16384 on an H100.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from scfa_jax import train  # noqa: E402
from scfa_jax.model import count_params, preset  # noqa: E402

MODES = {"dense": {"attention": "dense"}, "hash16": {"attention": "hash", "num_buckets": 16}}


def versions() -> dict:
  info = {"python": platform.python_version(), "jax": jax.__version__}
  for name in ("jaxlib", "flax", "optax", "triton", "jax_triton"):
    try:
      info[name] = __import__(name).__version__
    except Exception:  # noqa: BLE001  (absent or without a version: record that)
      info[name] = None
  device = jax.devices()[0]
  info["device"] = f"{device.platform}:{getattr(device, 'device_kind', '?')} x{jax.device_count()}"
  try:
    info["driver"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=20, check=True,
    ).stdout.strip().splitlines()[0]  # fmt: skip
  except Exception:  # noqa: BLE001
    info["driver"] = None
  return info


def bench_case(length, batch, mode, *, steps, warmup, remat, preset_name="gpt122m") -> dict:
  model = preset(preset_name, block_size=length, remat=remat, **MODES[mode])
  config = train.TrainConfig(model=model, batch_size=batch, steps=10_000, checkpoint_every=0)
  trainer = train.Trainer.create(config)
  size = 4 * batch * (length + 1) + 1
  tokens = np.random.default_rng(0).integers(0, model.vocab_size, size=size, dtype=np.uint16)
  t0 = time.perf_counter()
  for _ in range(warmup):
    loss = trainer.train_step(tokens)
  jax.block_until_ready(loss)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    loss = trainer.train_step(tokens)
  jax.block_until_ready((loss, trainer.state))
  step_s = (time.perf_counter() - t0) / steps
  return {
      "T": length, "batch": batch, "mode": mode, "params": count_params(trainer.model()),
      "step_ms": 1e3 * step_s, "tokens_per_s": batch * length / step_s, "loss": float(loss),
      "warmup_s": compile_s, "remat": remat,
  }  # fmt: skip


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cases", default="8192x4,16384x2", help="comma-separated TxB")
  parser.add_argument("--modes", default="dense,hash16")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per case")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
  parser.add_argument("--remat", action="store_true", help="recompute blocks in the backward pass")
  parser.add_argument("--preset", default="gpt122m", help="GPT preset (cpu_tiny for a smoke test)")
  parser.add_argument("--out", default=None, help="JSON path (default results/bench_model_<platform>.json)")
  args = parser.parse_args()

  info = versions()
  print(json.dumps(info))
  rows = []
  for case in args.cases.split(","):
    length, batch = (int(x) for x in case.lower().split("x"))
    for mode in args.modes.split(","):
      try:
        row = bench_case(length, batch, mode, steps=args.steps, warmup=args.warmup, remat=args.remat,
                         preset_name=args.preset)
      except Exception as e:  # noqa: BLE001  (e.g. out of memory: record it and go on)
        row = {"T": length, "batch": batch, "mode": mode, "error": f"{type(e).__name__}: {str(e)[:300]}"}
      rows.append(row)
      print(json.dumps(row), flush=True)

  print(f"\n{'T':>6} {'B':>3} {'mode':>7} {'step ms':>9} {'tokens/s':>10} {'vs dense':>9}")
  for row in rows:
    if "error" in row:
      print(f"{row['T']:>6} {row['batch']:>3} {row['mode']:>7}  {row['error'][:60]}")
      continue
    dense = next((r for r in rows if r["T"] == row["T"] and r["mode"] == "dense" and "error" not in r), None)
    ratio = f"{row['tokens_per_s'] / dense['tokens_per_s']:.2f}x" if dense else "-"
    row["speedup_vs_dense"] = None if dense is None else row["tokens_per_s"] / dense["tokens_per_s"]
    print(
        f"{row['T']:>6} {row['batch']:>3} {row['mode']:>7} {row['step_ms']:>9.1f} "
        f"{row['tokens_per_s']:>10,.0f} {ratio:>9}"
    )

  out = Path(args.out or Path(__file__).parent / "results" / f"bench_model_{jax.default_backend()}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"versions": info, "args": vars(args), "results": rows}, indent=2) + "\n")
  print(f"\nwrote {out}")


if __name__ == "__main__":
  main()
