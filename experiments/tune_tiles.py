"""Sweep the H100 tile table for H=64: forward and backward time per KernelConfig.

Swaps entries of the tile table (`triton_backend._GPU_CONFIGS`) between runs in one
process and times the public function as bench_attention does, so that the table can
be chosen from measurements. Prints one line per (config, case) and writes JSON.

  python experiments/tune_tiles.py --seq_len=16384 --out=tiles.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp

from experiments.bench_attention import make_case, timings, versions
from scfa_jax import triton_backend

CANDIDATES = {
    "table": {},
    "fwd128x128w8": dict(block_m=128, block_n=128, num_warps=8),
    "fwd128x64w8": dict(num_warps=8),
    "fwd64x64w4": dict(block_m=64, block_n=64),
    "bwd64x128": dict(block_m1=64, block_n1=128, block_m2=128, block_n2=64),
    "bwd32x128w8": dict(bwd_num_warps=8),
    "bwd_stages3": dict(bwd_num_stages=3),
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq_len", type=int, default=16384)
  parser.add_argument("--cases", default="all,hash16,drop70")
  parser.add_argument("--configs", default=",".join(CANDIDATES))
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  b, n, h, t = 4, 48, 64, args.seq_len
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (b, t, n, h), jnp.bfloat16) for i in range(3))
  base_config = triton_backend._GPU_CONFIGS[h]
  dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  rows = [dict(config="cudnn", case="dense", T=t, **timings(dense, q, k, v, rep_ms=150))]
  print(json.dumps(rows[0]), flush=True)
  for name in args.configs.split(","):
    triton_backend._GPU_CONFIGS[h] = dataclasses.replace(base_config, **CANDIDATES[name])
    for case in args.cases.split(","):
      fn, qm, km, _ = make_case(case, b, t, n, seed=t)
      try:
        row = dict(config=name, case=case, T=t, **timings(fn, q, k, v, qm, km, rep_ms=150))
      except Exception as e:  # noqa: BLE001  (a config that does not compile is a result too)
        row = dict(config=name, case=case, T=t, error=repr(e)[:200])
      rows.append(row)
      print(json.dumps(row), flush=True)
  triton_backend._GPU_CONFIGS[h] = base_config
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(versions=versions(), rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
