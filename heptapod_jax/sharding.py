"""One device mesh ('data', 'fsdp', 'tensor') and logical-axis rules from the config.

Model code only names logical axes (see `models/layers.py`); the rules here,
overridable from the config, map them onto mesh axes. The mesh axes are Auto
(jax.make_mesh defaults to Explicit, which Linen's logical constraints do not
use), and Linen only sees a mesh installed with `jax.set_mesh`.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

# logical name -> mesh axis (or axes, or None = replicated). A mesh axis already
# used by an earlier dimension of the same array is skipped, so activations
# ('batch', ..., 'act_embed') shard the batch over data+fsdp while parameters
# ('embed', 'mlp') shard embed over fsdp (ZeRO-3) and mlp over tensor.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('act_embed', None),
    ('act_mlp', 'tensor'),
    ('act_heads', 'tensor'),
    ('act_vocab', 'tensor'),
    ('kv', None),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('vocab', 'tensor'),
    ('grid', None),
    ('classes', None),
    ('norm', None),
    ('layers', None),
)

# Named presets for config.mesh.rules_preset.
RULE_PRESETS = {
    'fsdp_tensor': DEFAULT_RULES,
    'fsdp': tuple((k, None if v == 'tensor' else v) for k, v in DEFAULT_RULES),
    'data_only': tuple((k, 'data' if k == 'batch' else None) for k, _ in DEFAULT_RULES),
}


def resolve_mesh_shape(shape: Sequence[int], num_devices: int, where: str = 'mesh.shape') -> tuple[int, ...]:
  """Fills the one -1 entry so that the product equals num_devices; errors name the field."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f'{where}={shape}: need one size per mesh axis {MESH_AXES}.')
  unknown = [i for i, s in enumerate(shape) if s == -1]
  if len(unknown) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f'{where}={shape}: sizes must be >= 1, with at most one -1.')
  known = math.prod(s for s in shape if s != -1)
  if unknown:
    if num_devices % known:
      raise ValueError(f'{where}={shape}: {num_devices} devices are not divisible by {known}.')
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f'{where}={shape} uses {math.prod(shape)} devices, but {num_devices} are '
                     'available. Use -1 for one axis to take the rest.')
  return shape


def create_mesh(shape: Sequence[int] = (-1, 1, 1), dcn_shape: Sequence[int] = (1, 1, 1),
                devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh over ('data', 'fsdp', 'tensor') with Auto axes.

  Args:
    shape: per-slice (ICI) sizes, one may be -1.
    dcn_shape: sizes across slices / hosts groups (multi-slice); product 1 = one slice.
    devices: defaults to all devices.
  """
  devices = list(devices if devices is not None else jax.devices())
  dcn_shape = tuple(int(s) for s in dcn_shape)
  num_slices = math.prod(dcn_shape)
  if len(devices) % num_slices:
    raise ValueError(f'mesh.dcn_shape={dcn_shape}: {len(devices)} devices cannot form {num_slices} slices.')
  ici = resolve_mesh_shape(shape, len(devices) // num_slices)
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if num_slices > 1:
    arr = mesh_utils.create_hybrid_device_mesh(ici, dcn_shape, devices)
    return Mesh(arr, MESH_AXES, axis_types=axis_types)
  return jax.make_mesh(ici, MESH_AXES, axis_types=axis_types, devices=devices)


def rules_from_config(rules: Any) -> tuple[tuple[str, Any], ...]:
  """Rules as a tuple of (logical, mesh axis or tuple or None), from config lists/tuples."""
  out = []
  for item in rules:
    name, target = item
    if isinstance(target, list):
      target = tuple(target)
    if target is not None and not isinstance(target, (str, tuple)):
      raise ValueError(f'mesh.rules: target of {name!r} must be a mesh axis name, a tuple of '
                       f'them, or None; got {target!r}.')
    for axis in (target if isinstance(target, tuple) else (target,)):
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(f'mesh.rules: {name!r} -> {axis!r} is not a mesh axis {MESH_AXES}.')
    out.append((str(name), target))
  return tuple(out)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree of boxed (LogicallyPartitioned) values or their abstract shapes.

  A dimension whose size the mesh axes do not divide (a 13-entry codebook on
  2-way tensor parallelism, say) is replicated instead of failing at jit time.
  """
  specs = nn.get_partition_spec(boxed_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  shapes = jax.tree.map(lambda x: x.value.shape if isinstance(x, nn.LogicallyPartitioned) else
                        getattr(x, 'shape', ()), boxed_tree,
                        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  return jax.tree.map(lambda s, shape: _divisible(s, shape, mesh), shardings, shapes,
                      is_leaf=lambda x: isinstance(x, NamedSharding))


def _divisible(sharding: NamedSharding, shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  for dim, axes in enumerate(spec):
    names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
    if names and shape[dim] % math.prod(mesh.shape[a] for a in names):
      spec[dim] = None
  return NamedSharding(mesh, P(*spec))


def batch_sharding(mesh: Mesh, rules, ndim: int = 1) -> NamedSharding:
  """Sharding of a batch-leading array: batch over the data axes, the rest replicated."""
  spec = nn.logical_to_mesh_axes(('batch',) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh, rules) -> int:
  """Number of shards of the batch dimension (global batch must divide by it)."""
  spec = nn.logical_to_mesh_axes(('batch',), rules)[0]
  axes = spec if isinstance(spec, tuple) else (spec,) if spec else ()
  return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
