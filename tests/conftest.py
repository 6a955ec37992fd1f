"""Settings shared by every test."""

import os

# The README's test command runs the tests in parallel workers (pytest -n auto); on a GPU they
# share one device, so none may take most of its memory up front (JAX's default).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
