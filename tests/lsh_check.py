"""The check of LSH buckets that the interpreter and GPU tests share."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from scfa_jax import lsh


def check_buckets(got, x, rotations, segment_ids=None, *, tolerance=0.0):
  """got equals the argmax of the centered signed projections, computed in float32 at
  the highest matmul precision; where it differs, the value got picked is within
  `tolerance` (relative) of the largest: a near-tie that rounding may break either way."""
  with jax.default_matmul_precision("highest"):
    projected = lsh._project(lsh.unit_vectors(x), rotations)
    centered = projected - lsh._earlier_mean(projected, segment_ids)
  values = np.asarray(jnp.concatenate([centered, -centered], axis=-1))
  best = values.max(axis=-1)
  picked = np.take_along_axis(values, np.asarray(got, np.int64)[..., None], axis=-1)[..., 0]
  assert got.shape == x.shape[:3] and got.dtype == lsh.bucket_dtype(values.shape[-1])
  off = best - picked
  assert np.all(off <= tolerance * (1 + np.abs(best))), (
      f"{int(np.sum(off > tolerance * (1 + np.abs(best))))} of {off.size} buckets not the argmax, "
      f"worst by {float(off.max())}"
  )
  return float(np.mean(off > 0))
