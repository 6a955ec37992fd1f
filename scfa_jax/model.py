"""The paper's GPT (nanoGPT-style) with SCFA attention, in Flax NNX.

Pre-LayerNorm blocks without biases, GELU MLP 4x, learned absolute positions (or rotary
queries and keys: positions="rope"), tied input/output embeddings, N(0, 0.02) init with residual projections scaled by
1/sqrt(2 * n_layer). Params are float32; matmuls run in `compute_dtype` (bf16 by
default) while the residual stream, LayerNorm statistics and logits stay float32 (the
training loss, `tied_cross_entropy`, rounds its logits to the compute dtype).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from scfa_jax.decode import AttentionCache
from scfa_jax.nn import IMPLEMENTATIONS, MODES, SparseCausalSelfAttention, _draw_key, check_kv_heads


POSITIONS = ("learned", "rope")
ROPE_BASE = 10000.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTConfig:
  """Architecture of one GPT; every field can be overridden as --model.<field>=value."""

  vocab_size: int = 257  # tokens: 257 = bytes + end-of-text; 50304 = GPT-2 BPE padded to 64
  block_size: int = 256  # longest sequence T (size of the learned position table)
  n_layer: int = 4  # transformer blocks
  n_head: int = 4  # attention heads N per block; head dim H = n_embd // n_head
  num_kv_heads: int | None = None  # kv heads K dividing n_head (grouped-query; shared_qk=False); None: n_head
  n_embd: int = 256  # model width D
  attention: str = "hash"  # "dense" (jax.nn, cuDNN on GPU), "hash" or "qk_drop"
  num_buckets: int = 16  # hash mode: LSH buckets per head (even)
  drop_rate: float = 0.0  # qk_drop mode: probability of dropping a (token, head)
  shared_qk: bool = True  # keys are the L2-normalised queries (the paper's LM)
  positions: str = "learned"  # "learned": a position table added to the embeddings; "rope": rotary q/k
  center_hash: bool = True  # hash mode: bucket causally centered queries (lsh.causal_center); False: the paper's
  implementation: str | None = None  # None: Triton on GPU, XLA on CPU; or "xla", "triton", ...
  compute_dtype: str = "bfloat16"  # matmul dtype; params stay float32
  init_std: float = 0.02  # std of the normal init of every matrix and embedding
  remat: bool = False  # recompute each block in the backward pass (saves activation memory)

  def __post_init__(self):
    for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"GPTConfig.{name} must be a positive int, got {name}={value!r}")
    if self.attention not in MODES:
      raise ValueError(f"GPTConfig.attention must be one of {MODES}, got attention={self.attention!r}")
    if self.n_embd % self.n_head:
      raise ValueError(f"GPTConfig.n_head must divide n_embd, got n_embd={self.n_embd}, n_head={self.n_head}")
    try:
      check_kv_heads(self.n_head, self.num_kv_heads, self.shared_qk)
    except ValueError as e:
      raise ValueError(f"GPTConfig: {e}") from None
    if self.attention == "hash" and (self.num_buckets < 2 or self.num_buckets % 2):
      raise ValueError(f"GPTConfig.num_buckets must be even and >= 2, got num_buckets={self.num_buckets}")
    if not 0.0 <= self.drop_rate < 1.0:
      raise ValueError(f"GPTConfig.drop_rate must be in [0, 1), got drop_rate={self.drop_rate}")
    if self.positions not in POSITIONS:
      raise ValueError(f"GPTConfig.positions must be one of {POSITIONS}, got positions={self.positions!r}")
    if self.implementation not in IMPLEMENTATIONS:
      raise ValueError(
          f"GPTConfig.implementation must be one of {IMPLEMENTATIONS}, got {self.implementation!r}"
      )
    jnp.dtype(self.compute_dtype)  # raises TypeError on an unknown dtype name


PRESETS: dict[str, GPTConfig] = {
    # The paper's language model: 12 layers, width 768, 12 heads of 64, shared QK,
    # GPT-2 vocabulary; 122.8M parameters with 8192 positions.
    "gpt122m": GPTConfig(vocab_size=50304, block_size=8192, n_layer=12, n_head=12, n_embd=768),
    # Byte-level models that train on a CPU in minutes.
    "cpu_small": GPTConfig(vocab_size=257, block_size=256, n_layer=4, n_head=2, n_embd=128),
    "cpu_medium": GPTConfig(vocab_size=257, block_size=256, n_layer=4, n_head=4, n_embd=256),
    "cpu_tiny": GPTConfig(vocab_size=257, block_size=64, n_layer=2, n_head=2, n_embd=64),
}


def preset(name: str, **overrides) -> GPTConfig:
  """A named architecture with some fields replaced, e.g. preset("gpt122m", attention="dense")."""
  if name not in PRESETS:
    raise ValueError(f"unknown GPT preset {name!r}; known: {sorted(PRESETS)}")
  return dataclasses.replace(PRESETS[name], **overrides)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """`jax.nn.gelu` (the tanh form) whose backward recomputes the tanh from x in float32.

  Autodiff of `jax.nn.gelu` saves the tanh as a second activation: the forward writes
  it and the backward reads it, one [B, T, 4D] tensor each way per layer, and the MLP's
  elementwise work is memory bound. Here the saved residual is x alone, the product's
  output, which exists anyway."""
  return jax.nn.gelu(x, approximate=True)


def _gelu_fwd(x):
  return gelu(x), x


def _gelu_bwd(x, g):
  wide = x.astype(jnp.float32)
  c = math.sqrt(2 / math.pi)
  inner = c * (wide + 0.044715 * wide**3)
  t = jnp.tanh(inner)
  slope = 0.5 * (1 + t) + 0.5 * wide * (1 - t * t) * c * (1 + 3 * 0.044715 * wide * wide)
  return ((g.astype(jnp.float32) * slope).astype(g.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


class MLP(nnx.Module):
  """GELU MLP with a 4x hidden width."""

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    d, f = config.n_embd, 4 * config.n_embd
    self.dtype = jnp.dtype(config.compute_dtype)
    self.w_in = nnx.Param(nnx.initializers.normal(config.init_std)(rngs.params(), (d, f), jnp.float32))
    self.w_out = nnx.Param(nnx.initializers.normal(_residual_std(config))(rngs.params(), (f, d), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    h = gelu(jnp.einsum("btd,df->btf", x.astype(self.dtype), self.w_in[...].astype(self.dtype)))
    return jnp.einsum("btf,fd->btd", h, self.w_out[...].astype(self.dtype))


def _residual_std(config: GPTConfig) -> float:
  return config.init_std / math.sqrt(2 * config.n_layer)


class Block(nnx.Module):
  """x + attn(ln(x)), then x + mlp(ln(x)); the residual stream stays float32."""

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.compute_dtype)
    self.ln_attn = nnx.LayerNorm(config.n_embd, use_bias=False, dtype=dtype, rngs=rngs)
    self.attn = SparseCausalSelfAttention(
        width=config.n_embd,
        num_heads=config.n_head,
        num_kv_heads=config.num_kv_heads,
        mode=config.attention,
        num_buckets=config.num_buckets,
        drop_rate=config.drop_rate,
        shared_qk=config.shared_qk,
        center_hash=config.center_hash,
        rope_base=ROPE_BASE if config.positions == "rope" else None,
        implementation=config.implementation,
        dtype=dtype,
        init_std=config.init_std,
        out_init_std=_residual_std(config),
        rngs=rngs,
    )
    self.ln_mlp = nnx.LayerNorm(config.n_embd, use_bias=False, dtype=dtype, rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x: jax.Array, *, segment_ids=None, positions=None, rngs=None) -> jax.Array:
    attend = lambda h: (self.attn(h, segment_ids=segment_ids, positions=positions, rngs=rngs), None)  # noqa: E731
    return self._residuals(x, attend)[0]

  def prefill(self, x: jax.Array, cache: AttentionCache) -> tuple[jax.Array, AttentionCache]:
    return self._residuals(x, lambda h: self.attn.prefill(h, cache))

  def decode_step(self, x: jax.Array, cache: AttentionCache) -> tuple[jax.Array, AttentionCache]:
    return self._residuals(x, lambda h: self.attn.decode_step(h, cache))

  def _residuals(self, x, attend):
    """The block around attend(h) -> (attention output, cache): (output, cache)."""
    with jax.named_scope("layer_norm"):
      h = self.ln_attn(x)
    with jax.named_scope("attention"):
      a, cache = attend(h)
      x = x + a.astype(x.dtype)
    with jax.named_scope("layer_norm"):
      h = self.ln_mlp(x)
    with jax.named_scope("mlp"):
      return x + self.mlp(h).astype(x.dtype), cache


class GPT(nnx.Module):
  """tokens int [B, T] -> logits float32 [B, T, vocab_size]; with `targets` (int [B, T], the
  next tokens) -> the cross-entropy float32 [B, T] of each position, in nats
  (`tied_cross_entropy`: the training path, which never forms float32 logits).

  `rngs` in the call feeds the attention layers' bucket / keep draws (one key per
  layer from its `attention` stream, or its default stream); without it each
  layer uses the stream it was built with. `segment_ids` and `positions` (int [B, T])
  pack documents into one sequence: attention stays inside each segment, and the
  position table (or the rotary embedding) reads `positions` (e.g. restarting at 0 at each document;
  `scfa_jax.data.batches.document_segments` gives both from end-of-text tokens).
  """

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    self.config = config
    init = nnx.initializers.normal(config.init_std)
    self.wte = nnx.Param(init(rngs.params(), (config.vocab_size, config.n_embd), jnp.float32))
    learned = config.positions == "learned"
    self.wpe = nnx.Param(init(rngs.params(), (config.block_size, config.n_embd), jnp.float32)) if learned else None
    self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layer)])
    self.ln_f = nnx.LayerNorm(config.n_embd, use_bias=False, rngs=rngs)

  def __call__(
      self, tokens: jax.Array, *, segment_ids=None, positions=None, rngs=None, targets=None
  ) -> jax.Array:
    _, t = tokens.shape
    if t > self.config.block_size:
      raise ValueError(f"sequence length {t} exceeds block_size={self.config.block_size}")
    for name, x in (("segment_ids", segment_ids), ("positions", positions)):
      if x is not None and getattr(x, "shape", None) != tokens.shape:
        shape = getattr(x, "shape", None)
        raise ValueError(f"{name} must be int [B, T] = {tokens.shape}, got {name}.shape={shape}")
    if targets is not None and getattr(targets, "shape", None) != tokens.shape:
      shape = getattr(targets, "shape", None)
      raise ValueError(f"targets must be int [B, T] = {tokens.shape}, got targets.shape={shape}")
    if targets is not None and not jnp.issubdtype(targets.dtype, jnp.integer):
      raise TypeError(f"targets must hold integer token ids, got targets.dtype={targets.dtype}")
    x = self._embed(tokens, jnp.arange(t) if positions is None else positions)
    run_block = nnx.remat(_run_block) if self.config.remat else _run_block
    # Keys drawn out here, one per layer, so that remat never mutates the Rngs.
    for block, key in zip(self.blocks, self._layer_keys(rngs)):
      x = run_block(block, x, key, segment_ids, positions)
    if targets is not None:
      x, embedding = self._unembed_inputs(x)
      return tied_cross_entropy(x, embedding, targets)
    return self._logits(x)

  def init_cache(
      self, batch_size: int, max_length: int | None = None, *, rngs=None, page_size: int | None = None
  ) -> tuple[AttentionCache, ...]:
    """Empty decoding caches, one per layer, of max_length positions (block_size if None).

    Each layer draws its rotations or keep masks from its key of rngs, as a call of the
    model with the same rngs would (`SparseCausalSelfAttention.init_cache`, which also says
    what page_size does).
    """
    if max_length is None:
      max_length = self.config.block_size
    if not isinstance(max_length, int) or not 1 <= max_length <= self.config.block_size:
      block = self.config.block_size
      raise ValueError(f"max_length must be an int in [1, block_size={block}], got {max_length=}")
    return tuple(
        block.attn.init_cache(batch_size, max_length, rngs=key, page_size=page_size)
        for block, key in zip(self.blocks, self._layer_keys(rngs))
    )

  def prefill(self, tokens: jax.Array, cache: tuple[AttentionCache, ...]) -> tuple[jax.Array, tuple]:
    """Runs the prompt tokens int [B, T] into the caches, which start over: (logits float32
    [B, V] of the last position, caches of length T). Logits of other positions are never formed."""
    x = self._embed(tokens, jnp.arange(tokens.shape[1]))
    cache = list(cache)
    for i, block in enumerate(self.blocks):
      x, cache[i] = block.prefill(x, cache[i])
    return self._logits(x[:, -1:])[:, 0], tuple(cache)

  def decode_step(self, tokens: jax.Array, cache: tuple[AttentionCache, ...]) -> tuple[jax.Array, tuple]:
    """One token per row, int [B], at position cache[0].length: (logits float32 [B, V], caches
    one longer). The logits are those of the model on the whole sequence at that position."""
    x = self._embed(tokens[:, None], cache[0].length[None])
    cache = list(cache)
    for i, block in enumerate(self.blocks):
      x, cache[i] = block.decode_step(x, cache[i])
    return self._logits(x)[:, 0], tuple(cache)

  def _layer_keys(self, rngs) -> list:
    """One key per layer from rngs (its attention stream), or Nones: each layer's own stream."""
    return [None if rngs is None else _draw_key(rngs, block.attn.rng_collection) for block in self.blocks]

  def _embed(self, tokens, positions):
    with jax.named_scope("embedding"):
      x = self.wte[...][tokens]
      return x if self.wpe is None else x + self.wpe[...][positions]

  def _unembed_inputs(self, x):
    """The final layer norm's output and the tied embedding, both in the compute dtype."""
    with jax.named_scope("layer_norm"):
      x = self.ln_f(x)
    dtype = jnp.dtype(self.config.compute_dtype)
    return x.astype(dtype), self.wte[...].astype(dtype)

  def _logits(self, x):
    x, embedding = self._unembed_inputs(x)
    with jax.named_scope("logits"):
      return tied_logits(x, embedding)


@jax.custom_vjp
def tied_logits(x: jax.Array, embedding: jax.Array) -> jax.Array:
  """float32 logits [B, T, V] of x [B, T, D] against the embedding [V, D] (both compute dtype).

  The forward accumulates and returns float32. The backward rounds the logits' float32
  cotangent to the compute dtype first, so that its two matmuls (the largest of the
  model, V = 50304) run in bf16 with float32 accumulation, as in a mixed-precision step,
  rather than as float32 (TF32) products of the upcast operands, which autodiff of a
  float32-output product would give.
  """
  return jnp.einsum("btd,vd->btv", x, embedding, preferred_element_type=jnp.float32)


def _tied_logits_fwd(x, embedding):
  return tied_logits(x, embedding), (x, embedding)


def _tied_logits_bwd(residuals, g):
  x, embedding = residuals
  return _tied_products_vjp(g.astype(x.dtype), x, embedding)


def _tied_products_vjp(dlogits, x, embedding):
  """(dx, d_embedding) of logits = x @ embedding.T for dlogits in the compute dtype: two
  products of compute-dtype operands that accumulate in float32."""
  dx = jnp.einsum("btv,vd->btd", dlogits, embedding, preferred_element_type=jnp.float32)
  d_embedding = jnp.einsum("btv,btd->vd", dlogits, x, preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), d_embedding.astype(embedding.dtype)


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


@jax.custom_vjp
def tied_cross_entropy(x: jax.Array, embedding: jax.Array, targets: jax.Array) -> jax.Array:
  """Cross-entropy float32 [B, T] (nats) of the logits x [B, T, D] @ embedding [V, D].T at
  the target ids int [B, T]; x and embedding in the compute dtype.

  The logits are formed in the compute dtype (bf16 products accumulate in float32 and are
  rounded once, as in a mixed-precision step) and their log-sum-exp in float32. The
  backward forms the logits' gradient softmax - onehot in the compute dtype in one pass
  over the saved logits and feeds it to the two products. Over a 50304-word vocabulary the
  logits are the step's largest tensor: float32 logits and autodiff of a float32
  log-softmax read and write it about twice as often, in twice the bytes.
  """
  return _tied_cross_entropy_fwd(x, embedding, targets)[0]


def _logsumexp(x: jax.Array) -> jax.Array:
  """log sum exp over the last axis in one pass: a reduction of (running max, sum of exp
  below it) pairs. `jax.nn.logsumexp` reads x twice, once for the max and once for the
  sum; over the logits that is a 50304-wide row per token, twice."""

  def combine(a, b):
    (m1, s1), (m2, s2) = a, b
    e = jnp.exp(-jnp.abs(jnp.where(m1 == m2, 0.0, m1 - m2)))  # equal maxima, -inf too: e = 1
    return jnp.maximum(m1, m2), jnp.where(m1 >= m2, s1 + s2 * e, s1 * e + s2)

  init = (jnp.array(-jnp.inf, x.dtype), jnp.array(0, x.dtype))
  m, s = jax.lax.reduce((x, jnp.ones_like(x)), init, combine, (x.ndim - 1,))
  return m + jnp.log(s)


def _tied_cross_entropy_fwd(x, embedding, targets):
  with jax.named_scope("logits"):
    logits = jnp.einsum("btd,vd->btv", x, embedding)
  with jax.named_scope("cross_entropy"):
    wide = logits.astype(jnp.float32)
    lse = _logsumexp(wide)
    target = jnp.take_along_axis(wide, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return lse - target, (x, embedding, logits, lse, targets)


def _tied_cross_entropy_bwd(residuals, g):
  x, embedding, logits, lse, targets = residuals
  with jax.named_scope("cross_entropy"):
    onehot = targets[..., None] == jnp.arange(logits.shape[-1])
    probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
    dlogits = ((probs - onehot) * g[..., None]).astype(x.dtype)
  with jax.named_scope("logits"):
    return (*_tied_products_vjp(dlogits, x, embedding), None)


tied_cross_entropy.defvjp(_tied_cross_entropy_fwd, _tied_cross_entropy_bwd)


def _run_block(block: Block, x, key, segment_ids, positions) -> jax.Array:
  return block(x, segment_ids=segment_ids, positions=positions, rngs=key)


def count_params(model: nnx.Module) -> int:
  """Number of trainable parameters (tied embeddings counted once)."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def sample_logits(
    logits: jax.Array,
    key: jax.Array,
    *,
    temperature: float = 0.8,
    top_k: int | None = 40,
    exclude: tuple[int, ...] = (),
) -> jax.Array:
  """One token per row of logits [B, V]: int32 [B].

  temperature (a Python float) 0 takes the most likely token (greedy); otherwise the logits
  are divided by it, and top_k (None: all) keeps the k most likely. Ids in exclude are never
  drawn.
  """
  if exclude:
    logits = logits.at[..., jnp.asarray(exclude)].set(-jnp.inf)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None:
    threshold = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(key, logits).astype(jnp.int32)


def generate(
    model: GPT,
    prompt: jax.Array,
    *,
    steps: int,
    key: jax.Array,
    temperature: float = 0.8,
    top_k: int | None = 40,
    exclude: tuple[int, ...] = (),
    page_size: int | None = None,
) -> jax.Array:
  """Samples `steps` tokens after prompt int [T0] (or a batch [B, T0]): int32 [T0 + steps] ([B, T0 + steps]).

  Decodes with key/value caches: one prefill of the prompt, then one jitted step per
  token against the cached keys and values, compiled once per batch size and cache length.
  The attention draws come from one key for the whole generation: with
  `attention_key, sample_key = jax.random.split(key)`, token i is drawn by
  `sample_logits(logits, jax.random.fold_in(sample_key, i), ...)` from the last logits of
  `model(tokens[:, :i], rngs=nnx.Rngs(attention=attention_key))`, the model on the whole
  sequence so far, which the test suite checks.

  Past block_size (the model has no later positions): when the cache is full and another
  token must go in, it starts over from the last block_size // 2 tokens (a new prefill,
  at positions 0 ..), so every token sees between block_size // 2 and block_size earlier
  tokens, the tokens of the window rather than the whole sequence. A prompt longer than
  block_size goes in as its last block_size tokens.

  Args:
    temperature, top_k, exclude: as in `sample_logits` (temperature 0: greedy).
    page_size: hash mode: keep keys in pages grouped by bucket, so that each step reads
      only its query's bucket (`SparseCausalSelfAttention.init_cache`); worth it for long
      caches.
  """
  prompt = jnp.asarray(prompt, jnp.int32)
  if prompt.ndim not in (1, 2) or prompt.shape[-1] == 0:
    raise ValueError(f"prompt must be int [T0] or [B, T0] with T0 >= 1, got prompt.shape={prompt.shape}")
  if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
    raise ValueError(f"steps must be a non-negative int, got {steps=}")
  vocab = model.config.vocab_size
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature=}")
  if top_k is not None and (not isinstance(top_k, int) or not 1 <= top_k <= vocab):
    raise ValueError(f"top_k must be None or an int in [1, vocab_size={vocab}], got {top_k=}")
  exclude = tuple(int(i) for i in exclude)
  if any(not 0 <= i < vocab for i in exclude):
    raise ValueError(f"exclude must hold token ids in [0, {vocab}), got {exclude=}")
  if steps == 0:
    return prompt
  rows = prompt if prompt.ndim == 2 else prompt[None]
  block, start, total = model.config.block_size, rows.shape[1], rows.shape[1] + steps
  capacity = min(block, total - 1)  # the last token is drawn, never fed
  attention_key, sample_key = jax.random.split(key)
  sampling = (float(temperature), top_k, exclude)
  graphdef, state = nnx.split(model)
  cache = _init_cache(graphdef, state, attention_key, rows.shape[0], capacity, page_size)
  window = rows[:, -block:]
  token, cache = _prefill_and_sample(graphdef, state, cache, window, sample_key, start, sampling)
  tokens, filled = [rows, token[:, None]], window.shape[1]
  for i in range(start + 1, total):
    if filled == capacity:
      window = jnp.concatenate(tokens, axis=1)[:, i - block // 2 : i]
      token, cache = _prefill_and_sample(graphdef, state, cache, window, sample_key, i, sampling)
      filled = window.shape[1]
    else:
      token, cache = _decode_and_sample(graphdef, state, cache, token, sample_key, i, sampling)
      filled += 1
    tokens.append(token[:, None])
  out = jnp.concatenate(tokens, axis=1)
  return out if prompt.ndim == 2 else out[0]


@functools.partial(jax.jit, static_argnames=("graphdef", "batch_size", "max_length", "page_size"))
def _init_cache(graphdef, state, key, batch_size, max_length, page_size):
  model = nnx.merge(graphdef, state)
  return model.init_cache(batch_size, max_length, rngs=nnx.Rngs(attention=key), page_size=page_size)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames="cache")
def _prefill_and_sample(graphdef, state, cache, tokens, key, index, sampling):
  logits, cache = nnx.merge(graphdef, state).prefill(tokens, cache)
  return _sample(logits, key, index, sampling), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames="cache")
def _decode_and_sample(graphdef, state, cache, tokens, key, index, sampling):
  logits, cache = nnx.merge(graphdef, state).decode_step(tokens, cache)
  return _sample(logits, key, index, sampling), cache


def _sample(logits, key, index, sampling):
  temperature, top_k, exclude = sampling
  key = jax.random.fold_in(key, index)
  return sample_logits(logits, key, temperature=temperature, top_k=top_k, exclude=exclude)
