"""Time and peak host memory of the XLA backend, forward + backward, at long length.

The XLA backend scans over query tiles, so its live memory is one [B, N, 128, S]
score tile rather than [B, N, T, S]. The default case (B=1, N=4, H=64, T=S=16384,
float32) would need 4 GiB per dense score matrix, and several of them for the
backward; here it has to run on a 24 GiB CPU machine.

  python experiments/bench_xla_memory.py [--seq_len=16384] [--mode=hash|qk] [--repeats=2]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import jax
import jax.numpy as jnp

import scfa_jax


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--seq_len", type=int, default=16384)
  parser.add_argument("--mode", choices=["hash", "qk"], default="hash")
  parser.add_argument("--num_buckets", type=int, default=16)
  parser.add_argument("--drop_rate", type=float, default=0.7)
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()

  b, t, n, h = args.batch, args.seq_len, args.heads, args.head_dim
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  q, k, v = (jax.random.normal(key, (b, t, n, h), jnp.float32) for key in keys[:3])
  if args.mode == "hash":
    masks = [jax.random.randint(key, (b, t, n), 0, args.num_buckets) for key in keys[3:]]
    attention = lambda q, k, v, qm, km: scfa_jax.hash_sparse_attention(
        q, k, v, q_buckets=qm, k_buckets=km, implementation="xla"
    )
  else:
    masks = [jax.random.bernoulli(key, 1 - args.drop_rate, (b, t, n)) for key in keys[3:]]
    attention = lambda q, k, v, qm, km: scfa_jax.qk_sparse_attention(
        q, k, v, q_keep=qm, k_keep=km, implementation="xla"
    )

  @jax.jit
  def fwd_bwd(q, k, v, qm, km):
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, qm, km), q, k, v)
    return out, vjp(out)

  start = time.perf_counter()
  jax.block_until_ready(fwd_bwd(q, k, v, *masks))
  first = time.perf_counter() - start
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    jax.block_until_ready(fwd_bwd(q, k, v, *masks))
    times.append(time.perf_counter() - start)
  peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  dense_scores_gib = b * n * t * t * 4 / 2**30
  result = dict(
      vars(args),
      backend=jax.default_backend(),
      jax=jax.__version__,
      first_call_s=round(first, 2),
      fwd_bwd_s=round(sorted(times)[len(times) // 2], 2),
      peak_host_memory_gib=round(peak_gib, 2),
      one_dense_score_matrix_gib=round(dense_scores_gib, 2),
  )
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
