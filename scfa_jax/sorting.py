"""Preprocessing in jnp: turn masks or buckets into sorted token lists.

Every SCFA mode reduces to one primitive over *sorted* tokens (docs/design.md).
`SortedTokens` describes that order without moving any q, k, v data: for each
(batch, head) it holds the permutation (which original row each sorted slot reads)
and the per-slot causal index and bucket. Backends gather through the permutation
themselves (the Triton kernels load rows indirectly), so no transposed or gathered
copy of q, k, v is ever made here.

Index layout is head-major, [B, N, T], because sorting runs along T per (batch, head).
Each side is sorted per its own heads: queries per query head [B, N, T], keys per kv head
[B, K, S] (grouped-query attention: K divides N, and query head n meets kv head n // (N // K)).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

Q_PAD = -1
"""`q_idx` of a query slot that attends to nothing (dropped or padding)."""

K_PAD = 2**30
"""`k_idx` of a key slot that nobody attends to (dropped or padding)."""

PAD_KEY = int(np.iinfo(np.int32).max)
"""Sort key (and hash) of padding and dropped tokens when segment ids join the key: sorts last."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SortedTokens:
  """Sorted order of queries and keys, per (batch, head).

  Attributes:
    q_perm: int32 [B, N, T]; sorted query slot i holds row `q_perm[b, n, i]` of q.
      Every row of range(T) appears exactly once per (b, n), so every row is written
      exactly once.
    k_perm: int32 [B, K, S]; the same for the rows of k and v (K kv heads).
    q_idx: int32 [B, N, T]; causal position of slot i, or `Q_PAD`.
    k_idx: int32 [B, K, S]; causal position of slot j, or `K_PAD`.
    q_hash: int32 [B, N, T] bucket of slot i, or None when not hashed.
    k_hash: int32 [B, K, S] bucket of slot j, or None when not hashed.
    ordered: static; True when, by construction, the real tokens fill the first slots in
      nondecreasing (hash, idx) order and padding follows (`by_bucket`, `by_keep_mask`),
      which lets the tile plan use binary searches. False for a caller's order
      (`presorted`).
    shared: static; True when the two sides are one sorted sequence, by construction: ordered
      tokens from one sort of one key array (shared-QK buckets, one keep mask), so query
      slot i and key slot i hold the same token (their pads differ only in Q_PAD and K_PAD).
  """

  q_perm: jax.Array
  k_perm: jax.Array
  q_idx: jax.Array
  k_idx: jax.Array
  q_hash: jax.Array | None = None
  k_hash: jax.Array | None = None
  ordered: bool = dataclasses.field(default=False, metadata=dict(static=True))
  shared: bool = dataclasses.field(default=False, metadata=dict(static=True))

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


def _joint_dense_rank(q_keys: tuple, k_keys: tuple) -> tuple[jax.Array, jax.Array]:
  """Dense ranks of key tuples along axis 1, shared by the two sides: int32 [B, T, ...] and
  [B, S, ...] for tuples of [B, T, ...] and [B, S, ...] integer arrays. Equal tuples get equal
  ranks on both sides, ranks follow the tuples' lexicographic order, and every rank is below
  T + S (below T when both sides are the same arrays, which are then ranked once)."""
  same = all(a is b for a, b in zip(q_keys, k_keys, strict=True))
  t = q_keys[0].shape[1]
  cols = [jnp.moveaxis(a if same else jnp.concatenate([a, b], 1), 1, -1)
          for a, b in zip(q_keys, k_keys, strict=True)]  # fmt: skip
  pos = jax.lax.broadcasted_iota(jnp.int32, cols[0].shape, cols[0].ndim - 1)
  *keys, perm = jax.lax.sort((*cols, pos), dimension=-1, is_stable=True, num_keys=len(cols))
  changed = functools.reduce(jnp.logical_or, [x[..., 1:] != x[..., :-1] for x in keys])
  new = jnp.concatenate([jnp.ones(changed.shape[:-1] + (1,), bool), changed], axis=-1)  # changed is empty at length 1
  rank = jnp.cumsum(new, axis=-1, dtype=jnp.int32) - 1
  _, rank = jax.lax.sort((perm, rank), dimension=-1, num_keys=1)  # back to the original order
  rank = jnp.moveaxis(rank, -1, 1)
  return (rank, rank) if same else (rank[:, :t], rank[:, t:])


def _with_pads(q_key, k_key) -> SortedTokens:
  """Ordered tokens from int32 sort keys [B, L, N] in which `PAD_KEY` marks padding."""
  (q_perm, q_hash), (k_perm, k_hash) = _stable_sort_both(q_key, k_key)
  q_idx = jnp.where(q_hash == PAD_KEY, Q_PAD, q_perm)
  k_idx = jnp.where(k_hash == PAD_KEY, K_PAD, k_perm)
  return SortedTokens(q_perm, k_perm, q_idx, k_idx, q_hash, k_hash, ordered=True, shared=q_key is k_key)


def _fold_group(x: jax.Array, group: int) -> jax.Array:
  """[B, T, N] -> [B, T * G, K]: the G query heads of kv head n // G side by side along T."""
  b, t, n = x.shape
  return jnp.swapaxes(x.reshape(b, t, n // group, group), 2, 3).reshape(b, t * group, n // group)


def _unfold_group(x: jax.Array, group: int) -> jax.Array:
  """Inverse of `_fold_group`: [B, T * G, K] -> [B, T, N]."""
  b, _, kv_heads = x.shape
  return jnp.swapaxes(x.reshape(b, -1, group, kv_heads), 2, 3).reshape(b, -1, kv_heads * group)


def _bucket_segment_keys(q_buckets, k_buckets, q_segment_ids, k_segment_ids):
  """int32 sort keys [B, T, N] / [B, S, N] that are equal exactly for the same (segment, bucket)
  and ordered like (segment rank, bucket); `PAD_KEY` for negative segment ids.

  Narrow buckets (16 bits or less, like `lsh_buckets`' uint8) pack as rank * 2**bits + bucket,
  when T + S times 2**bits stays below `PAD_KEY`: segment ranks are below T + S, so the
  packed key cannot overflow. Otherwise (int32 buckets, or very long sequences) the key is
  the joint rank of the (segment, bucket) pairs, below T + S, at the cost of two more sorts.
  """
  shared = q_buckets is k_buckets and q_segment_ids is k_segment_ids
  dtype = jnp.result_type(q_buckets, k_buckets)
  width = int(jnp.iinfo(dtype).max) + 1  # non-negative bucket ids lie in [0, width)
  length = q_buckets.shape[1] + (0 if shared else k_buckets.shape[1])
  if jnp.iinfo(dtype).bits <= 16 and length * width <= PAD_KEY:
    q_rank, k_rank = _joint_dense_rank((q_segment_ids,), (k_segment_ids,))
    q_key = q_rank[..., None] * width + q_buckets.astype(jnp.int32)
    k_key = q_key if shared else k_rank[..., None] * width + k_buckets.astype(jnp.int32)
  else:
    per_head = lambda ids, buckets: jnp.broadcast_to(ids[..., None], buckets.shape)
    q_seg = per_head(q_segment_ids, q_buckets)
    k_seg = q_seg if shared else per_head(k_segment_ids, k_buckets)
    group = q_buckets.shape[2] // k_buckets.shape[2]
    if group == 1:
      q_key, k_key = _joint_dense_rank((q_seg, q_buckets), (k_seg, k_buckets))
    else:
      # Grouped-query keys [B, S, K]: a kv head's keys are ranked with the queries of all its
      # query heads (ranks below T * G + S), so every head of the group reads the same ranks.
      folded = (_fold_group(q_seg, group), _fold_group(q_buckets, group))
      q_key, k_key = _joint_dense_rank(folded, (k_seg, k_buckets))
      q_key = _unfold_group(q_key, group)
  pad = lambda key, seg: jnp.where(seg[..., None] < 0, PAD_KEY, key)
  q_key = pad(q_key, q_segment_ids)
  return q_key, (q_key if shared else pad(k_key, k_segment_ids))


def by_bucket(
    q_buckets: jax.Array,
    k_buckets: jax.Array,
    q_segment_ids: jax.Array | None = None,
    k_segment_ids: jax.Array | None = None,
) -> SortedTokens:
  """Hash-sparse order: tokens stable-sorted by bucket, positions ascending inside.

  With segment ids ([B, T] / [B, S]), by (segment, bucket, position): the hash of a slot is a
  key that two tokens share exactly when segment and bucket agree, so each document's
  buckets are runs of their own and the tile plan skips the tiles between documents.
  Tokens of negative segment ids are padding, sorted last.
  """
  if q_segment_ids is not None:
    return _with_pads(*_bucket_segment_keys(q_buckets, k_buckets, q_segment_ids, k_segment_ids))
  (q_perm, q_hash), (k_perm, k_hash) = _stable_sort_both(q_buckets, k_buckets)
  return SortedTokens(
      q_perm, k_perm, q_perm, k_perm, q_hash.astype(jnp.int32), k_hash.astype(jnp.int32), ordered=True,
      shared=k_buckets is q_buckets,
  )  # fmt: skip


def by_keep_mask(
    q_keep: jax.Array,
    k_keep: jax.Array,
    q_segment_ids: jax.Array | None = None,
    k_segment_ids: jax.Array | None = None,
) -> SortedTokens:
  """QK-sparse order: kept tokens compacted to the front in time order, dropped ones
  after them with idx `Q_PAD` / `K_PAD`; their perm still names their own row, so
  outputs for them land at their original position.

  With segment ids ([B, T] / [B, S]) the kept tokens sort by (segment, position) and the
  segment rank is their hash, so keys of another document are never attended; dropped
  tokens and negative segment ids are padding, sorted last.
  """
  if q_segment_ids is not None:
    q_rank, k_rank = _joint_dense_rank((q_segment_ids,), (k_segment_ids,))
    key = lambda keep, seg, rank: jnp.where(keep & (seg >= 0)[..., None], rank[..., None], PAD_KEY)
    q_key = key(q_keep, q_segment_ids, q_rank)
    shared = k_keep is q_keep and k_segment_ids is q_segment_ids
    return _with_pads(q_key, q_key if shared else key(k_keep, k_segment_ids, k_rank))
  q_dropped = (~q_keep).astype(jnp.uint8)
  k_dropped = q_dropped if k_keep is q_keep else (~k_keep).astype(jnp.uint8)
  (q_perm, q_dropped), (k_perm, k_dropped) = _stable_sort_both(q_dropped, k_dropped)
  q_idx = jnp.where(q_dropped == 0, q_perm, Q_PAD)
  k_idx = jnp.where(k_dropped == 0, k_perm, K_PAD)
  return SortedTokens(q_perm, k_perm, q_idx, k_idx, ordered=True, shared=k_keep is q_keep)


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
