"""The scripts of experiments/, run as a user runs them: in a fresh process of this interpreter."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def run_script(name: str, *args: str, cwd: Path | None = None, fails: bool = False) -> subprocess.CompletedProcess:
  """Runs experiments/`name` with `args`; asserts that it succeeds (or, with `fails`, that it
  exits with an error) and returns the finished process, stdout and stderr as text."""
  done = subprocess.run(
      [sys.executable, str(EXPERIMENTS / name), *args], capture_output=True, text=True, cwd=cwd, timeout=600
  )
  if fails:
    assert done.returncode != 0, f"{name} {args} succeeded:\n{done.stdout}"
  else:
    assert done.returncode == 0, f"{name} {args} failed:\n{done.stdout}\n{done.stderr}"
  return done


def load_script(name: str) -> ModuleType:
  """experiments/`name` imported as a module (its `main` not run), to test its functions."""
  spec = importlib.util.spec_from_file_location(Path(name).stem, EXPERIMENTS / name)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
