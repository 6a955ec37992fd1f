"""Preprocessing in jnp: turn masks or buckets into sorted token lists.

Every SCFA mode reduces to one primitive over *sorted* tokens (DESIGN.md section 1).
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
      A permutation of range(T) per (b, n), so every row is written exactly once.
    k_perm: int32 [B, N, S]; the same for the rows of k and v.
    q_idx: int32 [B, N, T]; causal position of slot i, or `Q_PAD`.
    k_idx: int32 [B, N, S]; causal position of slot j, or `K_PAD`.
    q_hash: int32 [B, N, T] bucket of slot i, or None when not hashed.
    k_hash: int32 [B, N, S] bucket of slot j, or None when not hashed.
  """

  q_perm: jax.Array
  k_perm: jax.Array
  q_idx: jax.Array
  k_idx: jax.Array
  q_hash: jax.Array | None = None
  k_hash: jax.Array | None = None

  @property
  def hashed(self) -> bool:
    return self.q_hash is not None


def _positions(x: jax.Array) -> jax.Array:
  """int32 [B, N, L] holding range(L) along the last axis, for x of shape [B, L, N]."""
  b, length, n = x.shape
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, n, length))


def _head_major(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, 1, 2).astype(jnp.int32)


def _sort_by_bucket(buckets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Sorts [B, L, N] buckets by (bucket, position); returns (perm, sorted buckets)."""
  pos = _positions(buckets)
  # A stable sort on the bucket alone keeps positions ascending inside each bucket and
  # compares one key instead of two.
  sorted_hash, perm = jax.lax.sort((_head_major(buckets), pos), dimension=-1, is_stable=True)
  return perm, sorted_hash


def _compact(keep: jax.Array, pad: int) -> tuple[jax.Array, jax.Array]:
  """Moves kept tokens of a [B, L, N] mask to the front in time order.

  Returns (perm, idx): dropped tokens follow the kept ones with idx = pad; their perm
  still names their own row, so outputs for them land at their original position.
  """
  pos = _positions(keep)
  dropped = _head_major(~keep)
  dropped_sorted, perm = jax.lax.sort((dropped, pos), dimension=-1, is_stable=True)
  return perm, jnp.where(dropped_sorted == 0, perm, pad)


def by_bucket(q_buckets: jax.Array, k_buckets: jax.Array) -> SortedTokens:
  """Hash-sparse order: tokens stable-sorted by bucket, positions ascending inside."""
  q_perm, q_hash = _sort_by_bucket(q_buckets)
  k_perm, k_hash = _sort_by_bucket(k_buckets)
  return SortedTokens(q_perm, k_perm, q_perm, k_perm, q_hash, k_hash)


def by_keep_mask(q_keep: jax.Array, k_keep: jax.Array) -> SortedTokens:
  """QK-sparse order: kept tokens compacted to the front, dropped ones padded."""
  q_perm, q_idx = _compact(q_keep, Q_PAD)
  k_perm, k_idx = _compact(k_keep, K_PAD)
  return SortedTokens(q_perm, k_perm, q_idx, k_idx)


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
