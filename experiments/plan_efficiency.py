"""How much of the work the tile plans give each kernel is useful, per sparsity case.

For each kernel of the tile table (`triton_backend.kernel_config`), on the benchmark's
random buckets or keep masks: tiles visited per head, the share of them that pays for
the in-tile mask, and the pair efficiency: allowed (query, key) pairs over the pairs the
visited tiles hold. A kernel's GPU time (`profile_attention.py`) over the pairs its
visited tiles hold is its cost per pair; with the pair efficiency, that separates wasted
pairs from slow tiles. No GPU needed.

  python experiments/plan_efficiency.py --seq_len=16384 --cases=hash16,hash64,drop70
  python experiments/plan_efficiency.py --seq_len=77 --cases=hash4,drop40 --check   # small T only

--check also counts the allowed pairs from a dense [T, S] mask per head and exits with an
error if the two counts differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from experiments.bench_attention import CASES, make_case  # noqa: E402
from scfa_jax import plan, sorting, triton_backend  # noqa: E402


def allowed_pairs(tokens: sorting.SortedTokens) -> int:
  """Allowed (query, key) pairs, non-strict: for ordered tokens the keys a query may attend
  are one run of the sorted (hash, idx) key order, so two searches per query count them."""
  if tokens.hashed:
    q_hash, k_hash = tokens.q_hash, tokens.k_hash
  else:
    q_hash, k_hash = jnp.zeros_like(tokens.q_idx), jnp.zeros_like(tokens.k_idx)
  key = lambda h, i: np.asarray(h, np.int64) * 2**31 + np.asarray(i, np.int64)  # padding sorts last
  q_key, k_key, q_first = key(q_hash, tokens.q_idx), key(k_hash, tokens.k_idx), key(q_hash, 0)
  total = 0
  for head in np.ndindex(q_key.shape[:2]):
    hi = np.searchsorted(k_key[head], q_key[head], side="right")
    lo = np.searchsorted(k_key[head], q_first[head], side="left")
    total += int(np.maximum(hi - lo, 0)[np.asarray(tokens.q_idx[head]) >= 0].sum())
  return total


def case_masks(name: str, b: int, t: int, n: int, seed: int):
  """The benchmark's buckets or keep masks of case `name`: (q_masks, k_masks), [B, T, N] each."""
  _, q_masks, k_masks, _ = make_case(name, b, t, n, seed)
  return q_masks, k_masks


def case_tokens(name: str, q_masks, k_masks) -> sorting.SortedTokens:
  """The sorted tokens of case `name` for its masks."""
  sort = sorting.by_bucket if CASES[name][0] == "hash" else sorting.by_keep_mask
  return sort(q_masks, k_masks)


def dense_allowed_pairs(name: str, q_masks, k_masks) -> int:
  """The allowed pairs counted from a dense [T, S] mask per (batch, head): the check of
  `allowed_pairs`, for small lengths."""
  q_masks, k_masks = np.asarray(q_masks), np.asarray(k_masks)
  causal = np.tril(np.ones((q_masks.shape[1], k_masks.shape[1]), bool))
  total = 0
  for b, n in np.ndindex(q_masks.shape[0], q_masks.shape[2]):
    qm, km = q_masks[b, :, n][:, None], k_masks[b, :, n][None, :]
    allowed = (qm == km) if CASES[name][0] == "hash" else (qm & km)
    total += int((allowed & causal).sum())
  return total


def kernel_rows(name: str, tokens: sorting.SortedTokens, head_dim: int) -> list[dict]:
  kernel_tiles = triton_backend.kernel_config("triton", head_dim, tokens.hashed).kernel_tiles
  useful = allowed_pairs(tokens)
  heads = tokens.q_idx.shape[0] * tokens.q_idx.shape[1]
  rows = []
  for kernel, ((block_q, block_k), view) in kernel_tiles.items():
    dense = np.asarray(plan.make_plan(tokens, block_q=block_q, block_k=block_k, strict=False).to_dense(view))
    visited, full = int((dense != plan.SKIP).sum()), int((dense == plan.FULL).sum())
    rows.append(dict(
        case=name, kernel=kernel, tile=f"{block_q}x{block_k}", tiles_per_head=visited / heads,
        masked_share=(visited - full) / visited, pair_efficiency=useful / (visited * block_q * block_k),
    ))  # fmt: skip
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq_len", type=int, default=16384)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--cases", default="all,hash2,hash16,hash64,drop30,drop70")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="")
  parser.add_argument("--check", action="store_true", help="check the pair count against a dense mask")
  args = parser.parse_args()
  rows = []
  for name in args.cases.split(","):
    if name not in CASES:
      parser.error(f"--cases: {name!r} is not one of {list(CASES)}")
    q_masks, k_masks = case_masks(name, args.batch, args.seq_len, args.heads, args.seed)
    tokens = case_tokens(name, q_masks, k_masks)
    if args.check:
      counted, dense = allowed_pairs(tokens), dense_allowed_pairs(name, q_masks, k_masks)
      if counted != dense:
        sys.exit(f"{name}: {counted} allowed pairs counted, {dense} in the dense mask")
      print(f"{name:7s} allowed pairs {counted} (checked against the dense mask)")
    for row in kernel_rows(name, tokens, args.head_dim):
      print(
          f"{row['case']:7s} {row['kernel']:5s} {row['tile']:7s} tiles/head {row['tiles_per_head']:9.0f} "
          f"masked {row['masked_share']:6.1%} pair efficiency {row['pair_efficiency']:6.1%}",
          flush=True,
      )
      rows.append(row)
  if args.out:
    with open(args.out, "w") as f:
      meta = dict(seq_len=args.seq_len, batch=args.batch, heads=args.heads, seed=args.seed)
      json.dump(dict(meta, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
