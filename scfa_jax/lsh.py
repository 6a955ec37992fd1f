"""Angular locality-sensitive hashing, as in the paper's hash-sparse language model."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def random_rotations(key: jax.Array, num_heads: int, head_dim: int, num_buckets: int) -> jax.Array:
  """Gaussian projections for `lsh_buckets`: float32 [N, H, num_buckets // 2].

  num_buckets must be even and positive: each projection direction r yields two buckets,
  one for x.r and one for -x.r.
  """
  for name, value in (("num_heads", num_heads), ("head_dim", head_dim), ("num_buckets", num_buckets)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  if num_buckets % 2:
    raise ValueError(f"num_buckets must be even (buckets come in +/- pairs), got {num_buckets=}")
  return jax.random.normal(key, (num_heads, head_dim, num_buckets // 2), jnp.float32)


def bucket_dtype(num_buckets: int) -> jnp.dtype:
  """The narrowest unsigned dtype that holds ids in [0, num_buckets).

  The sort in `hash_sparse_attention` is a radix sort whose passes follow the key width:
  uint8 buckets sort in one pass, int32 ones in four.
  """
  for dtype in (jnp.uint8, jnp.uint16):
    if num_buckets <= jnp.iinfo(dtype).max + 1:
      return jnp.dtype(dtype)
  return jnp.dtype(jnp.int32)


def causal_center(x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
  """Unit vectors minus the mean of the earlier ones: u[t] - mean_{s < t} u[s], u = x / |x|.

  float32 [B, T, N, H] for x [B, T, N, H] (the first position keeps u[0]). Transformer
  activations share a direction across tokens (already at initialisation: the GELU's
  positive mean reaches every token through the residual stream), and angular LSH of
  such vectors puts most tokens into a few buckets; in the 122M GPT at initialisation
  the deeper layers' buckets hold 3x the pairs of uniform ones. Hashing the centered
  vectors keeps the buckets near uniform. The mean runs over earlier positions only, so
  a token's bucket never depends on the tokens after it.

  segment_ids (int [B, T], packed documents): the mean starts over wherever the id
  changes, so that a document's buckets do not depend on the documents before it.
  """
  if x.ndim != 4:
    raise ValueError(f"x must be [B, T, N, H], got x.shape={x.shape}")
  unit = unit_vectors(x)
  earlier = jnp.cumsum(unit, axis=1) - unit
  position = jnp.arange(x.shape[1], dtype=jnp.int32)[None]
  if segment_ids is not None:
    changed = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    run_start = jax.lax.cummax(jnp.where(changed, position, 0), axis=1)  # [B, T]
    earlier -= jnp.take_along_axis(earlier, run_start[..., None, None], axis=1)
    position = position - run_start
  count = jnp.maximum(position.astype(jnp.float32), 1.0)[..., None, None]
  return unit - earlier / count


def unit_vectors(x: jax.Array) -> jax.Array:
  """x / |x| over the last axis, in float32 (0 stays 0)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def causal_center_next(x: jax.Array, earlier_sum: jax.Array, position) -> tuple[jax.Array, jax.Array]:
  """`causal_center` of one more position, for decoding: (centered, earlier_sum + unit).

  x: [B, 1, N, H] at `position` (an int or int32 scalar); earlier_sum: float32 [B, N, H],
  the sum of the unit vectors of positions 0 .. position - 1. Returns float32 [B, 1, N, H]
  and the sum that the next position needs.
  """
  unit = unit_vectors(x)
  count = jnp.maximum(jnp.asarray(position, jnp.float32), 1.0)
  return unit - (earlier_sum / count)[:, None], earlier_sum + unit[:, 0]


def lsh_buckets(x: jax.Array, rotations: jax.Array) -> jax.Array:
  """Bucket ids argmax([xR, -xR]) per token and head: [B, T, N] in [0, 2 * R).

  The dtype is `bucket_dtype(2 * R)`: uint8 up to 256 buckets.

  Args:
    x: [B, T, N, H] queries or keys.
    rotations: [N, H, R], e.g. from `random_rotations`.
  """
  if x.ndim != 4:
    raise ValueError(f"x must be [B, T, N, H], got x.shape={x.shape}")
  if rotations.ndim != 3 or rotations.shape[:2] != x.shape[2:]:
    raise ValueError(
        f"rotations must be [N, H, R] with (N, H) = {x.shape[2:]} from x, got {rotations.shape=}"
    )
  projected = jnp.einsum("btnh,nhr->btnr", x.astype(jnp.float32), rotations.astype(jnp.float32))
  buckets = jnp.argmax(jnp.concatenate([projected, -projected], axis=-1), axis=-1)
  return buckets.astype(bucket_dtype(2 * rotations.shape[-1]))
