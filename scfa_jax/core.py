"""The one autodiff boundary: a custom_vjp over sorted tokens, dispatching to a backend.

Every backend module provides

    forward(config, q, k, v, tokens, *, differentiating) -> (o, residuals)
    backward(config, q, k, v, tokens, o, residuals, do) -> (dq, dk, dv)

with q [B, T, N, H], k and v [B, S, K, H] (K dividing N) and o, dq, dk, dv in that original layout, and
`tokens` a `SortedTokens`. `residuals` is the backend's own pytree between its forward
and backward, built in full only when `differentiating`: the XLA backend's is the
log-sum-exp per query slot, the Triton backend's adds its tile plans.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import jax
from jax.ad_checkpoint import checkpoint_name

from scfa_jax import triton_backend, xla  # neither imports triton or jax_triton before a launch
from scfa_jax.sorting import SortedTokens

Implementation = Literal["xla", "triton", "interpret"]

CHECKPOINT_NAME = "scfa_attention_output"
"""Name given to attention outputs, so that a remat policy can keep them."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig:
  """Static settings of one attention call; hashable, the custom_vjp's static argument."""

  implementation: Implementation
  strict: bool
  scale: float
  kernel: Any = None  # triton_backend.KernelConfig overriding the tile table (benchmarks); None: the table


_BACKENDS = {"xla": xla, "triton": triton_backend, "interpret": triton_backend}


def _backend(config: AttentionConfig):
  return _BACKENDS[config.implementation]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(config, q, k, v, tokens):
  o, _ = _backend(config).forward(config, q, k, v, tokens, differentiating=False)
  return o


def _attention_fwd(config, q, k, v, tokens):
  o, saved = _backend(config).forward(config, q, k, v, tokens, differentiating=True)
  return o, (q, k, v, tokens, o, saved)


def _attention_bwd(config, residuals, do):
  q, k, v, tokens, o, saved = residuals
  dq, dk, dv = _backend(config).backward(config, q, k, v, tokens, o, saved, do)
  return dq, dk, dv, None  # the sort order is not differentiated


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, tokens: SortedTokens, config: AttentionConfig
) -> jax.Array:
  """SCFA over `tokens`; differentiable in q, k, v. Inputs are validated by the caller."""
  return checkpoint_name(_attention(config, q, k, v, tokens), CHECKPOINT_NAME)
