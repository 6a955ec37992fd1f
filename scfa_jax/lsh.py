"""Angular locality-sensitive hashing, as in the paper's hash-sparse language model."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from scfa_jax import api


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
  if segment_ids is not None:
    api.check_segment_ids("segment_ids", segment_ids, x.shape[:2])
  unit = unit_vectors(x)
  return unit - _earlier_mean(unit, segment_ids)


def _earlier_mean(values: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
  """The mean of values [B, T, ...] over the earlier positions of the same run of segment ids
  (all positions when None; checked by the caller); 0 at the first position of a run."""
  earlier = jnp.cumsum(values, axis=1) - values
  position = jnp.arange(values.shape[1], dtype=jnp.int32)[None]
  if segment_ids is not None:
    changed = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    run_start = jax.lax.cummax(jnp.where(changed, position, 0), axis=1)  # [B, T]
    earlier -= jnp.take_along_axis(earlier, run_start[..., None, None], axis=1)
    position = position - run_start
  return earlier / jnp.maximum(position.astype(jnp.float32), 1.0)[..., None, None]


def unit_vectors(x: jax.Array) -> jax.Array:
  """x / |x| over the last axis, in float32 (0 stays 0)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def centered_buckets(
    x: jax.Array, rotations: jax.Array, segment_ids: jax.Array | None = None, *, implementation: str | None = None
) -> jax.Array:
  """`lsh_buckets(causal_center(x, segment_ids), rotations)`, centered after the projection.

  The centering is linear, so centering the R projections of the unit vectors equals
  projecting the centered vectors: the running mean then spans R values per token
  instead of H (8 instead of 64 for 16 buckets of 64-dim heads). Same shapes and dtype
  as `lsh_buckets`; equal buckets up to float rounding at near-ties.

  implementation: as in `hash_sparse_attention`. "triton" (the default on a GPU with
  jax-triton) and "interpret" run the one-pass kernel `kernels/lsh.py`, which reads x once
  instead of XLA's passes over float32 copies of it; "xla" runs the jnp below. The kernel
  takes the float32 projection at `jax.default_matmul_precision`, as XLA's product does.
  """
  _check_lsh_args(x, rotations)
  if segment_ids is not None:
    api.check_segment_ids("segment_ids", segment_ids, x.shape[:2])
  implementation = api._resolve_implementation(implementation, x)
  if implementation != "xla":
    from scfa_jax import triton_backend  # noqa: PLC0415

    out_dtype = bucket_dtype(2 * rotations.shape[-1])
    # Buckets are integers: no gradient flows through them, and the kernel has no JVP rule.
    x, rotations = jax.lax.stop_gradient(x), jax.lax.stop_gradient(rotations)
    return triton_backend.centered_buckets(implementation, x, rotations, segment_ids, out_dtype)
  projected = _project(unit_vectors(x), rotations)
  return _argmax_buckets(projected - _earlier_mean(projected, segment_ids))


def centered_buckets_next(
    x: jax.Array, rotations: jax.Array, earlier_sum: jax.Array, position
) -> tuple[jax.Array, jax.Array]:
  """`centered_buckets` of one more position, for decoding: (buckets [B, N], new sum).

  x: [B, N, H] at `position` (an int or int32 scalar); earlier_sum: float32 [B, N, R],
  the sum of the projected unit vectors of positions 0 .. position - 1.
  """
  projected = _project(unit_vectors(x)[:, None], rotations)[:, 0]  # [B, N, R]
  count = jnp.maximum(jnp.asarray(position, jnp.float32), 1.0)
  return _argmax_buckets(projected - earlier_sum / count), earlier_sum + projected


def projected_sum(x: jax.Array, rotations: jax.Array) -> jax.Array:
  """float32 [B, N, R]: the sum over positions of x's projected unit vectors, the
  `earlier_sum` that `centered_buckets_next` continues from after x [B, T, N, H]."""
  return jnp.sum(_project(unit_vectors(x), rotations), axis=1)


def lsh_buckets(x: jax.Array, rotations: jax.Array) -> jax.Array:
  """Bucket ids argmax([xR, -xR]) per token and head: [B, T, N] in [0, 2 * R).

  The dtype is `bucket_dtype(2 * R)`: uint8 up to 256 buckets.

  Args:
    x: [B, T, N, H] queries or keys.
    rotations: [N, H, R], e.g. from `random_rotations`.
  """
  _check_lsh_args(x, rotations)
  return _argmax_buckets(_project(x, rotations))


def _check_lsh_args(x, rotations):
  if x.ndim != 4:
    raise ValueError(f"x must be [B, T, N, H], got x.shape={x.shape}")
  if rotations.ndim != 3 or rotations.shape[:2] != x.shape[2:]:
    raise ValueError(
        f"rotations must be [N, H, R] with (N, H) = {x.shape[2:]} from x, got {rotations.shape=}"
    )


def _project(x, rotations):
  return jnp.einsum("...nh,nhr->...nr", x.astype(jnp.float32), rotations.astype(jnp.float32))


def _argmax_buckets(projected):
  buckets = jnp.argmax(jnp.concatenate([projected, -projected], axis=-1), axis=-1)
  return buckets.astype(bucket_dtype(2 * projected.shape[-1]))
