"""A small demonstration of both SCFA modes on this machine's default backend.

Runs hash-sparse and QK-sparse attention at a few lengths, checks them against the
dense masked reference, and prints how much of the causal tile triangle the tile
plan lets the kernels skip.

  python experiments/demo_attention.py [--seq_lens=512,2048] [--implementation=xla]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import scfa_jax
from scfa_jax import plan, reference, sorting


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq_lens", default="512,2048", help="comma-separated lengths T")
  parser.add_argument(
      "--implementation", default=None, choices=("xla", "triton", "interpret"), help="default: the best available"
  )  # fmt: skip
  args = parser.parse_args()
  impl = args.implementation
  print(f"jax {jax.__version__} on {jax.default_backend()}")
  b, n, h = 1, 4, 64
  for t in (int(x) for x in args.seq_lens.split(",")):
    q, k, v = jax.random.normal(jax.random.PRNGKey(t), (3, b, t, n, h))
    rotations = scfa_jax.random_rotations(jax.random.PRNGKey(1), n, h, num_buckets=8)
    buckets = scfa_jax.lsh_buckets(q, rotations)
    keep = jax.random.bernoulli(jax.random.PRNGKey(2), 0.3, (b, t, n))
    cases = {
        "hash, 8 buckets": (
            lambda q, k, v: scfa_jax.hash_sparse_attention(
                q, k, v, q_buckets=buckets, k_buckets=buckets, implementation=impl
            ),
            lambda q, k, v: reference.hash_sparse_attention(q, k, v, q_buckets=buckets, k_buckets=buckets),
            sorting.by_bucket(buckets, buckets),
        ),
        "qk, drop 70%": (
            lambda q, k, v: scfa_jax.qk_sparse_attention(q, k, v, q_keep=keep, k_keep=keep, implementation=impl),
            lambda q, k, v: reference.qk_sparse_attention(q, k, v, q_keep=keep, k_keep=keep),
            sorting.by_keep_mask(keep, keep),
        ),
    }
    causal = plan.make_plan(sorting.by_keep_mask(keep | True, keep | True), block_q=128, block_k=128, strict=False)
    for name, (fast, slow, tokens) in cases.items():
      fwd_bwd = jax.jit(lambda q, k, v, f=fast: jax.grad(lambda q: jnp.sum(f(q, k, v) ** 2))(q))
      jax.block_until_ready(fwd_bwd(q, k, v))
      start = time.perf_counter()
      jax.block_until_ready(fwd_bwd(q, k, v))
      elapsed = time.perf_counter() - start
      error = float(jnp.max(jnp.abs(fast(q, k, v) - slow(q, k, v))))
      tiles = plan.make_plan(tokens, block_q=128, block_k=128, strict=False)
      visited = float(jnp.sum(tiles.end_n - tiles.start_n)) / float(jnp.sum(causal.end_n - causal.start_n))
      print(
          f"T={t:5d} {name:16s} fwd+bwd {elapsed * 1e3:8.1f} ms   max |out - reference| = {error:.1e}   "
          f"tiles visited: {visited:.0%} of causal"
      )


if __name__ == "__main__":
  main()
