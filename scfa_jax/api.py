"""Public functions: validate, sort in jnp, call the one custom_vjp in `core`.

Layout and conventions follow `jax.nn.dot_product_attention`: q [B, T, N, H],
k and v [B, S, K, H] with K dividing N (grouped-query attention: query head n reads kv
head n // (N // K); K = N is plain multi-head); masks, buckets and indices [B, T, N] /
[B, S, K]; everything after the arrays keyword-only; `scale=None` means 1/sqrt(H).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from scfa_jax import core, sorting

_FLOAT_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)
_IMPLEMENTATIONS = (None, "xla", "triton", "interpret")


def _shape_of(name: str, x) -> tuple[int, ...]:
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name} must be an array, got {type(x).__name__}")
  return tuple(x.shape)


def _check_qkv(q, k, v) -> None:
  for name, x in (("q", q), ("k", k), ("v", v)):
    shape = _shape_of(name, x)
    if len(shape) != 4:
      raise ValueError(f"{name} must have rank 4 ([B, T, N, H] / [B, S, K, H]), got {name}.shape={shape}")
    if x.dtype not in _FLOAT_DTYPES:
      raise TypeError(f"{name} must be float32, float16 or bfloat16, got {name}.dtype={x.dtype}")
    if 0 in shape:
      raise ValueError(f"{name} must not have an empty axis, got {name}.shape={shape}")
  if not q.dtype == k.dtype == v.dtype:
    raise TypeError(f"q, k, v must share a dtype, got {q.dtype=}, {k.dtype=}, {v.dtype=}")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got {k.shape=}, {v.shape=}")
  (b, _, n, h), (bk, _, kv_heads, hk) = q.shape, k.shape
  if (b, h) != (bk, hk):
    raise ValueError(f"q [B, T, N, H] and k [B, S, K, H] must agree on B and H, got {q.shape=}, {k.shape=}")
  if n % kv_heads:
    raise ValueError(
        f"k and v must have K heads dividing q's N heads, got {q.shape=}, {k.shape=} "
        "(grouped-query attention: query head n reads kv head n // (N // K))"
    )


def _token_shape(x: jax.Array) -> tuple[int, int, int]:
  """The [B, T, N] shape of per-token arrays that go with q [B, T, N, H] ([B, S, K] with k [B, S, K, H])."""
  b, length, n, _ = x.shape
  return (b, length, n)


def _check_tokens(name: str, x, expected: tuple[int, ...], kind: str) -> None:
  shape = _shape_of(name, x)
  if shape != expected:
    letters = "[B, T, N]" if name.startswith("q") else "[B, S, K]"
    raise ValueError(f"{name} must have shape {letters} = {expected}, got {name}.shape={shape}")
  if kind == "bool" and x.dtype != jnp.bool_:
    raise TypeError(f"{name} must be a bool mask, got {name}.dtype={x.dtype}")
  if kind == "int" and not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name} must hold integers, got {name}.dtype={x.dtype}")


def _check_non_negative(name: str, x) -> None:
  """Checks values when they are known (outside jit); traced values cannot be checked."""
  if isinstance(x, jax.core.Tracer):
    return
  smallest = int(np.min(np.asarray(x))) if x.size else 0
  if smallest < 0:
    raise ValueError(f"{name} must be non-negative bucket ids, got min({name})={smallest}")


def _check_segments(q_segment_ids, k_segment_ids, q, k) -> None:
  if (q_segment_ids is None) != (k_segment_ids is None):
    raise ValueError("q_segment_ids and k_segment_ids must be given together (or both left None)")
  if q_segment_ids is None:
    return
  check_segment_ids("q_segment_ids", q_segment_ids, q.shape[:2], "[B, T]")
  check_segment_ids("k_segment_ids", k_segment_ids, k.shape[:2], "[B, S]")


def check_segment_ids(name: str, x, expected: tuple[int, int], letters: str = "[B, T]") -> None:
  """Raises unless x is an integer array of shape `expected` (segment ids of packed documents)."""
  shape = _shape_of(name, x)
  if shape != expected:
    raise ValueError(f"{name} must have shape {letters} = {expected}, got {name}.shape={shape}")
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name} must hold integers, got {name}.dtype={x.dtype}")


def _resolve_implementation(implementation, q: jax.Array) -> core.Implementation:
  if implementation not in _IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {_IMPLEMENTATIONS}, got {implementation=}")
  if implementation == "xla":
    return "xla"
  from scfa_jax import triton_backend  # noqa: PLC0415  (only touches jax_triton lazily)

  if implementation is None:
    return "triton" if triton_backend.default_available(q) else "xla"
  triton_backend.check_supported(implementation, q)
  return implementation


def _config(q, strict, scale, implementation) -> core.AttentionConfig:
  if not isinstance(strict, (bool, np.bool_)):
    raise TypeError(f"strict must be a bool, got {strict=}")
  if scale is None:
    scale = q.shape[-1] ** -0.5
  elif isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
    raise TypeError(f"scale must be a Python float or None, got {type(scale).__name__}")
  return core.AttentionConfig(
      implementation=_resolve_implementation(implementation, q),
      strict=bool(strict),
      scale=float(scale),
  )


def sparse_causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_idx: jax.Array,
    k_idx: jax.Array,
    q_hash: jax.Array | None = None,
    k_hash: jax.Array | None = None,
    strict: bool = False,
    scale: float | None = None,
    implementation: core.Implementation | None = None,
) -> jax.Array:
  """SCFA on tokens the caller already sorted (the primitive of docs/design.md).

  Query i may attend key j iff causal(q_idx[i], k_idx[j]) and, when hashes are given,
  q_hash[i] == k_hash[j]; causal is `>` if strict else `>=`. q_idx < 0 marks a query
  that attends to nothing and k_idx >= 2**30 a key nobody attends to. Within each
  (batch, head), tokens should be sorted by (hash, idx) with padding last: any order
  gives the exact result, but sorting is what makes the kernels skip work.

  There are no segment ids here: for packed documents, fold the document into the hash
  (e.g. document * num_buckets + bucket, or the document alone without buckets) and sort
  by (document, bucket, idx); a query then attends only keys of its own document.

  Args:
    q: [B, T, N, H]. k, v: [B, S, K, H], K dividing N: query head n attends with kv
      head n // (N // K) (grouped-query attention; K = 1 is multi-query), whose dK and
      dV sum over its N // K query heads. k and v are never repeated in memory.
    q_idx: int [B, T, N]. k_idx: int [B, S, K].
    q_hash, k_hash: int [B, T, N] and [B, S, K], both or neither.
    strict: strict causality (`>`), as in the paper's shared-QK language model.
    scale: logit scale, 1/sqrt(H) when None.
    implementation: None (Triton on GPU when available, else XLA), "xla", "triton",
      or "interpret" (the Triton kernels in Triton's CPU interpreter).

  Returns:
    [B, T, N, H] in q's dtype; rows with no allowed key are 0.
  """
  _check_qkv(q, k, v)
  _check_tokens("q_idx", q_idx, _token_shape(q), "int")
  _check_tokens("k_idx", k_idx, _token_shape(k), "int")
  if (q_hash is None) != (k_hash is None):
    raise ValueError("q_hash and k_hash must be given together (or both left None)")
  if q_hash is not None:
    _check_tokens("q_hash", q_hash, _token_shape(q), "int")
    _check_tokens("k_hash", k_hash, _token_shape(k), "int")
  config = _config(q, strict, scale, implementation)
  return core.attention(q, k, v, sorting.presorted(q_idx, k_idx, q_hash, k_hash), config)


def qk_sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_keep: jax.Array,
    k_keep: jax.Array,
    q_segment_ids: jax.Array | None = None,
    k_segment_ids: jax.Array | None = None,
    scale: float | None = None,
    implementation: core.Implementation | None = None,
) -> jax.Array:
  """Causal attention among kept queries and keys (paper section 3.1, QK-dropping).

  Query t attends key s iff q_keep[t], k_keep[s] and t >= s, per (batch, query head and
  its kv head), and, with segment ids, q_segment_ids[t] == k_segment_ids[s]. Dropped
  queries output 0.

  Args:
    q: [B, T, N, H]. k, v: [B, S, K, H], K dividing N (grouped-query attention, as in
      `sparse_causal_attention`).
    q_keep: bool [B, T, N]. k_keep: bool [B, S, K]: a kv head's keys are kept or dropped
      for all the query heads of its group.
    q_segment_ids, k_segment_ids: int [B, T] and [B, S], both or neither: packed
      documents; a query attends only keys of its own segment. Negative ids are padding:
      they attend to nothing (output and gradients 0) and nothing attends to them.
    scale, implementation: as in `sparse_causal_attention`.
  """
  _check_qkv(q, k, v)
  _check_tokens("q_keep", q_keep, _token_shape(q), "bool")
  _check_tokens("k_keep", k_keep, _token_shape(k), "bool")
  _check_segments(q_segment_ids, k_segment_ids, q, k)
  config = _config(q, False, scale, implementation)
  with jax.named_scope("scfa_sort"):
    tokens = sorting.by_keep_mask(q_keep, k_keep, q_segment_ids, k_segment_ids)
  return core.attention(q, k, v, tokens, config)


def hash_sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_buckets: jax.Array,
    k_buckets: jax.Array,
    q_segment_ids: jax.Array | None = None,
    k_segment_ids: jax.Array | None = None,
    strict: bool = False,
    scale: float | None = None,
    implementation: core.Implementation | None = None,
) -> jax.Array:
  """Causal attention inside buckets (paper section 3.2, hash-sparse).

  Query t attends key s iff q_buckets[t] == k_buckets[s] and t >= s (t > s if strict),
  and, with segment ids, q_segment_ids[t] == k_segment_ids[s]. Exact attention
  restricted to bucket collisions; a query whose bucket holds no earlier key outputs 0.

  Args:
    q: [B, T, N, H]. k, v: [B, S, K, H], K dividing N (grouped-query attention, as in
      `sparse_causal_attention`).
    q_buckets: int [B, T, N]. k_buckets: int [B, S, K]; any non-negative ints,
      e.g. from `lsh_buckets`. (Values are checked outside jit only.) The sort is a
      radix sort over the buckets' own dtype: uint8, which `lsh_buckets` gives for up
      to 256 buckets, takes one pass; int32 four.
    q_segment_ids, k_segment_ids: int [B, T] and [B, S], both or neither: packed
      documents; a query attends only keys of its own segment, and the tile plan skips
      the tiles between documents. Negative ids are padding: they attend to nothing
      (output and gradients 0) and nothing attends to them. With segment ids the sort key
      is int32 (segment rank and bucket in one key; two more sorts for buckets wider than
      16 bits).
    strict, scale, implementation: as in `sparse_causal_attention`.
  """
  _check_qkv(q, k, v)
  _check_tokens("q_buckets", q_buckets, _token_shape(q), "int")
  _check_tokens("k_buckets", k_buckets, _token_shape(k), "int")
  _check_non_negative("q_buckets", q_buckets)
  _check_non_negative("k_buckets", k_buckets)
  _check_segments(q_segment_ids, k_segment_ids, q, k)
  config = _config(q, strict, scale, implementation)
  with jax.named_scope("scfa_sort"):
    tokens = sorting.by_bucket(q_buckets, k_buckets, q_segment_ids, k_segment_ids)
  return core.attention(q, k, v, tokens, config)
