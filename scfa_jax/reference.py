"""Dense masked attention: the test oracle. Materialises the [B, N, T, S] mask; never fast.

Everything here works in original token positions (BTNH, masks [B, T, N]) and shares no
code with the sorting, the tile plan or any backend, so that it checks them all. Grouped-query
inputs (k, v [B, S, K, H], key masks [B, S, K], K dividing N) are repeated to N heads here,
in the oracle only: query head n reads kv head n // (N // K).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from scfa_jax.sorting import K_PAD


def _repeat_heads(x: jax.Array, heads: int) -> jax.Array:
  """x [B, L, K, ...] with each of its K heads repeated for the N // K query heads of its group."""
  return jnp.repeat(x, heads // x.shape[2], axis=2)


def allowed_mask(
    q_idx: jax.Array,
    k_idx: jax.Array,
    q_hash: jax.Array | None = None,
    k_hash: jax.Array | None = None,
    *,
    strict: bool = False,
    q_segment_ids: jax.Array | None = None,
    k_segment_ids: jax.Array | None = None,
) -> jax.Array:
  """The SCFA rule as a bool [B, N, T, S] mask, from [B, T, N] / [B, S, K] indices and buckets.

  allowed(i, j) = causal(q_idx[i], k_idx[j]) and q_hash[i] == k_hash[j] (when hashed),
  where causal is `>` if strict else `>=`; q_idx < 0 and k_idx >= 2**30 are padding.
  With segment ids ([B, T] and [B, S]) also q_segment_ids[i] == k_segment_ids[j] >= 0:
  negative ids are padding.
  """
  heads = q_idx.shape[2]
  k_idx = _repeat_heads(k_idx, heads)
  qi = jnp.swapaxes(q_idx, 1, 2)[..., :, None]
  kj = jnp.swapaxes(k_idx, 1, 2)[..., None, :]
  mask = (qi > kj) if strict else (qi >= kj)
  mask &= (qi >= 0) & (kj < K_PAD)
  if q_hash is not None:
    k_hash = _repeat_heads(k_hash, heads)
    mask &= jnp.swapaxes(q_hash, 1, 2)[..., :, None] == jnp.swapaxes(k_hash, 1, 2)[..., None, :]
  if q_segment_ids is not None:
    qs, ks = q_segment_ids[:, None, :, None], k_segment_ids[:, None, None, :]
    mask &= (qs == ks) & (qs >= 0)
  return mask


def masked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float | None = None
) -> jax.Array:
  """Softmax attention in float32 under a bool [B, N, T, S] mask; rows with no key give 0.

  k, v: [B, S, N, H], or [B, S, K, H] with K dividing N (repeated here).
  """
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  k, v = _repeat_heads(k, q.shape[2]), _repeat_heads(v, q.shape[2])
  s = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
  s = jnp.where(mask, s, -jnp.inf)
  row_max = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  return jnp.einsum("bnts,bsnh->btnh", p, v.astype(jnp.float32)).astype(q.dtype)


def sparse_causal_attention(
    q, k, v, *, q_idx, k_idx, q_hash=None, k_hash=None, strict=False, scale=None, q_segment_ids=None,
    k_segment_ids=None,
) -> jax.Array:
  """Reference for `scfa_jax.sparse_causal_attention` (any token order); segment ids as in
  `allowed_mask`."""
  mask = allowed_mask(
      q_idx, k_idx, q_hash, k_hash, strict=strict, q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids
  )
  return masked_attention(q, k, v, mask, scale=scale)


def _positions(batch: int, length: int, heads: int) -> jax.Array:
  return jnp.broadcast_to(jnp.arange(length)[None, :, None], (batch, length, heads))


def qk_sparse_attention(
    q, k, v, *, q_keep, k_keep, scale=None, q_segment_ids=None, k_segment_ids=None
) -> jax.Array:
  """Reference for `scfa_jax.qk_sparse_attention`: causal on original positions."""
  q_idx = jnp.where(q_keep, _positions(*q_keep.shape), -1)
  k_idx = jnp.where(k_keep, _positions(*k_keep.shape), K_PAD)
  return sparse_causal_attention(
      q, k, v, q_idx=q_idx, k_idx=k_idx, scale=scale, q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids
  )


def hash_sparse_attention(
    q, k, v, *, q_buckets, k_buckets, strict=False, scale=None, q_segment_ids=None, k_segment_ids=None
):
  """Reference for `scfa_jax.hash_sparse_attention`: same bucket and causal."""
  return sparse_causal_attention(
      q, k, v,
      q_idx=_positions(*q_buckets.shape), k_idx=_positions(*k_buckets.shape),
      q_hash=q_buckets, k_hash=k_buckets, strict=strict, scale=scale,
      q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids,
  )  # fmt: skip
