"""Attention of one new token against cached keys and values, for autoregressive decoding.

A decode step is a handful of small matmuls per layer, so it is written in jnp for every
backend; the prompt goes through the layer's own attention (`SparseCausalSelfAttention.prefill`).
Two cache layouts:

- position order: keys and values [B, L, K, H], read whole under a mask of the allowed
  positions (`masked_attention`); every mode uses it.
- bucket pages (hash mode, `BucketPages`): keys and values in pages of `page_size` rows,
  each page holding keys of one bucket only, and a table of each bucket's pages. A step
  reads only the pages of its query's bucket (`bucket_attention`), about L / num_buckets
  keys instead of L. Pages are handed out as buckets fill, so the pool needs
  ceil(L / page_size) + num_buckets pages whatever the bucket sizes (each bucket leaves at
  most one page partly empty).

Grouped-query attention: the cache holds the K kv heads only; query head n (of N) reads kv
head n // (N // K), as q viewed [B, K, N // K, H] against keys [.., K, ..].
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

READ_KEYS = 1024
"""Keys per (batch, head) that one iteration of `bucket_attention`'s loop reads. The loop
runs until the longest bucket of the batch is read, and on a GPU each iteration costs a
round trip to the host to test the condition: larger reads mean fewer iterations, smaller
ones less reading past a bucket's end."""


def masked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, *, scale: float
) -> jax.Array:
  """One query per (batch, head) against every cached key: [B, N, H] in q's dtype.

  q: [B, N, H]; k, v: [B, L, K, H] with K dividing N; allowed: bool [B, N, L] (or
  broadcastable to it). Scores and softmax in float32; a row with no allowed key gives
  exactly 0, as the full attention functions do.
  """
  b, n, h = q.shape
  grouped = q.reshape(b, k.shape[2], -1, h)  # [B, K, G, H]: the query heads of each kv head
  s = jnp.einsum("bkgh,blkh->bkgl", grouped, k, preferred_element_type=jnp.float32).reshape(b, n, -1) * scale
  s = jnp.where(allowed, s, -jnp.inf)
  row_max = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  denom = jnp.sum(p, axis=-1, keepdims=True)
  # Weights in v's dtype, accumulated in float32, as jax.nn does: no float32 copy of the cache.
  p = p.astype(v.dtype).reshape(grouped.shape[:3] + (-1,))
  o = jnp.einsum("bkgl,blkh->bkgh", p, v, preferred_element_type=jnp.float32).reshape(b, n, h)
  return (o / jnp.where(denom > 0, denom, 1.0)).astype(q.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BucketPages:
  """Keys and values of one layer grouped by bucket, in pages of `page_size` rows.

  Bucket j's keys, in the order they came, fill pages table[b, n, j, 0], table[b, n, j, 1],
  ...; counts[b, n, j] says how many there are. `used` pages of the pool are handed out.
  """

  k: jax.Array  # [B, K, num_pages, page_size, H] (K kv heads)
  v: jax.Array  # [B, K, num_pages, page_size, H]
  table: jax.Array  # int32 [B, K, num_buckets, pages per bucket]: page ids in fill order
  counts: jax.Array  # int32 [B, K, num_buckets]: keys per bucket
  used: jax.Array  # int32 [B, K]: pages handed out so far

  @property
  def page_size(self) -> int:
    return self.k.shape[3]


def empty_pages(
    batch_size: int, num_heads: int, head_dim: int, num_buckets: int, max_length: int, page_size: int, dtype
) -> BucketPages:
  """Room for max_length keys, however they split across num_buckets buckets."""
  per_bucket = math.ceil(max_length / page_size)  # one bucket may hold every key
  num_pages = per_bucket + num_buckets
  rows = jnp.zeros((batch_size, num_heads, num_pages, page_size, head_dim), dtype)
  return BucketPages(
      k=rows, v=rows,
      table=jnp.zeros((batch_size, num_heads, num_buckets, per_bucket), jnp.int32),
      counts=jnp.zeros((batch_size, num_heads, num_buckets), jnp.int32),
      used=jnp.zeros((batch_size, num_heads), jnp.int32),
  )  # fmt: skip


def _ids(batch: int, heads: int):
  return jnp.arange(batch)[:, None], jnp.arange(heads)[None, :]


def fill_pages(pages: BucketPages, k: jax.Array, v: jax.Array, buckets: jax.Array) -> BucketPages:
  """Pages that hold exactly k, v [B, T, N, H] with buckets [B, T, N]; earlier contents are dropped.

  The buckets take consecutive runs of pages, in bucket order; keys keep their time order.
  """
  num_buckets, size = pages.counts.shape[-1], pages.page_size
  one_hot = (buckets[..., None] == jnp.arange(num_buckets)).astype(jnp.int32)  # [B, T, N, nb]
  rank = jnp.sum((jnp.cumsum(one_hot, axis=1) - 1) * one_hot, axis=-1)  # [B, T, N]: place in its bucket
  counts = jnp.sum(one_hot, axis=1)  # [B, N, nb]
  num_pages = -(-counts // size)
  first = jnp.cumsum(num_pages, axis=-1) - num_pages  # [B, N, nb]: each bucket's first page
  page = jnp.sum(first[:, None] * one_hot, axis=-1) + rank // size  # [B, T, N]
  batch_ids, head_ids = _ids(k.shape[0], k.shape[2])
  batch_ids = batch_ids[..., None]  # [B, 1, 1] against [B, T, N]
  place = (batch_ids, head_ids, page, rank % size)
  slots = jnp.arange(pages.table.shape[-1])
  return BucketPages(
      k=pages.k.at[place].set(k.astype(pages.k.dtype)),
      v=pages.v.at[place].set(v.astype(pages.v.dtype)),
      table=jnp.where(slots < num_pages[..., None], first[..., None] + slots, 0).astype(jnp.int32),
      counts=counts,
      used=jnp.sum(num_pages, axis=-1).astype(jnp.int32),
  )


def append_to_pages(pages: BucketPages, k: jax.Array, v: jax.Array, bucket: jax.Array) -> BucketPages:
  """pages with one more key per (batch, head): k, v [B, N, H] into bucket int [B, N].

  A bucket whose last page is full (or that has none) takes the next unused page.
  """
  bucket = bucket.astype(jnp.int32)
  count = jnp.take_along_axis(pages.counts, bucket[..., None], axis=-1)[..., 0]  # [B, N]
  index, slot = count // pages.page_size, count % pages.page_size
  row = jnp.take_along_axis(pages.table, bucket[..., None, None], axis=2)[:, :, 0]  # [B, N, per bucket]
  current = jnp.take_along_axis(row, index[..., None], axis=-1)[..., 0]
  page = jnp.where(slot == 0, pages.used, current)
  batch_ids, head_ids = _ids(*bucket.shape)
  return BucketPages(
      k=pages.k.at[batch_ids, head_ids, page, slot].set(k.astype(pages.k.dtype)),
      v=pages.v.at[batch_ids, head_ids, page, slot].set(v.astype(pages.v.dtype)),
      table=pages.table.at[batch_ids, head_ids, bucket, index].set(page),
      counts=pages.counts.at[batch_ids, head_ids, bucket].add(1),
      used=pages.used + (slot == 0),
  )


def bucket_attention(
    q: jax.Array, pages: BucketPages, bucket: jax.Array, *, scale: float, read_keys: int = READ_KEYS
) -> jax.Array:
  """One query per (batch, head) against the cached keys of its bucket only: [B, N, H].

  q: [B, N, H]; bucket: int [B, N]; the pages hold K kv heads, K dividing N: query head n
  reads the pages of kv head n // (N // K) in its own bucket. Equals `masked_attention` over
  the keys of that bucket (a bucket with no key gives exactly 0). A loop reads the pages
  listed for the bucket, read_keys keys' worth at a time (whole pages), with an online
  softmax in float32, until the longest bucket of the batch is read. Pages of other buckets
  are never loaded, except that table slots past a bucket's last page name page 0, which a
  read that runs past the bucket's end loads and masks out.
  """
  b, n, h = q.shape
  kv_heads = pages.k.shape[1]
  # Everything per (batch, kv head, query head of its group): [B, K, G, ...].
  q = q.reshape(b, kv_heads, -1, h)
  bucket = bucket.astype(jnp.int32).reshape(q.shape[:3])
  size = pages.page_size
  per_read = max(1, read_keys // size)
  count = jnp.take_along_axis(pages.counts, bucket, axis=-1)  # [B, K, G]
  table = jnp.take_along_axis(pages.table, bucket[..., None], axis=2)  # [B, K, G, per bucket]
  table = jnp.pad(table, [(0, 0), (0, 0), (0, 0), (0, -table.shape[-1] % per_read)])  # whole reads
  num_reads = (jnp.max(count) + per_read * size - 1) // (per_read * size)
  page_k, page_v = pages.k[:, :, None], pages.v[:, :, None]  # [B, K, 1, num_pages, size, H]

  def read(i, carry):
    row_max, denom, acc = carry
    ids = jax.lax.dynamic_slice_in_dim(table, i * per_read, per_read, axis=3)[..., None, None]
    rank = i * per_read * size + jnp.arange(per_read * size).reshape(per_read, size)
    valid = rank < count[..., None, None]  # [B, K, G, per_read, size]
    k = jnp.take_along_axis(page_k, ids, axis=3)  # [B, K, G, per_read, size, H]
    # Zeroed, not only masked: slots past the bucket's end may hold anything.
    v = jnp.where(valid[..., None], jnp.take_along_axis(page_v, ids, axis=3), 0)
    s = jnp.einsum("bkgh,bkgpsh->bkgps", q, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(valid, s, -jnp.inf)
    new_max = jnp.maximum(row_max, jnp.max(s, axis=(3, 4)))
    shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
    p = jnp.exp(s - shift[..., None, None])
    rescale = jnp.exp(row_max - shift)
    denom = denom * rescale + jnp.sum(p, axis=(3, 4))
    pv = jnp.einsum("bkgps,bkgpsh->bkgh", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    acc = acc * rescale[..., None] + pv
    return new_max, denom, acc

  init = (jnp.full(q.shape[:3], -jnp.inf), jnp.zeros(q.shape[:3]), jnp.zeros(q.shape))
  _, denom, acc = jax.lax.fori_loop(0, num_reads, read, init)
  return (acc / jnp.where(denom > 0, denom, 1.0)[..., None]).reshape(b, n, h).astype(q.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionCache:
  """What one attention layer keeps between decode steps; a pytree (jit it, donate it).

  Made by `SparseCausalSelfAttention.init_cache`, filled by `prefill`, extended by
  `decode_step`. The random draws are made once, at `init_cache`, and hold for the whole
  generation: hash mode's rotations, qk_drop's query and key keep masks for every position.
  """

  length: jax.Array  # int32 []: positions filled, i.e. the position of the next token
  max_length: int = dataclasses.field(metadata=dict(static=True))
  k: jax.Array | None = None  # [B, L, K, H] in position order, K kv heads (None with bucket pages)
  v: jax.Array | None = None
  k_buckets: jax.Array | None = None  # hash mode, position order: [B, L, K]
  pages: BucketPages | None = None  # hash mode with bucket pages, instead of k, v, k_buckets
  rotations: jax.Array | None = None  # hash mode: the kv heads' [K, H, num_buckets // 2]
  # Centered hash: float32 [B, N, R], the sum of the earlier queries' projected unit vectors.
  q_projected_sum: jax.Array | None = None
  k_projected_sum: jax.Array | None = None  # the same for keys [B, K, R], when they are not the queries
  q_keep: jax.Array | None = None  # qk_drop: bool [B, L, N], per query head
  k_keep: jax.Array | None = None  # qk_drop: bool [B, L, K], per kv head, drawn independently
