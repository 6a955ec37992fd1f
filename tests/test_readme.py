"""The README and docs/usage.md stay true: every python example runs as written, and CI runs the
README's test command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
USAGE_BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "usage.md").read_text(), flags=re.S)


def run_block(index: int) -> dict:
  """Runs the README's python block `index` in a fresh namespace (each block has its own
  imports) and returns that namespace."""
  namespace: dict = {}
  exec(compile(PYTHON_BLOCKS[index], f"README.md, python block {index + 1}", "exec"), namespace)  # noqa: S102
  return namespace


def test_readme_has_python_examples():
  assert len(PYTHON_BLOCKS) >= 3, "the README shows the functions, the primitive and the Flax layer"


def test_readme_example_runs_as_written():
  namespace = run_block(0)
  assert namespace["out"].shape == namespace["q"].shape
  assert namespace["grads"].shape == namespace["q"].shape


@pytest.mark.parametrize("index", range(1, len(PYTHON_BLOCKS)))
def test_every_other_python_block_runs(index):
  namespace = run_block(index)
  if "out" in namespace:  # an attention example
    assert namespace["out"].shape == namespace["q"].shape
  if "y" in namespace:  # a layer example
    assert namespace["y"].shape == namespace["x"].shape


@pytest.mark.parametrize("index", range(len(USAGE_BLOCKS)))
def test_every_python_block_of_the_usage_page_runs(index):
  namespace: dict = {}
  exec(compile(USAGE_BLOCKS[index], f"docs/usage.md, python block {index + 1}", "exec"), namespace)  # noqa: S102
  if "out" in namespace and "q" in namespace:
    assert namespace["out"].shape == namespace["q"].shape
  if "y" in namespace:
    assert namespace["y"].shape == namespace["x"].shape


def test_ci_runs_exactly_the_readme_test_command():
  lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith("#")]
  command = lines[-1].strip()
  assert command in README, f"CI runs {command!r}, which the README does not show"
  shell_blocks = "".join(re.findall(r"```bash\n(.*?)```", README, flags=re.S))
  commands = [line for line in shell_blocks.splitlines() if line.strip() and not line.startswith("#")]
  assert len(commands) == 2 and command in commands, "the README gives exactly two commands: main job and tests"
