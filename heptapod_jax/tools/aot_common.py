"""What the ahead-of-time compilations of the train step and of the sampler share.

The configuration to compile (`load_config`: a recipe with its options and `--config.*`
overrides; `model_config`: the validated ModelConfig), the mesh over the target's
devices (`mesh_and_rules`), per-device shard sizes (`tree_shard_bytes`) and the report
lines of a configuration that does not fit (`misfit_lines`). Used by
heptapod_jax/tools/aot_compile.py and heptapod_jax/tools/aot_sampler.py.
"""
from __future__ import annotations

import importlib.util
import math
from typing import Any, Sequence

from heptapod_jax.tools.tpu_topology import GIB


# --------------------------------------------------------------------------- configs


def load_config(config_file: str, overrides: dict[str, Any] | None = None,
                size: str | None = None):
  """The ConfigDict of `config_file` ('configs/x.py[:options]', as --config takes it), with the
  recipe option size=`size` replacing any given one, and the flat `--config.*` overrides."""
  path, _, arg = config_file.partition(':')
  options = [o for o in arg.split(',') if o.strip()]
  if size is not None:
    options = [o for o in options if o.split('=')[0].strip() != 'size'] + [f'size={size}']
  spec = importlib.util.spec_from_file_location('aot_recipe', path)
  if spec is None:
    raise ValueError(f'--config={config_file}: cannot load {path}.')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  try:
    config = module.get_config(','.join(options) or None)
  except ValueError as e:
    if size is not None and "'size'" in str(e):
      raise ValueError(f'--sizes needs a recipe with a size option; {path}: {e}') from None
    raise
  if overrides:
    config.update_from_flattened_dict(dict(overrides))
  return config


def model_config(config):
  """The validated ModelConfig (`config_lib.validate` reads no file). A tokenizer checkpoint is
  not needed to compile from pre-tokenized batches; when the config names one, the model is
  also checked against it."""
  from heptapod_jax import config_lib
  from heptapod_jax.storage.tokenizer_checkpoint import check_model_config
  model = config_lib.validate(config)
  if config.tokenizer.kind in ('vq', 'kl') and config.tokenizer.checkpoint:
    check_model_config(config, model)
  return model


# --------------------------------------------------------------------------- mesh and shards


def mesh_and_rules(config, devices: Sequence[Any]):
  """The mesh of `config.mesh` over `devices` and its logical-axis rules."""
  from heptapod_jax import sharding
  num_slices = len({getattr(d, 'slice_index', 0) for d in devices})
  if math.prod(config.mesh.dcn_shape) != num_slices:
    raise ValueError(f'config.mesh.dcn_shape={tuple(config.mesh.dcn_shape)} spans '
                     f'{math.prod(config.mesh.dcn_shape)} slices, the target has {num_slices} '
                     f'(--num_slices): e.g. --config.mesh.dcn_shape={num_slices},1,1.')
  mesh = sharding.create_mesh(config.mesh.shape, config.mesh.dcn_shape, devices=devices)
  if config.mesh.rules_preset not in sharding.RULE_PRESETS:
    raise ValueError(f'config.mesh.rules_preset={config.mesh.rules_preset!r} is not one of '
                     f'{sorted(sharding.RULE_PRESETS)}.')
  return mesh, sharding.RULE_PRESETS[config.mesh.rules_preset]


def leaf_shard_bytes(x: Any) -> int:
  """Bytes of one device's shard of an abstract array carrying a sharding."""
  return math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize


def tree_shard_bytes(tree: Any) -> int:
  """Bytes of one device's shards of every leaf of `tree` (`leaf_shard_bytes`)."""
  import jax
  return sum(leaf_shard_bytes(x) for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------- report


def gib(n: int | None) -> str:
  """`n` bytes in GiB as a table cell ('-' for None)."""
  return '-' if n is None else f'{n / GIB:.3f}'


def misfit_lines(reports: Sequence[Any]) -> list[str]:
  """A paragraph per configuration that does not fit: what it needs and the knobs."""
  lines = []
  for r in reports:
    if r.fits:
      continue
    total = r.total_bytes if r.total_bytes is not None else r.required_bytes
    how = 'the TPU compiler ran out of memory' if r.oom_message else 'memory_analysis'
    lines.append(f'\n{r.label}: DOES NOT FIT: needs {gib(total)} GiB of {gib(r.hbm_bytes)} GiB '
                 f'per device ({how}). To reduce it:')
    lines += [f'  {tip}' for tip in r.advice]
  return lines
