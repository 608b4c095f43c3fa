"""The target of ahead-of-time compilation: a TPU slice, its compile-only devices, their HBM.

`parse_topology` reads a Cloud TPU name (v5e-256 = v5litepod-256, v6e-256: chips;
v4-64, v5p-128: TensorCores, i.e. 2 x chips) or libtpu's `version:shape`
(v5e:16x16, v5p:4x4x4, v4:2x4x4) into a `Topology`; `topology_devices` gives the
devices of one or more such slices from libtpu, the TPU compiler, which runs on any
Linux x86-64 host, no TPU needed.

`hbm_limit` is what the TPU compiler lets one device use. Compile-only devices
report no memory size, so it is read from the compiler's out-of-memory verdict on
a probe program (`parse_hbm_oom`, which also reads the verdict on a program that
does not fit), else the chip's nominal HBM.

Used by heptapod_jax/tools/aot_compile.py (the train step) and
heptapod_jax/tools/aot_sampler.py (the sampler).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import re
from typing import Any

GIB = 2**30

# Cloud TPU accelerator names: family -> (libtpu version name, TensorCores counted per chip in
# the name, dimensions of the slice's torus).
_FAMILIES = {
    'v5e': ('v5e', 1, 2),
    'v5litepod': ('v5e', 1, 2),
    'v6e': ('v6e', 1, 2),
    'v4': ('v4', 2, 3),
    'v5p': ('v5p', 2, 3),
}
_MAX_2D_CHIPS = 256  # v5e / v6e single slices end at 16x16.
_VALID_NAMES = ("a Cloud TPU name: v5e-N or v5litepod-N and v6e-N (N chips: 1, 4, 8, 16, ..., "
                "256), v4-N and v5p-N (N TensorCores = 2 x chips: 8, 16, 32, 64, 128, ...), e.g. "
                "v5e-256, v5p-128, v4-64, v6e-256; or libtpu's version:shape in chips, e.g. "
                "v5e:16x16, v6e:8x8, v5p:4x4x4, v5p:4x4x12, v4:2x4x4")
# Nominal HBM per chip (= per JAX device: v4 and v5p run as megacore), used only when the
# compiler's own limit cannot be read.
_NOMINAL_HBM_GIB = {'TPU v4': 32, 'TPU v5 lite': 16, 'TPU v5': 95, 'TPU v6 lite': 32}


# --------------------------------------------------------------------------- topology


@dataclasses.dataclass(frozen=True)
class Topology:
  """A target TPU slice as libtpu names it."""
  name: str  # As the user gave it.
  libtpu_name: str  # 'v5e:16x16'
  chips: int
  options: tuple[tuple[str, str], ...] = ()  # Extra get_topology_desc arguments.


def _standard_shape(chips: int, dims: int) -> tuple[int, ...]:
  """Slice shape of `chips` chips, as Cloud TPU lays them out: 2D 2x2, 2x4, 4x4, ..., 16x16;
  3D 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ... (double the smallest side, the last one
  among equals)."""
  if chips == 1:
    return (1,) * dims
  shape = [2, 2] + [1] * (dims - 2)
  while math.prod(shape) < chips:
    i = max(range(dims), key=lambda k: (-shape[k], k))
    shape[i] *= 2
  return tuple(shape)


def parse_topology(name: str) -> Topology:
  """'v5e-256' / 'v5p-128' / 'v5e:16x16' -> Topology; ValueError lists the valid forms."""
  text = name.strip().lower()
  cloud = re.fullmatch(r'([a-z0-9]+)-(\d+)', text)
  raw = re.fullmatch(r'([a-z0-9]+):(\d+(?:x\d+)+)', text)
  if cloud and cloud.group(1) in _FAMILIES:
    version, per_chip, dims = _FAMILIES[cloud.group(1)]
    count = int(cloud.group(2))
    chips = count // per_chip
    power_of_two = chips >= 1 and chips & (chips - 1) == 0
    if (count % per_chip or not power_of_two or (dims == 3 and chips < 4)
        or (dims == 2 and (chips == 2 or chips > _MAX_2D_CHIPS))):
      raise ValueError(f'--topology={name}: no such {cloud.group(1)} slice; give {_VALID_NAMES}.')
    shape = 'x'.join(str(s) for s in _standard_shape(chips, dims))
    libtpu_name = f'{version}:{shape}'
  elif raw:
    version = 'v5e' if raw.group(1) == 'v5litepod' else raw.group(1)
    libtpu_name = f'{version}:{raw.group(2)}'
    chips = math.prod(int(s) for s in raw.group(2).split('x'))
  else:
    raise ValueError(f'--topology={name!r} is not {_VALID_NAMES}.')
  # One JAX device per v4 chip (megacore), as JAX runs v4; libtpu's default is one per core.
  options = (('chip_config_name', 'megacore'),) if libtpu_name.startswith('v4:') else ()
  return Topology(name=name, libtpu_name=libtpu_name, chips=chips, options=options)


@contextlib.contextmanager
def _libtpu_environment():
  """libtpu as a compile-only library on a host without TPUs: let it load beside another
  libtpu process (its machine-wide lock file guards chips a compile never touches) and give
  it a worker list (else it logs a failed metadata-server lookup). Restored afterwards;
  values already set (a real TPU VM) are kept."""
  wanted = {'ALLOW_MULTIPLE_LIBTPU_LOAD': '1', 'TPU_WORKER_HOSTNAMES': 'localhost'}
  saved = {k: os.environ.get(k) for k in wanted}
  for key, value in wanted.items():
    os.environ.setdefault(key, value)
  try:
    yield
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value


def topology_devices(topology: Topology, num_slices: int = 1) -> list[Any]:
  """The compile-only devices of `num_slices` slices of `topology` (libtpu, no TPU needed)."""
  import jax
  from jax.experimental import topologies
  if importlib.util.find_spec('libtpu') is None and not os.environ.get('TPU_LIBRARY_PATH'):
    raise RuntimeError('Ahead-of-time compilation for TPU needs libtpu, the TPU compiler: '
                       '`pip install libtpu` at the version of requirements-dev.txt (it runs on '
                       'any Linux x86-64 host, no TPU needed).')
  kwargs = dict(topology.options)
  if num_slices > 1:
    kwargs['num_slices'] = num_slices
  try:
    with _libtpu_environment():
      devices = list(topologies.get_topology_desc(topology_name=topology.libtpu_name,
                                                  platform='tpu', **kwargs).devices)
  except jax.errors.JaxRuntimeError as e:
    raise ValueError(f'--topology={topology.name} ({topology.libtpu_name}): libtpu does not '
                     f'know it ({str(e).splitlines()[0]}); give {_VALID_NAMES}.') from None
  return devices


_HBM_OOM = re.compile(r'required for [\w ]+\(([\d.]+)([KMGT]?)\) exceeds available HBM '
                      r'\(([\d.]+)([KMGT]?)\)')
_HBM_USED = re.compile(r'Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm')
_UNIT = {'': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}


def parse_hbm_oom(message: str) -> tuple[int, int] | None:
  """(bytes required, bytes available) from the TPU compiler's out-of-memory error, or None."""
  match = _HBM_OOM.search(message) or _HBM_USED.search(message)
  if not match:
    return None
  need, need_unit, have, have_unit = match.groups()
  return int(float(need) * _UNIT[need_unit]), int(float(have) * _UNIT[have_unit])


def hbm_limit(device: Any) -> tuple[int, str]:
  """(bytes of HBM one device may use, where the figure comes from).

  An attached device reports its `bytes_limit`. Compile-only devices report
  nothing, so the limit is read from the TPU compiler's verdict on a probe
  program with a 1 TiB output (compiling it takes milliseconds); if that
  message cannot be read, the chip's nominal HBM.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  try:
    return int(device.memory_stats()['bytes_limit']), 'device memory_stats'
  except Exception:  # Compile-only devices: "only supported for addressable PjRt devices".
    pass
  mesh = jax.sharding.Mesh(np.array([device]), ('x',))
  one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  probe = jax.jit(lambda x: jnp.broadcast_to(x, (2**18, 2**20)), in_shardings=one,
                  out_shardings=one)
  try:
    probe.lower(jax.ShapeDtypeStruct((2**20,), jnp.float32)).compile()
  except jax.errors.JaxRuntimeError as e:
    parsed = parse_hbm_oom(str(e))
    if parsed:
      return parsed[1], 'TPU compiler limit'
  nominal = _NOMINAL_HBM_GIB.get(device.device_kind)
  if nominal is None:
    raise ValueError(f'HBM of a {device.device_kind!r} device is unknown: pass --hbm_gib.')
  return nominal * GIB, 'nominal HBM of the chip'
