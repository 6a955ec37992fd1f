"""Runs one case's forward+backward twice, for Nsight Compute to profile the second run.

The first call compiles and launches each SCFA kernel once; skip those launches:

  ncu --clock-control none --kernel-name regex:scfa_ --launch-skip 3 --launch-count 3 \
      --section SpeedOfLight --section Occupancy --section WarpStateStats \
      python experiments/ncu_attention.py --case=hash64 --seq_len=16384
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from experiments.bench_attention import make_case  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--case", default="hash64")
  parser.add_argument("--seq_len", type=int, default=16384)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--heads", type=int, default=48)
  parser.add_argument("--head_dim", type=int, default=64)
  args = parser.parse_args()
  b, n, h, t = args.batch, args.heads, args.head_dim, args.seq_len
  q, k, v, do = (jax.random.normal(jax.random.PRNGKey(i), (b, t, n, h), jnp.bfloat16) for i in range(4))
  fn, qm, km, _ = make_case(args.case, b, t, n, seed=t)

  @jax.jit
  def fwd_bwd(q, k, v, do, qm, km):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, qm, km), q, k, v)
    return out, vjp(do)

  for _ in range(2):
    jax.block_until_ready(fwd_bwd(q, k, v, do, qm, km))


if __name__ == "__main__":
  main()
