"""Fixed-length training windows from flat token arrays, a pure function of (seed, step).

Windows are drawn at uniformly random offsets of the packed token stream (documents
joined by end-of-text tokens, nanoGPT style). Nothing here holds state: the batch of
step s is the same whether the run started at step 0 or resumed at step s, and each
process of a multi-host run slices its own rows out of the same global batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _starts(rng: np.random.Generator, n_tokens: int, length: int, count: int, record_length: int | None):
  last = n_tokens - (length + 1)
  if last < 0:
    raise ValueError(f"the split has {n_tokens} tokens, fewer than one window of {length + 1}")
  if record_length:
    return rng.integers(0, last // record_length + 1, size=count) * record_length
  return rng.integers(0, last + 1, size=count)


def _windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
  return np.stack([np.asarray(tokens[s : s + length + 1], dtype=np.int32) for s in starts.ravel()]).reshape(
      *starts.shape, length + 1
  )


def train_batch(
    tokens: np.ndarray,
    *,
    seed: int,
    step: int,
    shape: tuple[int, ...],
    length: int,
    rows: slice = slice(None),
    record_length: int | None = None,
) -> np.ndarray:
  """int32 windows [*shape, length + 1] for `step`; inputs are [..., :-1], targets [..., 1:].

  `rows` selects along the last axis of `shape` (a process's share of the batch);
  the offsets are drawn for the whole global batch either way.
  """
  rng = np.random.default_rng([seed, step])
  starts = _starts(rng, len(tokens), length, int(np.prod(shape)), record_length).reshape(shape)
  return _windows(tokens, starts[..., rows], length)


def eval_batches(
    tokens: np.ndarray, *, num_batches: int, batch_size: int, length: int, record_length: int | None = None
) -> np.ndarray:
  """The fixed evaluation set: int32 [num_batches, batch_size, length + 1], evenly spaced offsets."""
  last = len(tokens) - (length + 1)
  if last < 0:
    raise ValueError(f"the split has {len(tokens)} tokens, fewer than one window of {length + 1}")
  starts = np.linspace(0, last, num_batches * batch_size).astype(np.int64)
  if record_length:
    starts = starts // record_length * record_length
  return _windows(tokens, starts.reshape(num_batches, batch_size), length)


def document_segments(tokens, eot_token: int):
  """Segment ids and positions of the documents packed in windows int [..., T].

  An end-of-text token opens the document after it (it plays the start token the next
  document's first prediction is made from), so segment t counts the end-of-text tokens
  at positions <= t, and positions restart at 0 on each end-of-text token. A window's
  first document starts at its first position. Returns int32 (segment_ids, positions),
  both [..., T]; jnp, so that it runs inside the jitted step.
  """
  is_eot = jnp.asarray(tokens) == eot_token
  segment_ids = jnp.cumsum(is_eot, axis=-1, dtype=jnp.int32)
  index = jnp.broadcast_to(jnp.arange(is_eot.shape[-1], dtype=jnp.int32), is_eot.shape)
  start = jax.lax.cummax(jnp.where(is_eot, index, 0), axis=is_eot.ndim - 1)
  return segment_ids, index - start
