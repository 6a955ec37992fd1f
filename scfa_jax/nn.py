"""Flax NNX causal self-attention with SCFA sparsity: the layer the GPT is built from.

Attention itself is one of the public functions in `scfa_jax.api` (or
`jax.nn.dot_product_attention` in dense mode); this module only owns projections,
the random rotation / keep-mask draws, the `shard_map` over the batch axis that
jax-triton calls need under a mesh (they have no partitioning rule), and the layer's
side of decoding with a key/value cache (the attention of a step is in `scfa_jax.decode`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from scfa_jax import api, decode, lsh

Mode = Literal["dense", "hash", "qk_drop"]
MODES = ("dense", "hash", "qk_drop")
IMPLEMENTATIONS = (None, "xla", "triton", "interpret", "cudnn")
DATA_AXIS = "data"
"""Mesh axis that the batch is split over; attention is shard_mapped over it when present."""


def batch_sharded(fn):
  """Wraps fn (arrays with a leading batch axis in and out) in shard_map over 'data'.

  Only when a mesh with a 'data' axis of size > 1 is active (`jax.set_mesh`);
  otherwise returns fn unchanged. Each device then runs attention on its own batch
  rows, which is exact because attention never mixes batch rows.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or DATA_AXIS not in mesh.axis_names or mesh.shape[DATA_AXIS] == 1:
    return fn
  # check_vma=False: jax-triton kernels (custom calls) carry no varying-axes type, and
  # custom_vjp would reject their gradients under the check.
  return jax.shard_map(fn, in_specs=P(DATA_AXIS), out_specs=P(DATA_AXIS), check_vma=False)


def bucket_sizes(buckets: jax.Array, num_buckets: int) -> jax.Array:
  """int32 [B, N, num_buckets]: how many tokens of each (batch, head) fall in each bucket."""
  return jnp.sum(jax.nn.one_hot(buckets, num_buckets, dtype=jnp.int32), axis=1)


def rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotary position embedding of x [B, T, N, H] at positions int [T] or [B, T]: the pairs (x[i],
  x[i + H/2]) rotate by position * base**(-2i/H), so that the product of a query and a key
  depends on their offset, not on where they are. Computed in float32, returned in x's dtype.
  Rotations keep norms: shared-QK keys (unit queries) stay the unit rotated queries."""
  half = x.shape[-1] // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq  # [(B,) T, H/2]
  cos, sin = jnp.cos(angle)[..., None, :], jnp.sin(angle)[..., None, :]  # [(B,) T, 1, H/2]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


def keep_mask(key: jax.Array, drop_rate: float, shape: tuple[int, int, int]) -> jax.Array:
  """One qk_drop draw: bool [B, T, N], True where (batch, position, head) is kept.

  Position t's column is `bernoulli(fold_in(key, t), 1 - drop_rate, (B, N))`, so the mask
  of a prefix does not depend on how long the sequence is: decoding token by token meets
  the mask of one call on the whole sequence.
  """
  batch, length, heads = shape
  def draw(t):
    return jax.random.bernoulli(jax.random.fold_in(key, t), 1.0 - drop_rate, (batch, heads))

  return jnp.moveaxis(jax.vmap(draw)(jnp.arange(length)), 0, 1)


def keep_masks(
    key: jax.Array, drop_rate: float, q_shape: tuple[int, int, int], k_shape: tuple[int, int, int]
) -> tuple[jax.Array, jax.Array]:
  """qk_drop's two draws: (q_keep bool [B, T, N], k_keep bool [B, S, K]).

  As in the paper, queries and keys are dropped independently: q_keep is `keep_mask` of
  the first key of `jax.random.split(key)`, k_keep of the second. Each keeps
  `keep_mask`'s prefix property, so a cache of any length and a call agree on the
  positions they share.
  """
  q_key, k_key = jax.random.split(key)
  return keep_mask(q_key, drop_rate, q_shape), keep_mask(k_key, drop_rate, k_shape)


def _draw_key(rngs, stream) -> jax.Array:
  if isinstance(rngs, nnx.Rngs):
    return rngs[stream]()
  if isinstance(rngs, nnx.RngStream):
    return rngs()
  if isinstance(rngs, jax.Array):
    return rngs
  raise TypeError(f"rngs must be nnx.Rngs, nnx.RngStream or a key, got {type(rngs).__name__}")


class SparseCausalSelfAttention(nnx.Module):
  """Causal multi-head self-attention, dense or SCFA-sparse: [B, T, D] -> [B, T, D].

  Modes:
    "dense": `jax.nn.dot_product_attention(is_causal=True)`, with cuDNN on a GPU
      for bf16/f16 compute (jax.nn's default would be XLA): the honest baseline.
    "hash": fresh random LSH rotations on every call (`num_buckets` buckets per
      head); a query attends the earlier keys of its bucket (`hash_sparse_attention`).
    "qk_drop": each query (batch, token, head) and, independently, each key
      (batch, token, kv head) is dropped with probability `drop_rate`
      (`qk_sparse_attention`, masks from `keep_masks`); a query attends the earlier kept
      keys, and a dropped query, or one with no kept key up to its position, outputs 0.

  With `shared_qk` (the paper's language model, after Reformer) there is no key
  projection: keys are the L2-normalised queries, and hash mode uses strict
  causality (t > s), since a token would otherwise mostly attend to itself.

  Grouped-query attention: `num_kv_heads` K < N projects keys and values to K heads, which
  query head n reads as head n // (N // K); the decoding cache holds K heads. Hash mode draws
  its rotations per kv head, and the queries of a group hash with their kv head's rotations,
  so that a query and the keys it may meet share one hash function. qk_drop draws its query
  keep mask per query head and its key keep mask per kv head: a dropped (token, kv head) key
  is seen by no query head of its group. shared_qk needs K = N (keys are the queries, one per
  query head).

  With `center_hash`, hash mode buckets `lsh.causal_center(q)` instead of q: the
  paper's argmax LSH of raw queries puts most tokens of a deep layer into a few
  buckets (a direction all tokens share), which costs both the sparsity that makes
  the kernels fast and the balance that makes buckets informative.

  Randomness comes from the `rng_collection` stream of the `rngs` given to the
  constructor, or from `rngs` passed to `__call__` (which takes precedence; the
  training loop passes keys derived from (seed, step), so runs are reproducible).
  The layer has no eval switch: hash and qk_drop stay sparse at evaluation, as the
  model is meant to run; pass a fixed key to make evaluation deterministic, or use
  drop_rate=0.0 for plain causal attention.

  Packed documents: `segment_ids` (int [B, T]) keep each token's attention inside its
  own document in every mode (negative ids are padding: those rows output 0), and hash
  mode's centering starts over at each document. Decoding takes one document per row.

  Decoding: `init_cache` makes a cache of fixed length and draws the rotations or keep
  masks once; `prefill` attends a prompt and fills the cache; `decode_step` attends one
  new token against it. The outputs are those of a call on the whole sequence with the
  same key.

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> layer = SparseCausalSelfAttention(width=64, num_heads=2, mode="hash",
    ...                                   num_buckets=4, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 16, 64))).shape
    (2, 16, 64)
  """

  def __init__(
      self,
      *,
      width: int,
      num_heads: int,
      num_kv_heads: int | None = None,
      mode: Mode = "hash",
      num_buckets: int = 16,
      drop_rate: float = 0.0,
      shared_qk: bool = True,
      center_hash: bool = True,
      rope_base: float | None = None,
      implementation: str | None = None,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      init_std: float = 0.02,
      out_init_std: float | None = None,
      rng_collection: str = "attention",
      rngs: nnx.Rngs,
  ):
    """Args:
      width: model width D (input and output features).
      num_heads: N; must divide width, head dim H = width // N.
      num_kv_heads: K key/value heads, dividing N (grouped-query attention; 1 is multi-query);
        None means N. With K = N the parameters and outputs are those of plain multi-head.
      mode: "dense", "hash" or "qk_drop".
      num_buckets: hash buckets per head (even: buckets come in +/- pairs).
      drop_rate: qk_drop probability of dropping a token from a head, in [0, 1).
      shared_qk: keys are the L2-normalised queries (no key projection).
      center_hash: hash mode buckets the causally centered queries and keys
        (`lsh.causal_center`); False hashes them as they are, as the paper does.
      rope_base: rotate queries and keys by their positions (rotary embedding, `rope`)
        with this base, e.g. 10000.0, before attention and hashing; None: no rotation.
      implementation: passed to the scfa_jax functions (None, "xla", "triton",
        "interpret"); in dense mode "xla" and "cudnn" go to jax.nn, and the others
        mean cuDNN on a GPU with bf16/f16 compute, else XLA.
      dtype: compute dtype (e.g. bfloat16); params stay in param_dtype.
      init_std: std of the q/k/v projections' normal init.
      out_init_std: std of the output projection (residual branch); init_std if None.
      rng_collection: name of the nnx.Rngs stream for rotations and keep masks.
      rngs: params are drawn from rngs.params(); the attention stream is forked.
    """
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {mode=}")
    if not isinstance(num_heads, int) or num_heads < 1 or not isinstance(width, int) or width < 1:
      raise ValueError(f"width and num_heads must be positive ints, got {width=}, {num_heads=}")
    if width % num_heads:
      raise ValueError(f"num_heads must divide width, got {width=}, {num_heads=}")
    num_kv_heads = check_kv_heads(num_heads, num_kv_heads, shared_qk)
    if mode == "hash" and (not isinstance(num_buckets, int) or num_buckets < 2 or num_buckets % 2):
      raise ValueError(f"num_buckets must be an even int >= 2 (+/- pairs), got {num_buckets=}")
    if not 0.0 <= drop_rate < 1.0:
      raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate=}")
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation=}")
    if rope_base is not None and not (isinstance(rope_base, (int, float)) and rope_base > 1):
      raise ValueError(f"rope_base must be a number > 1 or None, got {rope_base=}")
    if rope_base is not None and (width // num_heads) % 2:
      raise ValueError(f"rope_base needs an even head dim, got {width=} // {num_heads=}")
    if implementation == "cudnn" and mode != "dense":
      raise ValueError(f"implementation='cudnn' only applies to mode='dense', got {mode=}")
    self.mode, self.num_buckets, self.drop_rate = mode, num_buckets, drop_rate
    self.shared_qk, self.center_hash, self.implementation = shared_qk, center_hash, implementation
    self.rope_base = rope_base
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, width // num_heads
    # When True, hash mode sows its bucket sizes (`bucket_sizes`) for `nnx.capture`.
    self.record_buckets = False
    self.dtype, self.rng_collection = dtype, rng_collection
    init = nnx.initializers.normal(init_std)
    out_init = nnx.initializers.normal(init_std if out_init_std is None else out_init_std)
    heads, kv_heads = (width, num_heads, self.head_dim), (width, num_kv_heads, self.head_dim)
    self.wq = nnx.Param(init(rngs.params(), heads, param_dtype))
    self.wk = None if shared_qk else nnx.Param(init(rngs.params(), kv_heads, param_dtype))
    self.wv = nnx.Param(init(rngs.params(), kv_heads, param_dtype))
    self.wo = nnx.Param(out_init(rngs.params(), (num_heads, self.head_dim, width), param_dtype))
    try:
      self.rngs = rngs[rng_collection].fork()
    except KeyError:  # neither that stream nor a default one: rngs must come with each call
      self.rngs = nnx.data(None)

  def __call__(
      self,
      x: jax.Array,
      *,
      segment_ids: jax.Array | None = None,
      positions: jax.Array | None = None,
      rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
  ) -> jax.Array:
    """x: [B, T, D] -> [B, T, D]. rngs overrides the stream given at construction.

    segment_ids: int [B, T] or None: packed documents; a token attends only earlier tokens
    of its own segment, and negative ids are padding (output rows 0).
    positions: int [T] or [B, T] for the rotary embedding (rope_base); None: 0 .. T-1.
    """
    if segment_ids is not None:
      api.check_segment_ids("segment_ids", segment_ids, x.shape[:2])
    q, k, v = self._project(x, jnp.arange(x.shape[1]) if positions is None else positions)
    if self.mode == "dense":
      out = self._dense(q, k, v, segment_ids)
    elif self.mode == "hash":
      with jax.named_scope("lsh"):
        rotations = lsh.random_rotations(self._key(rngs), self.num_kv_heads, self.head_dim, self.num_buckets)
      buckets = self._buckets(q, k, rotations, segment_ids)
      if self.record_buckets:
        self.sow(nnx.Intermediate, "bucket_sizes", bucket_sizes(buckets[0], self.num_buckets))
      out = self._hash(q, k, v, buckets, segment_ids)
    else:
      q_keep, k_keep = keep_masks(self._key(rngs), self.drop_rate, q.shape[:3], k.shape[:3])
      out = self._qk_drop(q, k, v, q_keep, k_keep, segment_ids)
    return self._out(out)

  def init_cache(
      self,
      batch_size: int,
      max_length: int,
      *,
      rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
      page_size: int | None = None,
  ) -> decode.AttentionCache:
    """An empty cache of max_length positions for `prefill` and `decode_step`.

    Hash mode draws its rotations here and qk_drop its query and key keep masks for all
    max_length positions, once, from rngs (the layer's own stream when None): every step
    of the generation uses them, so that the tokens are those of calling the layer on the
    whole sequence with the same key.

    page_size (hash mode only): keep keys and values in pages of page_size rows grouped
    by bucket (`decode.BucketPages`), so that a decode step reads only the keys of its
    query's bucket. None keeps them in position order; each step then reads all of them
    under a mask, which is faster while the cache is short.
    """
    for name, value in (("batch_size", batch_size), ("max_length", max_length)):
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
    if page_size is not None:
      if self.mode != "hash":
        raise ValueError(f"page_size groups keys by bucket: it needs mode='hash', got mode={self.mode!r}")
      if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < 1:
        raise ValueError(f"page_size must be a positive int or None, got {page_size=}")
    b, n, kv_heads, h = batch_size, self.num_heads, self.num_kv_heads, self.head_dim
    rows = jnp.zeros((b, max_length, kv_heads, h), self.dtype)  # K heads: what grouped-query attention saves
    fields = dict(length=jnp.zeros((), jnp.int32), max_length=max_length, k=rows, v=rows)
    if self.mode == "qk_drop":
      fields["q_keep"], fields["k_keep"] = keep_masks(
          self._key(rngs), self.drop_rate, (b, max_length, n), (b, max_length, kv_heads)
      )
    elif self.mode == "hash":
      fields["rotations"] = lsh.random_rotations(self._key(rngs), kv_heads, h, self.num_buckets)
      if page_size is None:
        fields["k_buckets"] = jnp.zeros((b, max_length, kv_heads), lsh.bucket_dtype(self.num_buckets))
      else:
        fields.update(k=None, v=None)
        fields["pages"] = decode.empty_pages(
            b, kv_heads, h, self.num_buckets, max_length, page_size, self.dtype
        )
      if self.center_hash:
        r = self.num_buckets // 2
        fields["q_projected_sum"] = jnp.zeros((b, n, r), jnp.float32)
        fields["k_projected_sum"] = None if self.shared_qk else jnp.zeros((b, kv_heads, r), jnp.float32)
    return decode.AttentionCache(**fields)

  def prefill(self, x: jax.Array, cache: decode.AttentionCache) -> tuple[jax.Array, decode.AttentionCache]:
    """Attends the prompt x [B, T, D] (positions 0 .. T-1) and fills the cache with it.

    Returns (y [B, T, D], cache of length T). y is the layer's output for x with the
    cache's rotations or keep masks, computed by the same attention function as a call.
    The cache starts over: what it held before is dropped.
    """
    length = x.shape[1]
    if length > cache.max_length:
      raise ValueError(f"x holds {length} positions, more than the cache's max_length={cache.max_length}")
    q, k, v = self._project(x, jnp.arange(length))
    changes = dict(length=jnp.asarray(length, jnp.int32))
    if self.mode == "dense":
      out = self._dense(q, k, v)
    elif self.mode == "qk_drop":
      out = self._qk_drop(q, k, v, cache.q_keep[:, :length], cache.k_keep[:, :length])
    else:
      buckets = self._buckets(q, k, cache.rotations)
      out = self._hash(q, k, v, buckets)
      if cache.pages is not None:
        changes["pages"] = decode.fill_pages(cache.pages, k, v, buckets[-1])
      else:
        changes["k_buckets"] = cache.k_buckets.at[:, :length].set(buckets[-1])
      if self.center_hash:
        changes["q_projected_sum"] = lsh.projected_sum(q, self._query_rotations(cache.rotations))
        if not self.shared_qk:
          changes["k_projected_sum"] = lsh.projected_sum(k, cache.rotations)
    if cache.k is not None:
      changes["k"] = cache.k.at[:, :length].set(k.astype(cache.k.dtype))
      changes["v"] = cache.v.at[:, :length].set(v.astype(cache.v.dtype))
    return self._out(out), dataclasses.replace(cache, **changes)

  def decode_step(
      self, x: jax.Array, cache: decode.AttentionCache
  ) -> tuple[jax.Array, decode.AttentionCache]:
    """One new token per row, x [B, 1, D] at position cache.length: (y [B, 1, D], cache one longer).

    y equals the last row of the layer's output on the whole sequence so far (same
    rotations or keep masks), up to float rounding; a row that may attend to nothing gives
    exactly 0 there as here. jnp only (`decode.masked_attention` or, with bucket pages,
    `decode.bucket_attention`), whatever the implementation. A step into a full cache
    (length == max_length) returns NaN: nothing can raise inside jit.
    """
    if x.ndim != 3 or x.shape[1] != 1:
      raise ValueError(f"x must be one token per row, [B, 1, D], got x.shape={x.shape}")
    q, k, v = self._project(x, cache.length[None])
    q, k, v = q[:, 0], k[:, 0], v[:, 0]  # [B, N, H] and [B, K, H]
    position, scale = cache.length, self.head_dim**-0.5
    changes = dict(length=position + 1)
    if cache.k is not None:
      def write(rows, row):
        return jax.lax.dynamic_update_index_in_dim(rows, row.astype(rows.dtype), position, 1)

      changes.update(k=write(cache.k, k), v=write(cache.v, v))
    earlier = jnp.arange(cache.max_length) < position  # [L]
    causal = jnp.arange(cache.max_length) <= position
    with jax.named_scope("attention_core"):
      if self.mode == "dense":
        out = decode.masked_attention(q, changes["k"], changes["v"], causal[None, None], scale=scale)
      elif self.mode == "qk_drop":
        # Keys s <= position kept for the kv head, and the query's own keep at position.
        k_keep = self._per_query_head(jnp.swapaxes(cache.k_keep, 1, 2))  # [B, N, L]
        q_keep = jax.lax.dynamic_index_in_dim(cache.q_keep, position, 1, keepdims=False)  # [B, N]
        allowed = causal & k_keep & q_keep[..., None]
        out = decode.masked_attention(q, changes["k"], changes["v"], allowed, scale=scale)
      else:
        q_bucket, k_bucket, sums = self._next_buckets(q, k, cache)
        changes.update(sums)
        if cache.pages is None:
          changes["k_buckets"] = jax.lax.dynamic_update_index_in_dim(cache.k_buckets, k_bucket, position, 1)
          # Shared-QK keys are the queries: strict causality, a token never attends to itself.
          k_buckets = jnp.swapaxes(changes["k_buckets"], 1, 2)[:, :, None]  # [B, K, 1, L]
          same_bucket = k_buckets == self._grouped(q_bucket)[..., None]
          allowed = (earlier if self.shared_qk else causal) & same_bucket.reshape(q_bucket.shape + (-1,))
          out = decode.masked_attention(q, changes["k"], changes["v"], allowed, scale=scale)
        elif self.shared_qk:  # strict: read the bucket before the token's own key joins it
          out = decode.bucket_attention(q, cache.pages, q_bucket, scale=scale)
          changes["pages"] = decode.append_to_pages(cache.pages, k, v, k_bucket)
        else:
          changes["pages"] = decode.append_to_pages(cache.pages, k, v, k_bucket)
          out = decode.bucket_attention(q, changes["pages"], q_bucket, scale=scale)
    out = jnp.where(position < cache.max_length, out, jnp.nan).astype(out.dtype)
    return self._out(out[:, None]), dataclasses.replace(cache, **changes)

  def _next_buckets(self, q, k, cache) -> tuple[jax.Array, jax.Array, dict]:
    """Buckets [B, N] and [B, K] of the new token's query and key (q [B, N, H], k [B, K, H]),
    and the new centering sums."""
    sums = {}

    def bucket(x, name, rotations):
      if self.center_hash:
        buckets, sums[name] = lsh.centered_buckets_next(x, rotations, getattr(cache, name), cache.length)
        return buckets
      return lsh.lsh_buckets(x[:, None], rotations)[:, 0]

    with jax.named_scope("lsh"):
      q_bucket = bucket(q, "q_projected_sum", self._query_rotations(cache.rotations))
      # Normalising does not change the angular hash: shared-QK keys take the query buckets.
      k_bucket = q_bucket if self.shared_qk else bucket(k, "k_projected_sum", cache.rotations)
    return q_bucket, k_bucket, sums

  def _query_rotations(self, rotations: jax.Array) -> jax.Array:
    """[N, H, R] from the kv heads' [K, H, R]: each query hashes with its kv head's rotations."""
    return jnp.repeat(rotations, self.num_heads // self.num_kv_heads, axis=0)

  def _grouped(self, x: jax.Array) -> jax.Array:
    """[B, N, ...] -> [B, K, N // K, ...]: the query heads of each kv head."""
    return x.reshape(x.shape[:1] + (self.num_kv_heads, -1) + x.shape[2:])

  def _per_query_head(self, x: jax.Array) -> jax.Array:
    """[B, K, ...] -> [B, N, ...], each kv head's entry repeated for its query heads."""
    return jnp.repeat(x, self.num_heads // self.num_kv_heads, axis=1)

  def _key(self, rngs) -> jax.Array:
    stream = rngs if rngs is not None else self.rngs
    if stream is None:
      raise ValueError(f"mode={self.mode!r} needs randomness: give rngs to the constructor or the call")
    return _draw_key(stream, self.rng_collection)

  def _project(self, x, positions):
    """q [B, T, N, H] and k, v [B, T, K, H] in the compute dtype, q and k rotated by positions
    int [(B,) T] with rope_base."""
    x = x.astype(self.dtype)
    # Named scopes label each part's kernels in profiles (experiments/bench_model.py --profile).
    with jax.named_scope("qkv_projection"):
      proj = lambda w: jnp.einsum("btd,dnh->btnh", x, w[...].astype(self.dtype))  # noqa: E731
      q, v = proj(self.wq), proj(self.wv)
      if self.rope_base is not None:
        q = rope(q, positions, self.rope_base)
      if self.shared_qk:
        # the clamp inside the root: a zero row's gradient is then finite (sqrt' at 0 is not)
        norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(q.astype(jnp.float32)), axis=-1, keepdims=True), 1e-12))
        k = (q.astype(jnp.float32) / norm).astype(self.dtype)
      else:
        k = proj(self.wk)
        if self.rope_base is not None:
          k = rope(k, positions, self.rope_base)
    return q, k, v

  def _out(self, out):
    with jax.named_scope("out_projection"):
      return jnp.einsum("btnh,nhd->btd", out, self.wo[...].astype(self.dtype))

  def _dense(self, q, k, v, segment_ids=None):
    return _dense_attention(q, k, v, self.implementation, segment_ids)

  def _buckets(self, q, k, rotations, segment_ids=None) -> list[jax.Array]:
    """[query buckets] for shared-QK, else [query buckets [B, T, N], key buckets [B, T, K]];
    rotations [K, H, R] are the kv heads'."""
    # Normalising does not change the angular hash, so shared-QK keys take the query buckets:
    # one array for both sides, inside the shard_map too, so that it is sorted once.
    if self.shared_qk:
      return _lsh_buckets([q], rotations, self.center_hash, segment_ids, self.implementation)
    q_rotations = self._query_rotations(rotations)
    return _lsh_buckets([q], q_rotations, self.center_hash, segment_ids, self.implementation) + _lsh_buckets(
        [k], rotations, self.center_hash, segment_ids, self.implementation
    )

  def _hash(self, q, k, v, buckets, segment_ids=None):
    return _hash_attention(
        q, k, v, buckets, strict=self.shared_qk, implementation=self.implementation, segment_ids=segment_ids
    )

  def _qk_drop(self, q, k, v, q_keep, k_keep, segment_ids=None):
    return _qk_drop_attention(q, k, v, q_keep, k_keep, self.implementation, segment_ids)


def _dense_attention(q, k, v, implementation, segment_ids=None):
  """jax.nn.dot_product_attention, causal; with segment ids also under a dense [B, 1, T, T]
  same-document mask (jax.nn has no packed-sequence path; see docs/performance.md)."""
  if implementation not in ("xla", "cudnn"):
    # jax.nn's own None means XLA: ask for cuDNN where it applies (GPU, 16-bit inputs).
    half = q.dtype in (jnp.bfloat16, jnp.float16)
    implementation = "cudnn" if jax.default_backend() == "gpu" and half else "xla"

  def attend(q, k, v, segment_ids=None):
    if segment_ids is None:
      return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    real = segment_ids >= 0
    mask = (segment_ids[:, None, :, None] == segment_ids[:, None, None, :]) & real[:, None, :, None]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=implementation)
    return jnp.where(real[..., None, None], out, 0).astype(out.dtype)  # padding rows attend to nothing

  with jax.named_scope("attention_core"):
    return batch_sharded(attend)(q, k, v, *([] if segment_ids is None else [segment_ids]))


def _lsh_buckets(xs, rotations, center: bool, segment_ids=None, implementation=None) -> list[jax.Array]:
  with jax.named_scope("lsh"):
    if not center:
      return [lsh.lsh_buckets(x, rotations) for x in xs]

    def bucket(x, segment_ids=None):  # the Triton kernel is a custom call: each device hashes its own rows
      return lsh.centered_buckets(x, rotations, segment_ids, implementation=implementation)

    return [batch_sharded(bucket)(x, *([] if segment_ids is None else [segment_ids])) for x in xs]


def _hash_attention(q, k, v, buckets, *, strict, implementation, segment_ids=None):
  """buckets: [query buckets] (keys share them) or [query buckets, key buckets]."""

  def attend(q, k, v, segment_ids, q_buckets, k_buckets=None):
    return api.hash_sparse_attention(
        q, k, v, q_buckets=q_buckets, k_buckets=q_buckets if k_buckets is None else k_buckets,
        q_segment_ids=segment_ids, k_segment_ids=segment_ids, strict=strict, implementation=implementation,
    )  # fmt: skip

  with jax.named_scope("attention_core"):
    return batch_sharded(attend)(q, k, v, segment_ids, *buckets)


def _qk_drop_attention(q, k, v, q_keep, k_keep, implementation, segment_ids=None):
  """q_keep: bool [B, T, N] per query head; k_keep: bool [B, T, K] per kv head."""

  def attend(q, k, v, q_keep, k_keep, segment_ids):
    return api.qk_sparse_attention(
        q, k, v, q_keep=q_keep, k_keep=k_keep, q_segment_ids=segment_ids, k_segment_ids=segment_ids,
        implementation=implementation,
    )  # fmt: skip

  with jax.named_scope("attention_core"):
    return batch_sharded(attend)(q, k, v, q_keep, k_keep, segment_ids)


def check_kv_heads(num_heads: int, num_kv_heads: int | None, shared_qk: bool) -> int:
  """num_kv_heads (num_heads when None), checked: a positive int dividing num_heads, and
  equal to it with shared_qk, whose keys are the queries (one per query head)."""
  if num_kv_heads is None:
    return num_heads
  if not isinstance(num_kv_heads, int) or isinstance(num_kv_heads, bool) or num_kv_heads < 1:
    raise ValueError(f"num_kv_heads must be a positive int or None, got {num_kv_heads=}")
  if num_heads % num_kv_heads:
    raise ValueError(
        f"num_kv_heads must divide num_heads (grouped-query attention), got {num_heads=}, {num_kv_heads=}"
    )
  if shared_qk and num_kv_heads != num_heads:
    raise ValueError(
        f"shared_qk=True makes the keys the normalised queries, one per query head, so it needs "
        f"num_kv_heads == num_heads, got {num_heads=}, {num_kv_heads=}; use shared_qk=False for "
        "grouped-query attention (keys from their own projection)"
    )
  return num_kv_heads


def attention_fn(
    mode: Mode = "hash",
    *,
    num_buckets: int = 16,
    drop_rate: float = 0.0,
    center_hash: bool = True,
    seed: int = 0,
    implementation: str | None = None,
) -> Callable[..., jax.Array]:
  """Causal SCFA attention to pass as `flax.nnx.MultiHeadAttention(attention_fn=...)`.

  The returned function takes what MultiHeadAttention passes to its attention function
  (as `flax.nnx.dot_product_attention` does: query, key, value [batch..., T, N, H], bias,
  mask, broadcast_dropout, dropout_rng, dropout_rate, deterministic, dtype, precision,
  module, is_causal) and returns [batch..., T, N, H]:

    "dense": `jax.nn.dot_product_attention(is_causal=True)` (cuDNN on a GPU for 16-bit inputs).
    "hash": `hash_sparse_attention` with num_buckets buckets per head; queries and keys are
      bucketed separately under the same rotations (causally centered with center_hash,
      as `SparseCausalSelfAttention(shared_qk=False)` does), and t attends s <= t.
    "qk_drop": `qk_sparse_attention` with query and key masks drawn independently,
      `keep_masks(key, drop_rate, query shape, key shape)`.

  It is always causal self-attention. With mask=None (and any is_causal) it applies
  causality itself. A mask [batch..., 1 or N, T, T] is accepted only if it is the causal
  mask (e.g. `nnx.make_causal_mask`): a concrete one is checked at once, one traced under
  jit when the computation runs (a host callback: mask=None costs nothing). Other masks,
  bias, key lengths other than T (cross-attention, MultiHeadAttention's decode cache),
  attention dropout while not deterministic and sow_weights raise ValueError. precision is
  accepted and unused: scores and softmax are float32 whatever it says.

  The draws (hash rotations, qk_drop keep masks) come from the call's `rng` keyword when
  given, else from `jax.random.key(seed)`: without rng every call draws the same, so a
  model's outputs are reproducible (MultiHeadAttention passes no rng; build each layer's
  function with its own seed for different rotations per layer).
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode=}")
  if mode == "hash" and (not isinstance(num_buckets, int) or num_buckets < 2 or num_buckets % 2):
    raise ValueError(f"num_buckets must be an even int >= 2 (+/- pairs), got {num_buckets=}")
  if not 0.0 <= drop_rate < 1.0:
    raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate=}")
  if implementation not in IMPLEMENTATIONS or (implementation == "cudnn" and mode != "dense"):
    raise ValueError(
        f"implementation must be one of {IMPLEMENTATIONS} ('cudnn': dense only), got {implementation=}"
    )
  if not isinstance(seed, int) or isinstance(seed, bool):
    raise TypeError(f"seed must be an int, got {seed=}")

  def attend(query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
             dropout_rate=0.0, deterministic=False, dtype=None, precision=None, module=None,
             is_causal=False, *, rng=None):  # fmt: skip
    del broadcast_dropout, dropout_rng, precision, is_causal  # see the docstring
    if bias is not None:
      raise ValueError("bias is not supported by scfa_jax.attention_fn (the sparse kernels take no bias)")
    if module is not None:
      raise ValueError("sow_weights is not supported by scfa_jax.attention_fn: it forms no attention weights")
    if dropout_rate > 0.0 and not deterministic:
      raise ValueError(f"attention dropout is not supported by scfa_jax.attention_fn, got {dropout_rate=}")
    for name, x in (("query", query), ("key", key), ("value", value)):
      if getattr(x, "ndim", 0) < 3:
        raise ValueError(f"{name} must be [batch..., T, N, H], got {name}.shape={getattr(x, 'shape', None)}")
    if key.shape[:-3] != query.shape[:-3] or key.shape[-3] != query.shape[-3]:
      raise ValueError(
          f"scfa_jax.attention_fn is causal self-attention: key must have the query's batch and length, "
          f"got query.shape={query.shape}, key.shape={key.shape} (cross-attention and "
          f"MultiHeadAttention's decode cache are not supported)"
      )
    if mask is not None:
      _check_causal_mask(mask, query.shape[-3])
    if dtype is not None:
      query, key, value = (x.astype(dtype) for x in (query, key, value))
    q, k, v = (x.reshape((-1,) + x.shape[-3:]) for x in (query, key, value))  # one batch axis
    draw = jax.random.key(seed) if rng is None else rng
    if mode == "dense":
      out = _dense_attention(q, k, v, implementation)
    elif mode == "hash":
      rotations = lsh.random_rotations(draw, q.shape[2], q.shape[3], num_buckets)
      buckets = _lsh_buckets([q, k], rotations, center_hash, implementation=implementation)
      out = _hash_attention(q, k, v, buckets, strict=False, implementation=implementation)
    else:
      q_keep, k_keep = keep_masks(draw, drop_rate, q.shape[:3], k.shape[:3])
      out = _qk_drop_attention(q, k, v, q_keep, k_keep, implementation)
    return out.reshape(query.shape[:-1] + out.shape[-1:])

  return attend


def _check_causal_mask(mask, length: int) -> None:
  shape = getattr(mask, "shape", None)
  if shape is None or len(shape) < 2 or tuple(shape[-2:]) != (length, length):
    raise ValueError(f"mask must be [batch..., heads, T, T] with T={length}, got mask.shape={shape}")
  causal = np.tril(np.ones((length, length), bool))
  message = "scfa_jax.attention_fn is always causal: mask must be the causal mask (or None), got another mask"
  if not isinstance(mask, jax.core.Tracer):
    if not np.array_equal(np.broadcast_to(np.asarray(mask) != 0, shape), np.broadcast_to(causal, shape)):
      raise ValueError(message)
    return

  def check(is_causal):
    if not is_causal:
      raise ValueError(message)

  jax.debug.callback(check, jnp.all((mask != 0) == causal))
