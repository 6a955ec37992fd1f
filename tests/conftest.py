"""Test setup shared by all test files."""

import os
import shutil

# Triton's interpreter is a process-wide mode chosen when triton is first imported: turn
# it on for machines without an NVIDIA GPU, so implementation="interpret" can run there.
if shutil.which("nvidia-smi") is None:
  os.environ.setdefault("TRITON_INTERPRET", "1")
