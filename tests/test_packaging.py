"""What an install gives: the core dependencies are enough for the package and its layer,
extras are imported only where used, and the wheel carries the Triton source."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

EXTRAS = ("matplotlib", "tiktoken", "tensorflow_datasets", "orbax", "orbax.checkpoint", "tqdm", "zstandard",
          "jax_triton", "triton", "torch")  # fmt: skip
"""Modules of the optional dependencies ([gpu], [train], [data], [test] in pyproject.toml)."""


def _python(code: str, *, cwd: Path, env: dict | None = None) -> str:
  """stdout of `code` run by this interpreter in a fresh process; fails the test on an error."""
  done = subprocess.run(
      [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
  )
  assert done.returncode == 0, done.stderr
  return done.stdout


def test_import_leaves_the_optional_dependencies_alone(tmp_path):
  # jax itself imports zstandard (its compilation cache) whenever it is installed.
  code = f"""
      import sys
      import scfa_jax
      print(sorted(m for m in {EXTRAS!r} if m in sys.modules and m != "zstandard"))
      """
  assert _python(code, cwd=tmp_path).strip() == "[]"


def test_kernels_never_resolve_to_an_unrelated_package(tmp_path):
  """PyPI has a `kernels` distribution: put an impostor first on sys.path and check
  that scfa_jax still loads its own Triton source, without importing the impostor."""
  impostor = tmp_path / "kernels"
  impostor.mkdir()
  (impostor / "__init__.py").write_text("raise ImportError('the unrelated kernels package was imported')\n")
  code = f"""
      import sys
      sys.path.insert(0, {str(tmp_path)!r})
      import scfa_jax.kernels as ours
      from pathlib import Path
      assert Path(ours.__file__).resolve().parent == Path({str(ROOT / "kernels")!r}), ours.__file__
      assert "kernels" not in sys.modules, "a top-level kernels module was imported"
      print("ok")
      """
  assert _python(code, cwd=tmp_path).strip() == "ok"


def test_the_layer_runs_with_only_the_core_dependencies(tmp_path):
  """The extras made unimportable (None in sys.modules): `import scfa_jax`, the public
  functions and the Flax layer still work, on the XLA backend."""
  code = f"""
      import sys
      for name in {EXTRAS!r}:
        sys.modules[name] = None  # `import name` raises ImportError
      import jax, jax.numpy as jnp
      import numpy as np
      from flax import nnx
      import scfa_jax
      from scfa_jax import reference

      layer = scfa_jax.SparseCausalSelfAttention(width=32, num_heads=2, mode="hash", num_buckets=4,
                                                 rngs=nnx.Rngs(params=0, attention=1))
      x = jax.random.normal(jax.random.PRNGKey(0), (2, 40, 32))

      @nnx.jit
      def step(layer, x):
        return layer(x), nnx.grad(lambda layer: jnp.mean(layer(x) ** 2))(layer)

      y, grads = step(layer, x)
      assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y))), y
      assert all(bool(jnp.all(jnp.isfinite(g)) & jnp.any(g != 0)) for g in jax.tree.leaves(grads))
      q, k, v = jax.random.normal(jax.random.PRNGKey(1), (3, 2, 40, 2, 16))
      buckets = jax.random.randint(jax.random.PRNGKey(2), (2, 40, 2), 0, 3)
      out = scfa_jax.hash_sparse_attention(q, k, v, q_buckets=buckets, k_buckets=buckets)
      want = reference.hash_sparse_attention(q, k, v, q_buckets=buckets, k_buckets=buckets)
      np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
      print("ok")
      """
  assert _python(code, cwd=tmp_path).strip() == "ok"


def test_the_wheel_ships_the_kernels_and_runs_them(tmp_path):
  """Build a wheel from the sources, install it into a folder of its own and run a hash
  attention there through the Triton kernels (in the interpreter) from the installed copy."""
  source = tmp_path / "source"
  source.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, source / name)
  for folder in ("scfa_jax", "kernels"):
    shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
  wheels, site = tmp_path / "wheels", tmp_path / "site"
  pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
  run_pip = lambda *args: subprocess.run([*pip, *args], capture_output=True, text=True, timeout=600)
  built = run_pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(wheels), str(source))
  assert built.returncode == 0, built.stdout + built.stderr
  (wheel,) = wheels.glob("scfa_jax-*.whl")
  installed = run_pip("install", "--no-deps", "--no-index", "--target", str(site), str(wheel))
  assert installed.returncode == 0, installed.stdout + installed.stderr
  names = set(zipfile.ZipFile(wheel).namelist())
  assert {"scfa_jax/kernels/__init__.py", "scfa_jax/kernels/attention.py", "scfa_jax/kernels/plan.py"} <= names
  assert not any(name.startswith("kernels/") for name in names), "a top-level kernels package"

  code = f"""
      import jax, jax.numpy as jnp
      import numpy as np
      import scfa_jax, scfa_jax.kernels.attention
      from scfa_jax import reference

      for module in (scfa_jax, scfa_jax.kernels.attention):
        assert module.__file__.startswith({str(site)!r}), module.__file__
      q, k, v = jax.random.normal(jax.random.PRNGKey(0), (3, 1, 40, 2, 16))
      buckets = jax.random.randint(jax.random.PRNGKey(1), (1, 40, 2), 0, 3)
      kw = dict(q_buckets=buckets, k_buckets=buckets)
      out = scfa_jax.hash_sparse_attention(q, k, v, **kw, implementation="interpret")
      np.testing.assert_allclose(out, reference.hash_sparse_attention(q, k, v, **kw), atol=1e-5, rtol=1e-5)
      print("ok")
      """
  env = dict(os.environ, PYTHONPATH=str(site))  # the installed copy, ahead of the editable one
  assert _python(code, cwd=tmp_path, env=env).strip() == "ok"


def test_a_checkout_that_is_not_installed_finds_its_kernels(tmp_path):
  """A copy of the repository used through PYTHONPATH (no install, so no package-dir mapping):
  the backend loads kernels/ as scfa_jax.kernels from the copy itself."""
  copy = tmp_path / "checkout"
  for part in ("scfa_jax", "kernels"):
    shutil.copytree(ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
  code = f"""
      import sys
      sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]  # no install
      sys.path.insert(0, {str(copy)!r})
      from scfa_jax import triton_backend
      attention = triton_backend._kernels()
      plan = triton_backend._kernels("plan")
      assert attention.__file__.startswith({str(copy)!r}), attention.__file__
      assert plan.K_PAD == attention.K_PAD and hasattr(attention, "scfa_fwd")
      print("ok")
      """
  assert _python(code, cwd=tmp_path).strip() == "ok"
