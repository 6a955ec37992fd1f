"""Sample digits from a trained MNIST run and save them as a PNG grid.

    python experiments/sample_mnist.py --config=mnist_hash8          # -> runs/mnist_hash8/samples.png
    python experiments/sample_mnist.py --config=mnist_hash8 --num=64 --out_dir=runs/other

Restores the run's last checkpoint; `--key=value` overrides work as in train_lm.py.
Or draw the image(s) that train_lm.py left in a run's samples.txt, without a model:

    python experiments/sample_mnist.py --samples_txt=runs/mnist_hash8/samples.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from experiments import configs  # noqa: E402


def main(argv: list[str]) -> Path:
  name, num, seed, path, overrides = None, 16, 0, None, []
  for arg in argv:
    key, _, value = arg.removeprefix("--").partition("=")
    if arg in ("-h", "--help"):
      print(__doc__)
      sys.exit(0)
    if key == "config":
      name = value
    elif key == "num":
      num = int(value)
    elif key == "sample_seed":
      seed = int(value)
    elif key == "png":
      path = value
    elif key == "samples_txt":
      return _from_text(Path(value), path)
    else:
      overrides.append(arg)
  if name is None:
    sys.exit("error: --config=NAME is required (the run to sample from, e.g. --config=mnist_hash8)")
  config = configs.apply_overrides(configs.get(name), overrides)
  out = sample_grid_from_run(config, path, num=num, seed=seed)
  print(f"samples: {out}")
  return out


def sample_grid_from_run(config, path: str | None = None, *, num: int = 16, seed: int = 0) -> Path:
  """Restores the last checkpoint of a finished (or running) MNIST run and saves a grid of samples.

  config: the run's `scfa_jax.train.TrainConfig`; path defaults to out_dir/samples.png.
  """
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from scfa_jax import train  # noqa: PLC0415
  from scfa_jax.data import mnist  # noqa: PLC0415

  trainer = train.Trainer.create(config)
  checkpoints = train.Checkpoints(Path(config.out_dir) / "checkpoints")
  step = checkpoints.latest_step()
  if step is None:
    sys.exit(f"error: no checkpoint in {config.out_dir}/checkpoints: train the run first")
  trainer.state = checkpoints.restore(step, trainer.state)
  checkpoints.close()
  images = mnist.sample(trainer.model(), num=num, key=jax.random.key(seed))
  path = Path(config.out_dir) / "samples.png" if path is None else path
  return mnist.save_grid(np.asarray(jax.device_get(images)), path, title=f"{Path(config.out_dir).name}, step {step}")


def _from_text(samples: Path, path: str | None) -> Path:
  import numpy as np

  from scfa_jax.data import mnist

  tokens = np.array(samples.read_text().split(), dtype=np.int64)
  out = mnist.save_grid(tokens, samples.with_suffix(".png") if path is None else path)
  print(f"samples: {out}")
  return out


if __name__ == "__main__":
  main(sys.argv[1:])
