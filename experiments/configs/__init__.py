"""Named run configs for experiments/train_lm.py, and `--key=value` overrides.

A run config is a `scfa_jax.train.TrainConfig`: a frozen dataclass whose fields (and
the `GPTConfig` fields under `model`) are documented there, one comment per field;
no field is defined anywhere else. Every module in this folder defines

    CONFIGS: dict[str, TrainConfig]

and `all_configs()` merges them (a name defined twice is an error). To add a config,
drop one small file here, e.g. experiments/configs/enwik8.py:

    from scfa_jax.model import preset
    from scfa_jax.train import TrainConfig

    CONFIGS = {
        "enwik8_hash8": TrainConfig(
            data="runs/data/enwik8",  # a prepared folder (scfa_jax.data.prepared)
            model=preset("gpt122m", vocab_size=256, block_size=4096, num_buckets=8),
            batch_size=32, steps=20000, out_dir="runs/enwik8_hash8",
        ),
    }

Overrides: `--steps=50` sets a TrainConfig field; `--model.n_layer=2` a model field
(`--n_layer=2` works too when the name is only a model field). Values are parsed by
the field's type; `None` for optional fields.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import typing

from scfa_jax.train import TrainConfig

DEFAULT = "stdlib_demo"


def all_configs() -> dict[str, TrainConfig]:
  found: dict[str, TrainConfig] = {}
  for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    module = importlib.import_module(f"{__name__}.{info.name}")
    for name, config in getattr(module, "CONFIGS", {}).items():
      if name in found:
        raise ValueError(f"config {name!r} is defined twice (again in {module.__name__})")
      if not isinstance(config, TrainConfig):
        kind = type(config).__name__
        raise TypeError(f"{module.__name__}.CONFIGS[{name!r}] is a {kind}, not a TrainConfig")
      found[name] = config
  return found


def get(name: str) -> TrainConfig:
  configs = all_configs()
  if name not in configs:
    raise ValueError(f"unknown config {name!r}; known: {', '.join(sorted(configs))}")
  return configs[name]


def _parse(text: str, annotation, field: str):
  is_union = typing.get_origin(annotation) in (typing.Union, type(int | None))
  options = typing.get_args(annotation) if is_union else (annotation,)
  if type(None) in options and text.lower() in ("none", "null"):
    return None
  kind = next(t for t in options if t is not type(None))
  if kind is bool:
    if text.lower() in ("1", "true", "yes"):
      return True
    if text.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"--{field} expects true or false, got {text!r}")
  try:
    return kind(text)
  except ValueError:
    raise ValueError(f"--{field} expects a {kind.__name__}, got {text!r}") from None


def _replace(obj, path: list[str], text: str, full: str):
  hints = typing.get_type_hints(type(obj))
  names = {f.name for f in dataclasses.fields(obj)}
  if path[0] not in names:
    raise ValueError(f"unknown field --{full}; {type(obj).__name__} has: {', '.join(sorted(names))}")
  if len(path) > 1:
    child = getattr(obj, path[0])
    if not dataclasses.is_dataclass(child):
      raise ValueError(f"--{full}: {path[0]} has no sub-fields")
    return dataclasses.replace(obj, **{path[0]: _replace(child, path[1:], text, full)})
  if dataclasses.is_dataclass(getattr(obj, path[0])):
    raise ValueError(f"--{full} is a group of fields; set --{full}.<field>=value")
  return dataclasses.replace(obj, **{path[0]: _parse(text, hints[path[0]], full)})


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
  """config with each `--key=value` (or `key=value`) applied in order."""
  top = {f.name for f in dataclasses.fields(config)}
  model_fields = {f.name for f in dataclasses.fields(config.model)}
  for item in overrides:
    key, sep, text = item.removeprefix("--").partition("=")
    if not sep:
      raise ValueError(f"overrides look like --key=value, got {item!r}")
    path = key.split(".")
    if path[0] not in top and path[0] in model_fields:
      path = ["model", *path]
    config = _replace(config, path, text, key)
  return config
