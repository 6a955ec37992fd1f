"""Pure-jnp backend: the CPU default and the fallback on any device.

Flash-style in jnp: a `lax.scan` over query tiles keeps live memory at one
[B, N, BLOCK_Q, S] score tile instead of [B, N, T, S], forward and backward (the
backward recomputes scores from the saved log-sum-exp, like the kernels).

Grouped-query attention (k, v with K heads, K dividing N) runs on q viewed as
[B, K, G, ..., H] (G = N // K) against k and v [B, K, S, H] in one einsum, so k and v are
never repeated; dK and dV sum over the group in that einsum.

It applies the same tile plan as the Triton kernels: skipped tiles are masked out and
full tiles take no mask at all, forward and dQ from the query view, dK and dV from the
key view. So every test of this backend against the dense reference also checks that
the plan never skips an allowed pair and never calls a tile full that is not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from scfa_jax import plan as plan_lib
from scfa_jax.sorting import K_PAD, Q_PAD, SortedTokens, gather_rows, scatter_rows

BLOCK_Q = 128
BLOCK_K = 128


def _tiles(x: jax.Array, block: int, fill) -> jax.Array:
  """[B, N, T, ...] -> [num_tiles, B, N, block, ...], padding T with `fill`."""
  pad = -x.shape[2] % block
  x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3), constant_values=fill)
  x = x.reshape(x.shape[:2] + (-1, block) + x.shape[3:])
  return jnp.moveaxis(x, 2, 0)


def _untile(x: jax.Array, length: int) -> jax.Array:
  """Inverse of `_tiles`: [num_tiles, B, N, block, ...] -> [B, N, length, ...]."""
  x = jnp.moveaxis(x, 0, 2)
  return x.reshape(x.shape[:2] + (-1,) + x.shape[4:])[:, :, :length]


def _grouped(x: jax.Array, kv_heads: int) -> jax.Array:
  """[B, N, ...] -> [B, K, G, ...]: query head n = kv head n // G, member n % G of its group."""
  return x.reshape(x.shape[:1] + (kv_heads, -1) + x.shape[2:])


def _ungrouped(x: jax.Array) -> jax.Array:
  """Inverse of `_grouped`: [B, K, G, ...] -> [B, N, ...]."""
  return x.reshape(x.shape[:1] + (-1,) + x.shape[3:])


class _Prepared:
  """Sorted operands and per-query-tile scan inputs shared by forward and backward."""

  def __init__(self, config, q, k, v, tokens: SortedTokens):
    self.scale, self.strict = config.scale, config.strict
    self.length = q.shape[1]
    self.kv_heads = k.shape[2]
    self.k = gather_rows(k, tokens.k_perm)  # [B, K, S, H]
    self.v = gather_rows(v, tokens.k_perm)
    # Per-key idx and hash [B, K, S] as [B, K, 1, S]: broadcast against a group's queries.
    self.k_idx = tokens.k_idx[:, :, None]
    self.k_hash = None if tokens.k_hash is None else tokens.k_hash[:, :, None]
    plan = plan_lib.make_plan(tokens, block_q=BLOCK_Q, block_k=BLOCK_K, strict=config.strict)
    self.scan_inputs = dict(
        q=_tiles(gather_rows(q, tokens.q_perm), BLOCK_Q, 0),
        q_idx=_tiles(tokens.q_idx, BLOCK_Q, Q_PAD),
        q_hash=None if tokens.q_hash is None else _tiles(tokens.q_hash, BLOCK_Q, 0),
        q_view=jnp.moveaxis(plan.to_dense("q"), 2, 0),
        k_view=jnp.moveaxis(plan.to_dense("k"), 2, 0),
    )

  def grouped(self, x: jax.Array) -> jax.Array:
    return _grouped(x, self.kv_heads)

  def mask(self, q_idx, q_hash, tile_states) -> jax.Array:
    """bool [B, K, G, BLOCK_Q, S]: the SCFA rule, overridden by the plan's tile states."""
    qi, kj = self.grouped(q_idx)[..., :, None], self.k_idx[..., None, :]
    rule = ((qi > kj) if self.strict else (qi >= kj)) & (qi >= 0) & (kj < K_PAD)
    if q_hash is not None:
      rule &= self.grouped(q_hash)[..., :, None] == self.k_hash[..., None, :]
    states = jnp.repeat(self.grouped(tile_states), BLOCK_K, axis=-1)[..., None, : kj.shape[-1]]
    return (states == plan_lib.FULL) | ((states == plan_lib.MASKED) & rule)

  def scores(self, q_tile) -> jax.Array:
    """[B, K, G, BLOCK_Q, S] scores of a query tile [B, N, BLOCK_Q, H]."""
    s = jnp.einsum("bkgqh,bksh->bkgqs", self.grouped(q_tile), self.k, preferred_element_type=jnp.float32)
    return s * self.scale


def forward(config, q, k, v, tokens, *, differentiating: bool = False):
  """O at original rows, and the residuals: the natural-log lse [B, N, T] per sorted slot."""
  del differentiating  # the residuals are the lse either way
  prep = _Prepared(config, q, k, v, tokens)

  def tile(_, x):
    s = prep.scores(x["q"])
    s = jnp.where(prep.mask(x["q_idx"], x["q_hash"], x["q_view"]), s, -jnp.inf)
    row_max = jnp.max(s, axis=-1)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.exp(s - row_max[..., None])
    denom = jnp.sum(p, axis=-1)
    o = jnp.einsum("bkgqs,bksh->bkgqh", p, prep.v, preferred_element_type=jnp.float32)
    o = o / jnp.where(denom > 0, denom, 1.0)[..., None]
    lse = jnp.where(denom > 0, row_max + jnp.log(denom), jnp.inf)
    return None, (_ungrouped(o).astype(q.dtype), _ungrouped(lse))

  _, (o, lse) = jax.lax.scan(tile, None, prep.scan_inputs)
  return scatter_rows(_untile(o, prep.length), tokens.q_perm), _untile(lse, prep.length)


def _to_keys(weights: jax.Array, rows: jax.Array) -> jax.Array:
  """[B, K, S, H]: weights [B, K, G, BLOCK_Q, S] times rows [B, K, G, BLOCK_Q, H], summed over
  the queries and the G query heads of each kv head."""
  return jnp.einsum("bkgqs,bkgqh->bksh", weights, rows, preferred_element_type=jnp.float32)


def backward(config, q, k, v, tokens, o, lse, do):
  prep = _Prepared(config, q, k, v, tokens)
  do_sorted = gather_rows(do, tokens.q_perm)
  delta = jnp.sum(
      do_sorted.astype(jnp.float32) * gather_rows(o, tokens.q_perm).astype(jnp.float32), axis=-1
  )
  scan_inputs = dict(
      prep.scan_inputs,
      do=_tiles(do_sorted, BLOCK_Q, 0),
      lse=_tiles(lse, BLOCK_Q, jnp.inf),
      delta=_tiles(delta, BLOCK_Q, 0.0),
  )

  def tile(carry, x):
    dk, dv = carry
    s = prep.scores(x["q"])
    q_tile, do = prep.grouped(x["q"]), prep.grouped(x["do"])
    p = jnp.exp(s - prep.grouped(x["lse"])[..., None])
    dp = jnp.einsum("bkgqh,bksh->bkgqs", do, prep.v, preferred_element_type=jnp.float32)
    ds = p * (dp - prep.grouped(x["delta"])[..., None]) * prep.scale
    # dQ follows the query view of the plan, dK and dV the key view, as the kernels do.
    in_q = prep.mask(x["q_idx"], x["q_hash"], x["q_view"])
    in_k = prep.mask(x["q_idx"], x["q_hash"], x["k_view"])
    dq = jnp.einsum("bkgqs,bksh->bkgqh", jnp.where(in_q, ds, 0.0), prep.k, preferred_element_type=jnp.float32)
    dk += _to_keys(jnp.where(in_k, ds, 0.0), q_tile)
    dv += _to_keys(jnp.where(in_k, p, 0.0), do)
    return (dk, dv), _ungrouped(dq)

  zeros = jnp.zeros_like(prep.k, dtype=jnp.float32)  # zeros_like keeps shard_map's varying axes
  (dk, dv), dq = jax.lax.scan(tile, (zeros, zeros), scan_inputs)
  dq = scatter_rows(_untile(dq, prep.length), tokens.q_perm).astype(q.dtype)
  dk = scatter_rows(dk, tokens.k_perm).astype(k.dtype)
  dv = scatter_rows(dv, tokens.k_perm).astype(v.dtype)
  return dq, dk, dv
