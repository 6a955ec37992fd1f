"""Flax NNX causal self-attention with SCFA sparsity: the layer the GPT is built from.

Attention itself is one of the public functions in `scfa_jax.api` (or
`jax.nn.dot_product_attention` in dense mode); this module only owns projections,
the random bucket / keep draws, and the `shard_map` over the batch axis that
jax-triton calls need under a mesh (they have no partitioning rule).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from scfa_jax import api, lsh

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
    "qk_drop": each (batch, token, head) is dropped with probability `drop_rate`
      from both queries and keys (`qk_sparse_attention`); a dropped query outputs 0.

  With `shared_qk` (the paper's language model, after Reformer) there is no key
  projection: keys are the L2-normalised queries, and hash mode uses strict
  causality (t > s), since a token would otherwise mostly attend to itself.

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
      mode: Mode = "hash",
      num_buckets: int = 16,
      drop_rate: float = 0.0,
      shared_qk: bool = True,
      center_hash: bool = True,
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
      mode: "dense", "hash" or "qk_drop".
      num_buckets: hash buckets per head (even: buckets come in +/- pairs).
      drop_rate: qk_drop probability of dropping a token from a head, in [0, 1).
      shared_qk: keys are the L2-normalised queries (no key projection).
      center_hash: hash mode buckets the causally centered queries and keys
        (`lsh.causal_center`); False hashes them as they are, as the paper does.
      implementation: passed to the scfa_jax functions (None, "xla", "triton",
        "interpret"); in dense mode "xla" and "cudnn" go to jax.nn, and the others
        mean cuDNN on a GPU with bf16/f16 compute, else XLA.
      dtype: compute dtype (e.g. bfloat16); params stay in param_dtype.
      init_std: std of the q/k/v projections' normal init.
      out_init_std: std of the output projection (residual branch); init_std if None.
      rng_collection: name of the nnx.Rngs stream for buckets and keep masks.
      rngs: params are drawn from rngs.params(); the attention stream is forked.
    """
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {mode=}")
    if not isinstance(num_heads, int) or num_heads < 1 or not isinstance(width, int) or width < 1:
      raise ValueError(f"width and num_heads must be positive ints, got {width=}, {num_heads=}")
    if width % num_heads:
      raise ValueError(f"num_heads must divide width, got {width=}, {num_heads=}")
    if mode == "hash" and (not isinstance(num_buckets, int) or num_buckets < 2 or num_buckets % 2):
      raise ValueError(f"num_buckets must be an even int >= 2 (+/- pairs), got {num_buckets=}")
    if not 0.0 <= drop_rate < 1.0:
      raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate=}")
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation=}")
    if implementation == "cudnn" and mode != "dense":
      raise ValueError(f"implementation='cudnn' only applies to mode='dense', got {mode=}")
    self.mode, self.num_buckets, self.drop_rate = mode, num_buckets, drop_rate
    self.shared_qk, self.center_hash, self.implementation = shared_qk, center_hash, implementation
    self.num_heads, self.head_dim = num_heads, width // num_heads
    # When True, hash mode sows its bucket sizes (`bucket_sizes`) for `nnx.capture`.
    self.record_buckets = False
    self.dtype, self.rng_collection = dtype, rng_collection
    init = nnx.initializers.normal(init_std)
    out_init = nnx.initializers.normal(init_std if out_init_std is None else out_init_std)
    heads = (width, num_heads, self.head_dim)
    self.wq = nnx.Param(init(rngs.params(), heads, param_dtype))
    self.wk = None if shared_qk else nnx.Param(init(rngs.params(), heads, param_dtype))
    self.wv = nnx.Param(init(rngs.params(), heads, param_dtype))
    self.wo = nnx.Param(out_init(rngs.params(), (num_heads, self.head_dim, width), param_dtype))
    try:
      self.rngs = rngs[rng_collection].fork()
    except KeyError:  # neither that stream nor a default one: rngs must come with each call
      self.rngs = nnx.data(None)

  def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None) -> jax.Array:
    """x: [B, T, D] -> [B, T, D]. rngs overrides the stream given at construction."""
    x = x.astype(self.dtype)
    # Named scopes label each part's kernels in profiles (experiments/bench_model.py --profile).
    with jax.named_scope("qkv_projection"):
      proj = lambda w: jnp.einsum("btd,dnh->btnh", x, w[...].astype(self.dtype))  # noqa: E731
      q, v = proj(self.wq), proj(self.wv)
      if self.shared_qk:
        norm = jnp.sqrt(jnp.sum(jnp.square(q.astype(jnp.float32)), axis=-1, keepdims=True))
        k = (q.astype(jnp.float32) / jnp.maximum(norm, 1e-6)).astype(self.dtype)
      else:
        k = proj(self.wk)
    if self.mode == "dense":
      out = self._dense(q, k, v)
    else:
      stream = rngs if rngs is not None else self.rngs
      if stream is None:
        raise ValueError(f"mode={self.mode!r} needs randomness: give rngs to the constructor or the call")
      key = _draw_key(stream, self.rng_collection)
      out = self._hash(q, k, v, key) if self.mode == "hash" else self._qk_drop(q, k, v, key)
    with jax.named_scope("out_projection"):
      return jnp.einsum("btnh,nhd->btd", out, self.wo[...].astype(self.dtype))

  def _dense(self, q, k, v):
    impl = self.implementation
    if impl not in ("xla", "cudnn"):
      # jax.nn's own None means XLA: ask for cuDNN where it applies (GPU, 16-bit inputs).
      half = q.dtype in (jnp.bfloat16, jnp.float16)
      impl = "cudnn" if jax.default_backend() == "gpu" and half else "xla"
    attend = lambda q, k, v: jax.nn.dot_product_attention(  # noqa: E731
        q, k, v, is_causal=True, implementation=impl
    )
    with jax.named_scope("attention_core"):
      return batch_sharded(attend)(q, k, v)

  def _hash(self, q, k, v, key):
    with jax.named_scope("lsh"):
      rotations = lsh.random_rotations(key, self.num_heads, self.head_dim, self.num_buckets)
      hashed = lsh.causal_center if self.center_hash else (lambda x: x)
      buckets = [lsh.lsh_buckets(hashed(q), rotations)]
      # Normalising does not change the angular hash, so shared-QK keys take the query buckets:
      # one array for both sides, inside the shard_map too, so that it is sorted once.
      if not self.shared_qk:
        buckets.append(lsh.lsh_buckets(hashed(k), rotations))
      if self.record_buckets:
        self.sow(nnx.Intermediate, "bucket_sizes", bucket_sizes(buckets[0], self.num_buckets))

    def attend(q, k, v, q_buckets, k_buckets=None):
      return api.hash_sparse_attention(
          q, k, v, q_buckets=q_buckets, k_buckets=q_buckets if k_buckets is None else k_buckets,
          strict=self.shared_qk, implementation=self.implementation,
      )  # fmt: skip

    with jax.named_scope("attention_core"):
      return batch_sharded(attend)(q, k, v, *buckets)

  def _qk_drop(self, q, k, v, key):
    keep = jax.random.bernoulli(key, 1.0 - self.drop_rate, q.shape[:3])  # [B, T, N]
    attend = lambda q, k, v, keep: api.qk_sparse_attention(  # noqa: E731
        q, k, v, q_keep=keep, k_keep=keep, implementation=self.implementation
    )
    with jax.named_scope("attention_core"):
      return batch_sharded(attend)(q, k, v, keep)
