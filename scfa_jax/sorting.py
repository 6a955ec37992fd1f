"""Preprocessing in jnp: turn masks or buckets into sorted token lists.

Every SCFA mode reduces to one primitive over *sorted* tokens (docs/design.md).
`SortedTokens` describes that order without moving any q, k, v data: for each
(batch, head) it holds the permutation (which original row each sorted slot reads)
and the per-slot causal index and bucket. Backends gather through the permutation
themselves (the Triton kernels load rows indirectly), so no transposed or gathered
copy of q, k, v is ever made here.

Index layout is head-major, [B, N, T], because sorting runs along T per (batch, head).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Q_PAD = -1
"""`q_idx` of a query slot that attends to nothing (dropped or padding)."""

K_PAD = 2**30
"""`k_idx` of a key slot that nobody attends to (dropped or padding)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SortedTokens:
  """Sorted order of queries and keys, per (batch, head).

  Attributes:
    q_perm: int32 [B, N, T]; sorted query slot i holds row `q_perm[b, n, i]` of q.
      Every row of range(T) appears exactly once per (b, n), so every row is written
      exactly once.
    k_perm: int32 [B, N, S]; the same for the rows of k and v.
    q_idx: int32 [B, N, T]; causal position of slot i, or `Q_PAD`.
    k_idx: int32 [B, N, S]; causal position of slot j, or `K_PAD`.
    q_hash: int32 [B, N, T] bucket of slot i, or None when not hashed.
    k_hash: int32 [B, N, S] bucket of slot j, or None when not hashed.
    ordered: static; True when, by construction, the real tokens fill the first slots in
      nondecreasing (hash, idx) order and padding follows (`by_bucket`, `by_keep_mask`),
      which lets the tile plan use binary searches. False for a caller's order
      (`presorted`).
  """

  q_perm: jax.Array
  k_perm: jax.Array
  q_idx: jax.Array
  k_idx: jax.Array
  q_hash: jax.Array | None = None
  k_hash: jax.Array | None = None
  ordered: bool = dataclasses.field(default=False, metadata=dict(static=True))

  @property
  def hashed(self) -> bool:
    return self.q_hash is not None


def _positions(x: jax.Array) -> jax.Array:
  """int32 [B, N, L] holding range(L) along the last axis, for x of shape [B, L, N]."""
  b, length, n = x.shape
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, n, length))


def _head_major(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, 1, 2).astype(jnp.int32)


def _stable_sort(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Stable sort of [B, L, N] integer keys along L, positions as payload: (perm, sorted keys).

  Stability keeps positions ascending among equal keys, so one key does the work of
  (key, position). XLA runs this as a CUB radix sort on GPU, whose passes follow the
  key's width: the keys keep their own dtype (uint8 buckets: one pass) rather than int32.
  """
  pos = _positions(keys)
  sorted_keys, perm = jax.lax.sort((jnp.swapaxes(keys, 1, 2), pos), dimension=-1, is_stable=True)
  return perm, sorted_keys


def _stable_sort_both(q_keys: jax.Array, k_keys: jax.Array):
  """`_stable_sort` of the query and the key side: one sort when both sides are the same
  array (shared-QK buckets, one keep mask), else one sort of both when their shapes and
  dtypes agree (T == S). Each XLA sort costs about 45 us of host time per call (a pageable
  copy, occupancy queries, two launches), during which the GPU waits for its first
  attention kernel."""
  if q_keys is k_keys:
    both = _stable_sort(q_keys)
    return both, both
  if q_keys.shape != k_keys.shape or q_keys.dtype != k_keys.dtype:
    return _stable_sort(q_keys), _stable_sort(k_keys)
  b = q_keys.shape[0]
  perm, keys = _stable_sort(jnp.concatenate([q_keys, k_keys]))
  return (perm[:b], keys[:b]), (perm[b:], keys[b:])


def by_bucket(q_buckets: jax.Array, k_buckets: jax.Array) -> SortedTokens:
  """Hash-sparse order: tokens stable-sorted by bucket, positions ascending inside."""
  (q_perm, q_hash), (k_perm, k_hash) = _stable_sort_both(q_buckets, k_buckets)
  return SortedTokens(
      q_perm, k_perm, q_perm, k_perm, q_hash.astype(jnp.int32), k_hash.astype(jnp.int32), ordered=True
  )


def by_keep_mask(q_keep: jax.Array, k_keep: jax.Array) -> SortedTokens:
  """QK-sparse order: kept tokens compacted to the front in time order, dropped ones
  after them with idx `Q_PAD` / `K_PAD`; their perm still names their own row, so
  outputs for them land at their original position."""
  q_dropped = (~q_keep).astype(jnp.uint8)
  k_dropped = q_dropped if k_keep is q_keep else (~k_keep).astype(jnp.uint8)
  (q_perm, q_dropped), (k_perm, k_dropped) = _stable_sort_both(q_dropped, k_dropped)
  q_idx = jnp.where(q_dropped == 0, q_perm, Q_PAD)
  k_idx = jnp.where(k_dropped == 0, k_perm, K_PAD)
  return SortedTokens(q_perm, k_perm, q_idx, k_idx, ordered=True)


def presorted(
    q_idx: jax.Array,
    k_idx: jax.Array,
    q_hash: jax.Array | None = None,
    k_hash: jax.Array | None = None,
) -> SortedTokens:
  """Tokens that the caller already sorted: the permutation is the identity."""
  hashes = (None, None) if q_hash is None else (_head_major(q_hash), _head_major(k_hash))
  return SortedTokens(
      _positions(q_idx), _positions(k_idx), _head_major(q_idx), _head_major(k_idx), *hashes
  )


def gather_rows(x: jax.Array, perm: jax.Array) -> jax.Array:
  """[B, L, N, H] rows read through perm [B, N, L] -> sorted [B, N, L, H]."""
  return jnp.take_along_axis(jnp.swapaxes(x, 1, 2), perm[..., None], axis=2)


def scatter_rows(x_sorted: jax.Array, perm: jax.Array) -> jax.Array:
  """Inverse of `gather_rows`: sorted [B, N, L, H] -> [B, L, N, H] at original rows."""
  inverse = jnp.argsort(perm, axis=-1)
  return jnp.swapaxes(jnp.take_along_axis(x_sorted, inverse[..., None], axis=2), 1, 2)
