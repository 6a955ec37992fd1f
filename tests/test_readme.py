"""The README stays true: its example runs as written and CI runs its test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_example_runs_as_written():
  blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
  assert blocks, "the README has no python example"
  namespace: dict = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
  assert namespace["out"].shape == namespace["q"].shape
  assert namespace["grads"].shape == namespace["q"].shape


def test_ci_runs_exactly_the_readme_test_command():
  lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith("#")]
  command = lines[-1].strip()
  assert command in README, f"CI runs {command!r}, which the README does not show"
  shell_blocks = "".join(re.findall(r"```bash\n(.*?)```", README, flags=re.S))
  commands = [line for line in shell_blocks.splitlines() if line.strip() and not line.startswith("#")]
  assert len(commands) == 2 and command in commands, "the README gives exactly two commands: main job and tests"
