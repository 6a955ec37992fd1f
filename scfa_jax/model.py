"""The paper's GPT (nanoGPT-style) with SCFA attention, in Flax NNX.

Pre-LayerNorm blocks without biases, GELU MLP 4x, learned absolute positions, tied
input/output embeddings, N(0, 0.02) init with residual projections scaled by
1/sqrt(2 * n_layer). Params are float32; matmuls run in `compute_dtype` (bf16 by
default) while the residual stream, LayerNorm statistics and logits stay float32.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from scfa_jax.nn import IMPLEMENTATIONS, MODES, SparseCausalSelfAttention, _draw_key


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTConfig:
  """Architecture of one GPT; every field can be overridden as --model.<field>=value."""

  vocab_size: int = 257  # tokens: 257 = bytes + end-of-text; 50304 = GPT-2 BPE padded to 64
  block_size: int = 256  # longest sequence T (size of the learned position table)
  n_layer: int = 4  # transformer blocks
  n_head: int = 4  # attention heads N per block; head dim H = n_embd // n_head
  n_embd: int = 256  # model width D
  attention: str = "hash"  # "dense" (jax.nn, cuDNN on GPU), "hash" or "qk_drop"
  num_buckets: int = 16  # hash mode: LSH buckets per head (even)
  drop_rate: float = 0.0  # qk_drop mode: probability of dropping a (token, head)
  shared_qk: bool = True  # keys are the L2-normalised queries (the paper's LM)
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
    if self.attention == "hash" and (self.num_buckets < 2 or self.num_buckets % 2):
      raise ValueError(f"GPTConfig.num_buckets must be even and >= 2, got num_buckets={self.num_buckets}")
    if not 0.0 <= self.drop_rate < 1.0:
      raise ValueError(f"GPTConfig.drop_rate must be in [0, 1), got drop_rate={self.drop_rate}")
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


class MLP(nnx.Module):
  """GELU MLP with a 4x hidden width."""

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    d, f = config.n_embd, 4 * config.n_embd
    self.dtype = jnp.dtype(config.compute_dtype)
    self.w_in = nnx.Param(nnx.initializers.normal(config.init_std)(rngs.params(), (d, f), jnp.float32))
    self.w_out = nnx.Param(nnx.initializers.normal(_residual_std(config))(rngs.params(), (f, d), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.gelu(jnp.einsum("btd,df->btf", x.astype(self.dtype), self.w_in[...].astype(self.dtype)))
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
        mode=config.attention,
        num_buckets=config.num_buckets,
        drop_rate=config.drop_rate,
        shared_qk=config.shared_qk,
        center_hash=config.center_hash,
        implementation=config.implementation,
        dtype=dtype,
        init_std=config.init_std,
        out_init_std=_residual_std(config),
        rngs=rngs,
    )
    self.ln_mlp = nnx.LayerNorm(config.n_embd, use_bias=False, dtype=dtype, rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x: jax.Array, *, rngs=None) -> jax.Array:
    with jax.named_scope("layer_norm"):
      h = self.ln_attn(x)
    with jax.named_scope("attention"):
      x = x + self.attn(h, rngs=rngs).astype(x.dtype)
    with jax.named_scope("layer_norm"):
      h = self.ln_mlp(x)
    with jax.named_scope("mlp"):
      return x + self.mlp(h).astype(x.dtype)


class GPT(nnx.Module):
  """tokens int [B, T] -> logits float32 [B, T, vocab_size].

  `rngs` in the call feeds the attention layers' bucket / keep draws (one key per
  layer from its `attention` stream, or its default stream); without it each
  layer uses the stream it was built with.
  """

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    self.config = config
    init = nnx.initializers.normal(config.init_std)
    self.wte = nnx.Param(init(rngs.params(), (config.vocab_size, config.n_embd), jnp.float32))
    self.wpe = nnx.Param(init(rngs.params(), (config.block_size, config.n_embd), jnp.float32))
    self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layer)])
    self.ln_f = nnx.LayerNorm(config.n_embd, use_bias=False, rngs=rngs)

  def __call__(self, tokens: jax.Array, *, rngs=None) -> jax.Array:
    _, t = tokens.shape
    if t > self.config.block_size:
      raise ValueError(f"sequence length {t} exceeds block_size={self.config.block_size}")
    with jax.named_scope("embedding"):
      x = self.wte[...][tokens] + self.wpe[...][:t]
    run_block = nnx.remat(_run_block) if self.config.remat else _run_block
    for block in self.blocks:
      # One key per layer, drawn out here so that remat never mutates the Rngs.
      key = None if rngs is None else _draw_key(rngs, block.attn.rng_collection)
      x = run_block(block, x, key)
    with jax.named_scope("layer_norm"):
      x = self.ln_f(x)
    dtype = jnp.dtype(self.config.compute_dtype)
    with jax.named_scope("logits"):
      return tied_logits(x.astype(dtype), self.wte[...].astype(dtype))


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
  g = g.astype(x.dtype)
  dx = jnp.einsum("btv,vd->btd", g, embedding, preferred_element_type=jnp.float32)
  d_embedding = jnp.einsum("btv,btd->vd", g, x, preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), d_embedding.astype(embedding.dtype)


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


def _run_block(block: Block, x: jax.Array, key: jax.Array | None) -> jax.Array:
  return block(x, rngs=key)


def count_params(model: nnx.Module) -> int:
  """Number of trainable parameters (tied embeddings counted once)."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def generate(
    model: GPT,
    prompt: jax.Array,
    *,
    steps: int,
    key: jax.Array,
    temperature: float = 0.8,
    top_k: int | None = 40,
) -> jax.Array:
  """Samples `steps` tokens after prompt int [T0]: int [T0 + steps] (no KV cache).

  Every step reruns the model on the last block_size tokens in one fixed-shape
  window, so one compiled loop serves the whole sample; causality makes the unfilled
  tail of the window harmless.
  """
  block = model.config.block_size
  total = prompt.shape[0] + steps
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, prompt, key):
    model = nnx.merge(graphdef, state)
    buffer = jnp.zeros((max(total, block),), jnp.int32).at[: prompt.shape[0]].set(prompt)

    def step(cur, buffer):
      start = jnp.maximum(cur - block, 0)
      window = jax.lax.dynamic_slice(buffer, (start,), (block,))
      step_key = jax.random.fold_in(key, cur)
      logits = model(window[None], rngs=nnx.Rngs(attention=jax.random.fold_in(step_key, 1)))
      logits = logits[0, cur - start - 1] / temperature
      if top_k is not None:
        threshold = jax.lax.top_k(logits, top_k)[0][-1]
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
      token = jax.random.categorical(step_key, logits)
      return buffer.at[cur].set(token.astype(jnp.int32))

    return jax.lax.fori_loop(prompt.shape[0], total, step, buffer)[:total]

  return run(state, jnp.asarray(prompt, jnp.int32), key)
