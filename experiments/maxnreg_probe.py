"""Measurement probe: `profile_attention.py` with a register cap on chosen kernels.

Not used by the library. jax-triton 0.3.1 builds Triton's compile options without
`maxnreg`, so the tile table cannot cap registers; this probe wraps jax-triton's compile
entry (a private function of 0.3.1) so that the kernels named in SCFA_MAXNREG compile with
the cap, to measure what a cap would buy (results/profile_h200_16k_register_caps.json).
jax-triton's kernel cache does not key on the cap, so a process holds one setting:

  SCFA_MAXNREG=scfa_bwd_dkdv:128 python experiments/maxnreg_probe.py --cases=hash16,hash64
  SCFA_MAXNREG=scfa_fwd:80,scfa_bwd_dq:96 python experiments/maxnreg_probe.py --cases=hash64

Other arguments go to profile_attention.py. Without a GPU,
`kernel_resources.py --maxnreg=dkdv:128,dq:96,fwd:80` builds the capped kernels and shows
the spills (stack bytes per thread) each cap costs.
"""

from __future__ import annotations

import os
import runpy
import sys
import tempfile
from pathlib import Path


def _caps() -> dict[str, int]:
  spec = os.environ.get("SCFA_MAXNREG", "")
  try:
    return {name: int(cap) for name, cap in (item.split(":") for item in spec.split(",") if item)}
  except ValueError:
    raise ValueError(f"SCFA_MAXNREG must read kernel:registers[,kernel:registers], got {spec!r}") from None


def main() -> None:
  caps = _caps()
  import jax_triton.triton_lib as triton_lib  # noqa: PLC0415
  from triton import knobs  # noqa: PLC0415

  if not knobs.cache.dir:  # a machine that sets TRITON_CACHE_DIR="" breaks triton.testing.do_bench
    knobs.cache.dir = tempfile.mkdtemp(prefix="triton_cache_")
  compile_kernel = triton_lib.get_or_create_triton_kernel

  def capped(backend_init_func, platform, fn, *args, **kwargs):
    cap = caps.get(fn.__name__)
    if cap is None:
      return compile_kernel(backend_init_func, platform, fn, *args, **kwargs)
    patched = []

    def init(*a, **k):
      backend = backend_init_func(*a, **k)
      parse = backend.parse_options
      backend.parse_options = lambda opts: parse(dict(opts, maxnreg=cap))
      patched.append((backend, parse))
      return backend

    print(f"maxnreg {fn.__name__} {cap}", flush=True)
    try:
      return compile_kernel(init, platform, fn, *args, **kwargs)
    finally:  # the backend object may be shared: later kernels compile uncapped
      for backend, parse in patched:
        backend.parse_options = parse

  triton_lib.get_or_create_triton_kernel = capped
  script = Path(__file__).resolve().parent / "profile_attention.py"
  sys.argv = [str(script), *sys.argv[1:]]
  runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
  main()
