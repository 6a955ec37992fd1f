"""Probe: cheaper ways to sort tokens before the kernels, timed call by call.

XLA runs the batched `lax.sort` of sorting.py as a segmented CUB sort whose thunk copies
the segment offsets from pageable host memory and queries occupancy on every call
(xla/backends/gpu/runtime/cub_sort_thunk.cc): host time during which the GPU waits.
Candidates, checked equal to sorting.py's tokens and timed side by side:
  batched: sorting.by_bucket / by_keep_mask (as now)
  flat:    one 1-D sort of uint32 codes (row, key, position): no segments
  cumsum:  (keep masks) compaction by a cumulative count and one scatter, no sort

  python experiments/probe_prefix.py --seq_lens=4096,16384 --out=probe.json

Outcome (results/profile_h200_prefix_sorts.json, KERNEL_NOTES session 11): the flat sort
is slower everywhere; the compaction shortens the wait before the first attention kernel
but not the call. The batched sort stays.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.bench_attention import bench, make_case, versions  # noqa: E402
from experiments.profile_attention import gpu_ms, pipelined_ms, timeline  # noqa: E402
from scfa_jax import core, sorting  # noqa: E402


def flat_codes_sort(q_keys, k_keys, num_keys):
  keys = jnp.concatenate([q_keys, k_keys])
  hm = jnp.swapaxes(keys, 1, 2).astype(jnp.uint32)
  b2, n, length = hm.shape
  assert b2 * n * num_keys * length <= 2**32
  row = jnp.arange(b2 * n, dtype=jnp.uint32).reshape(b2, n, 1)
  code = (row * num_keys + hm) * length + jnp.arange(length, dtype=jnp.uint32)
  s = jax.lax.sort(code.reshape(-1)).reshape(b2, n, length)
  perm = (s % length).astype(jnp.int32)
  key = ((s // length) % num_keys).astype(jnp.int32)
  b = b2 // 2
  return (perm[:b], key[:b]), (perm[b:], key[b:])


def flat_tokens(mode, qm, km):
  if mode == "hash":
    (qp, qh), (kp, kh) = flat_codes_sort(qm, km, 256)
    return sorting.SortedTokens(qp, kp, qp, kp, qh, kh, ordered=True)
  (qp, qd), (kp, kd) = flat_codes_sort((~qm).astype(jnp.uint8), (~km).astype(jnp.uint8), 2)
  return sorting.SortedTokens(
      qp, kp, jnp.where(qd == 0, qp, sorting.Q_PAD), jnp.where(kd == 0, kp, sorting.K_PAD), ordered=True
  )


def compact(keep, pad):
  keep = jnp.swapaxes(keep, 1, 2)
  length = keep.shape[-1]
  c = jnp.cumsum(keep, axis=-1, dtype=jnp.int32)
  n_kept = c[..., -1:]
  pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), keep.shape)
  dest = jnp.where(keep, c - 1, n_kept + pos - c)
  perm = jnp.put_along_axis(jnp.zeros_like(dest), dest, pos, axis=-1, inplace=False)
  return perm, jnp.where(pos < n_kept, perm, pad)


def cumsum_tokens(mode, qm, km):
  assert mode == "qk"
  qp, qi = compact(qm, sorting.Q_PAD)
  kp, ki = compact(km, sorting.K_PAD)
  return sorting.SortedTokens(qp, kp, qi, ki, ordered=True)


def batched_tokens(mode, qm, km):
  return sorting.by_bucket(qm, km) if mode == "hash" else sorting.by_keep_mask(qm, km)


SORTS = {"batched": batched_tokens, "flat": flat_tokens, "cumsum": cumsum_tokens}


def dense_fwd_bwd(q, k, v, do):
  dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  out, vjp = jax.vjp(dense, q, k, v)
  return out, vjp(do)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--seq_lens", default="4096,16384")
  parser.add_argument("--cases", default="hash64,hash16,drop70,drop30")
  parser.add_argument("--rep_ms", type=int, default=200)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  b, n, h = 4, 48, 64
  info = versions()
  print(json.dumps(info), flush=True)
  rows = []
  for t in (int(x) for x in args.seq_lens.split(",")):
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (b, t, n, h), jnp.bfloat16) for i in range(3))
    do = jax.random.normal(jax.random.PRNGKey(7), q.shape, q.dtype)

    floor = jax.jit(lambda q, k, v, do: (do * 2, q * 2, k * 2, v * 2))
    row = dict(T=t, case="cudnn", call_ms=bench(jax.jit(dense_fwd_bwd), q, k, v, do, rep_ms=args.rep_ms))
    row["floor_call_ms"] = bench(floor, q, k, v, do, rep_ms=args.rep_ms)
    print(row, flush=True)
    rows.append(row)
    config = core.AttentionConfig(implementation="triton", strict=False, scale=h**-0.5)
    for case in args.cases.split(","):
      _, qm, km, _ = make_case(case, b, t, n, seed=t)
      mode = "hash" if case.startswith("hash") else "qk"
      reference = None
      for name, make in SORTS.items():
        if name == "cumsum" and mode == "hash":
          continue
        tokens_fn = jax.jit(lambda qm, km, make=make, mode=mode: make(mode, qm, km))
        tokens = tokens_fn(qm, km)
        if reference is None:
          reference = tokens
        same = all(bool(jnp.array_equal(a, r)) for a, r in zip(jax.tree.leaves(tokens), jax.tree.leaves(reference)))

        def fwd_bwd(q, k, v, do, qm, km, make=make, mode=mode, config=config):
          out, vjp = jax.vjp(lambda q, k, v: core.attention(q, k, v, make(mode, qm, km), config), q, k, v)
          return out, vjp(do)

        f = jax.jit(fwd_bwd)
        row = dict(T=t, case=case, sort=name, tokens_equal=same)
        row["call_ms"] = bench(f, q, k, v, do, qm, km, rep_ms=args.rep_ms)
        row["sort_call_ms"] = bench(tokens_fn, qm, km, rep_ms=args.rep_ms)
        row["pipelined_ms"] = pipelined_ms(f, q, k, v, do, qm, km)
        kernels = []
        row["gpu_ms"] = gpu_ms(f, q, k, v, do, qm, km, kernels=kernels)
        row["launches"] = sum(c for _, c, _ in kernels)
        row["sort_kernels"] = [x for x in kernels if not x[0].startswith("scfa")]
        if t <= 4096:
          row["timeline"] = timeline(f, q, k, v, do, qm, km)
        print(
            f"T={t} {case:7s} {name:8s} equal={same} call {row['call_ms']:.3f} sort-only {row['sort_call_ms']:.3f} "
            f"pipelined {row['pipelined_ms']:.3f} gpu {row['gpu_ms']['gpu_total']:.3f} "
            f"(sort {row['gpu_ms'].get('sort', 0):.3f} other {row['gpu_ms'].get('xla_other', 0):.3f}) "
            f"launches {row['launches']:.0f} prefix {row.get('timeline', {}).get('prefix_us', float('nan')):.0f} us",
            flush=True,
        )
        rows.append(row)
        if args.out:
          Path(args.out).write_text(json.dumps(dict(versions=info, rows=rows), indent=1))


if __name__ == "__main__":
  main()
