"""Train a GPT with SCFA attention. With no arguments: the CPU demo on the stdlib corpus.

    python experiments/train_lm.py                              # stdlib_demo, about 5 min on 2 CPU cores
    python experiments/train_lm.py --config=gpt122m_hash16      # the paper's 122M model (GPU)
    python experiments/train_lm.py --steps=50 --model.num_buckets=8 --out_dir=runs/try
    python experiments/train_lm.py --config=gpt122m_hash16 --print_config   # the settings, as JSON
    python experiments/train_lm.py --list_configs                           # every config, as JSON

Run configs live in experiments/configs/ (see its docstring); `--key=value` overrides
any field. Several processes (hosts): start one per host with
--coordinator_address=HOST:PORT --num_processes=N --process_id=I (or the
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables;
--coordinator_address=auto on SLURM or Open MPI). Running the same command again
resumes from the last checkpoint in out_dir.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from experiments import configs  # noqa: E402

LAUNCH_FLAGS = ("coordinator_address", "num_processes", "process_id")


def main(argv: list[str]) -> dict:
  name, launch, overrides, print_config = configs.DEFAULT, {}, [], False
  for arg in argv:
    key, _, value = arg.removeprefix("--").partition("=")
    if arg in ("-h", "--help"):
      print(__doc__ + "\nconfigs: " + ", ".join(sorted(configs.all_configs())))
      sys.exit(0)
    if arg == "--list_configs":
      print(json.dumps({n: dataclasses.asdict(c) for n, c in sorted(configs.all_configs().items())}, indent=2))
      sys.exit(0)
    if arg == "--print_config":
      print_config = True
    elif key == "config":
      name = value
    elif key in LAUNCH_FLAGS:
      launch[key] = value
    else:
      overrides.append(arg)
  try:
    config = configs.apply_overrides(configs.get(name), overrides)
  except ValueError as error:  # an unknown config or field, or a value of the wrong type
    sys.exit(f"error: {error}")
  if print_config:
    print(json.dumps(dataclasses.asdict(config), indent=2))
    sys.exit(0)

  from scfa_jax import train  # noqa: PLC0415  (after parsing: --help stays instant)

  train.maybe_initialize_distributed(**launch)
  summary = train.train(config)
  if "plot" in summary:
    print(f"\nconfig {name}: final validation loss {summary['val_loss']:.4f} after {summary['step']} steps")
    print(f"metrics: {summary['metrics']}\nplot:    {summary['plot']}")
    if "samples" in summary:
      print(f"samples: {summary['samples']}")
  return summary


if __name__ == "__main__":
  main(sys.argv[1:])
