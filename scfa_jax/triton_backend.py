"""Triton backend (work in progress: the kernels land with the Triton-kernel issue).

The only module that imports jax_triton, lazily.
"""

from __future__ import annotations

import importlib.util

import jax


def default_available(q: jax.Array) -> bool:
  """Whether implementation=None should pick Triton for q: a GPU and jax_triton."""
  if jax.default_backend() != "gpu":
    return False
  try:
    import jax_triton  # noqa: F401, PLC0415
  except ImportError:
    return False
  return True


def check_supported(implementation: str, q: jax.Array) -> None:
  """Raises ValueError when `implementation` cannot run q here."""
  raise ValueError(
      f"implementation={implementation!r} is not available yet: the Triton kernels are not built; "
      "use implementation='xla'"
  )
