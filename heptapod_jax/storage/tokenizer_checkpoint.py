"""Tokenizer checkpoints: the format, and the configured tokenizer built from one.

The format sits on top of `heptapod_jax.storage.checkpoint`.

A tokenizer checkpoint is an ordinary `Checkpointer` directory
(`<directory>/<step>/{state, data, config}`) whose

  state  = {'params': params, 'ema_params': params'}   (VQModel / KLModel params trees)
  config = {'kind': 'vq' | 'kl', 'config': dataclasses.asdict(VQConfig | KLConfig)}

so the tokenizer trainer's own checkpoints can follow the same layout, and the
importers of the public PyTorch weights write it with `ema_params == params`.
Loading validates everything that can be validated from metadata before any
array is read: the stored config's architecture, and every parameter's shape.

Where a run is assembled, `make_tokenizer(config.tokenizer, image_size)` builds the
tokenizer the experiment config names with its parameters, and
`check_model_config(config, model_config)` checks the model section against the
tokenizer stored on disk (grid, vocabulary, latent channels): the checks that
`config_lib.validate`, which never touches the file system, cannot make.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from heptapod_jax.models import tokenizers
from heptapod_jax.models.config import ModelConfig
from heptapod_jax.models.tokenizers import autoencoder as ae
from heptapod_jax.models.tokenizers import kl as kl_lib
from heptapod_jax.models.tokenizers import vq as vq_lib
from heptapod_jax.storage import checkpoint as ckpt_lib
from heptapod_jax.storage import checkpoint_read
from heptapod_jax.storage import paths

KINDS = {'vq': vq_lib.VQConfig, 'kl': kl_lib.KLConfig}
_ABSTRACT = {'vq': vq_lib.abstract_params, 'kl': kl_lib.abstract_params}


def kind_of(config: Any) -> str:
  """'vq' or 'kl' for a VQConfig / KLConfig."""
  for kind, cls in KINDS.items():
    if isinstance(config, cls):
      return kind
  raise TypeError(f'expected a VQConfig or KLConfig, got {type(config).__name__}.')


def tokenizer_for(kind: str, config: Any) -> Any:
  """The frozen tokenizer wrapper (VQTokenizer / KLTokenizer) for a kind and config."""
  if kind == 'vq':
    return vq_lib.VQTokenizer(config)
  if kind == 'kl':
    return kl_lib.KLTokenizer(config)
  raise ValueError(f'tokenizer kind {kind!r}; valid: {sorted(KINDS)}.')


def abstract_params(config: Any) -> Any:
  """The params tree of a VQConfig / KLConfig as jax.ShapeDtypeStructs."""
  return _ABSTRACT[kind_of(config)](config)


def save_tokenizer(directory: str, kind: str, config: Any, params: Any, step: int = 0, *,
                   ema_params: Any | None = None) -> None:
  """Writes a tokenizer checkpoint (synchronously; call on every process).

  Args:
    directory: checkpoint root; the step is written to `<directory>/<step>/`.
    kind: 'vq' or 'kl'.
    config: the VQConfig / KLConfig the params belong to.
    params: the module's params tree (arrays of any kind; numpy is fine).
    step: the step number to write.
    ema_params: the EMA tree; defaults to `params` (imported weights have no EMA).

  Raises:
    ValueError: kind and config disagree, or params do not fit the config.
  """
  if kind not in KINDS:
    raise ValueError(f'tokenizer kind {kind!r}; valid: {sorted(KINDS)}.')
  if kind_of(config) != kind:
    raise ValueError(f'kind={kind!r} but config is a {type(config).__name__}.')
  expected = abstract_params(config)
  to_array = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  params = jax.tree.map(to_array, params)
  ema_params = params if ema_params is None else jax.tree.map(to_array, ema_params)
  for name, tree in (('params', params), ('ema_params', ema_params)):
    stored = {'/'.join(p): tuple(v.shape) for p, v in ae.flatten_params(tree).items()}
    _compare_shapes(stored, expected, f'{name} being saved')
  meta = {'kind': kind, 'config': dataclasses.asdict(config)}
  with ckpt_lib.Checkpointer(directory, save_interval_steps=1, max_to_keep=1 << 30,
                             async_save=False) as checkpointer:
    if step in checkpointer.all_steps():
      raise FileExistsError(f'{directory} already holds step {step}.')
    checkpointer.save(step, {'params': params, 'ema_params': ema_params}, data_state={},
                      config=meta, force=True)


def _open(directory: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      epath.Path(directory),
      item_names=(ckpt_lib.STATE, ckpt_lib.DATA, ckpt_lib.CONFIG),
      item_handlers={
          ckpt_lib.STATE: ocp.PyTreeCheckpointHandler(),
          ckpt_lib.DATA: ocp.JsonCheckpointHandler(),
          ckpt_lib.CONFIG: ocp.JsonCheckpointHandler(),
      },
      options=ocp.CheckpointManagerOptions(read_only=True, create=False))


def read_metadata(directory: str, step: int | None = None,
                  key: str = 'ema_params') -> tuple[int, dict[str, Any], dict[str, tuple[int, ...]]]:
  """Reads (step, stored config JSON, {param path: shape} of subtree `key`) without loading arrays.

  Raises:
    FileNotFoundError: no checkpoint (or no such step) in `directory`.
    KeyError: the state has no subtree `key`.
  """
  path = epath.Path(directory)
  if not path.exists():
    raise FileNotFoundError(f'tokenizer checkpoint directory {path} does not exist.')
  manager = _open(directory)
  try:
    step = checkpoint_read.resolve_step(manager, path, step)
    tree = manager.item_metadata(step)[ckpt_lib.STATE]
    tree = getattr(tree, 'tree', tree)
    for k in key.split('/'):
      if not isinstance(tree, Mapping) or k not in tree:
        top = sorted(tree) if isinstance(tree, Mapping) else []
        raise KeyError(f'tokenizer checkpoint {path}/{step} has no parameter subtree {key!r} '
                       f'(keys: {top}).')
      tree = tree[k]
    shapes = {'/'.join(p): tuple(leaf.shape) for p, leaf in ae.flatten_params(tree).items()}
    config = manager.restore(step, args=ocp.args.Composite(**{
        ckpt_lib.CONFIG: ocp.args.JsonRestore()}))[ckpt_lib.CONFIG]
  finally:
    manager.close()
  return step, config, shapes


def read_tokenizer_config(directory: str, *, key: str = 'ema_params',
                          step: int | None = None) -> tuple[str, Any]:
  """(kind, VQConfig | KLConfig) stored in a tokenizer checkpoint, read without loading arrays."""
  step, meta, _ = read_metadata(directory, step, key)
  return _config_from_json(meta, f'tokenizer checkpoint {directory} (step {step}, {key})')


def _compare_shapes(stored: Mapping[str, tuple[int, ...]], expected: Any, where: str) -> None:
  """Raises ValueError at the first parameter (sorted paths) whose stored shape differs or is missing."""
  want = {'/'.join(p): tuple(v.shape) for p, v in ae.flatten_params(expected).items()}
  for name in sorted(set(want) | set(stored)):
    if name not in stored:
      raise ValueError(f'{where}: parameter {name} (expected shape {want[name]}) is missing.')
    if name not in want:
      raise ValueError(f'{where}: parameter {name} with shape {stored[name]} does not exist in '
                       'the model built from the config.')
    if tuple(stored[name]) != want[name]:
      raise ValueError(f'{where}: parameter {name} has shape {tuple(stored[name])} in the '
                       f'checkpoint but the config expects {want[name]}.')


def _config_from_json(meta: Any, where: str) -> tuple[str, Any]:
  if not isinstance(meta, Mapping) or 'kind' not in meta or 'config' not in meta:
    raise ValueError(f'{where} has no tokenizer config (expected the JSON config '
                     "{'kind': 'vq'|'kl', 'config': {...}} written by save_tokenizer); "
                     'use load_tokenizer_params with an explicit config.')
  kind = meta['kind']
  if kind not in KINDS:
    raise ValueError(f'{where}: stored tokenizer kind {kind!r}; valid: {sorted(KINDS)}.')
  return kind, KINDS[kind].from_dict(meta['config'])


def _default_sharding() -> jax.sharding.Sharding:
  """Replicated over every device: frozen tokenizer params go into the trainer's jitted step as is."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('replica',))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _restore(directory: str, config: Any, step: int, key: str, sharding) -> Any:
  sharding = sharding or _default_sharding()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          abstract_params(config))
  return checkpoint_read.load_params(directory, abstract, step=step, key=key)


def load_tokenizer(directory: str, *, key: str = 'ema_params', step: int | None = None,
                   sharding: jax.sharding.Sharding | None = None) -> tuple[str, Any, Any]:
  """Loads a tokenizer checkpoint with the config stored in it.

  Args:
    directory: the checkpoint root written by `save_tokenizer` (or a tokenizer
      trainer using the same layout).
    key: which tree of the state: 'ema_params' (default) or 'params'.
    step: which step; None means the latest.
    sharding: sharding of every restored array; default replicated on all devices.

  Returns:
    (kind, config, params): 'vq' | 'kl', the VQConfig / KLConfig, the params tree.

  Raises:
    FileNotFoundError: no checkpoint; KeyError: no subtree `key`;
    ValueError: no tokenizer config stored, or a stored parameter's shape does
      not match the stored config (naming the parameter and both shapes).
  """
  step, meta, shapes = read_metadata(directory, step, key)
  where = f'tokenizer checkpoint {directory} (step {step}, {key})'
  kind, config = _config_from_json(meta, where)
  _compare_shapes(shapes, abstract_params(config), where)
  return kind, config, _restore(directory, config, step, key, sharding)


def load_tokenizer_params(directory: str, expected_config: Any, *, key: str = 'ema_params',
                          step: int | None = None,
                          sharding: jax.sharding.Sharding | None = None) -> Any:
  """Loads the params of a tokenizer checkpoint for a config the caller already has.

  Fields outside the architecture (image_size, loss weights, dropout, dtype)
  may differ from the stored config; architecture fields may not.

  Raises:
    ValueError: the stored kind or an architecture field differs (naming the
      field and both values), or a stored shape differs from the one
      `expected_config` implies (naming the parameter and both shapes).
  """
  kind = kind_of(expected_config)
  step, meta, shapes = read_metadata(directory, step, key)
  where = f'tokenizer checkpoint {directory} (step {step}, {key})'
  if isinstance(meta, Mapping) and 'kind' in meta and 'config' in meta:
    stored_kind, stored = _config_from_json(meta, where)
    if stored_kind != kind:
      raise ValueError(f'{where} holds a {stored_kind!r} tokenizer but the config is '
                       f'{type(expected_config).__name__} ({kind!r}).')
    want, have = expected_config.architecture(), stored.architecture()
    for name in type(expected_config).ARCH_FIELDS:
      if want[name] != have[name]:
        raise ValueError(f'{where}: architecture field {name} is {have[name]!r} in the stored '
                         f'config but {want[name]!r} in the expected one.')
  else:
    logging.warning('%s stores no tokenizer config; checking parameter shapes only.', where)
  _compare_shapes(shapes, abstract_params(expected_config), where)
  return _restore(directory, expected_config, step, key, sharding)


# --------------------------------------------------------------------------- the configured tokenizer


def stored_config(tokenizer_config: Any, want: str):
  """The VQConfig / KLConfig saved in `tokenizer_config.checkpoint` (metadata only, no arrays)."""
  if not tokenizer_config.checkpoint:
    importer = {'vq': "LlamaGen's with `python -m heptapod_jax.tools.convert_llamagen_vq`",
                'kl': "MAR's with `python -m heptapod_jax.tools.convert_mar_kl`"}[want]
    raise ValueError(f'config.tokenizer.checkpoint is empty: kind="{want}" needs a tokenizer '
                     'checkpoint (train one with `python -m heptapod_jax.main '
                     f'--config=configs/vq_*.py`, or import {importer}).')
  kind, config = read_tokenizer_config(paths.resolve(tokenizer_config.checkpoint, 'config.tokenizer.checkpoint'),
                                       key=tokenizer_config.checkpoint_key)
  if kind != want:
    raise ValueError(f'config.tokenizer.checkpoint={tokenizer_config.checkpoint} holds a {kind!r} '
                     f'tokenizer; config.tokenizer.kind="{want}" needs a {want.upper()} one.')
  return config


def make_tokenizer(tokenizer_config: Any, image_size: int) -> tuple[Any, Any]:
  """Returns (tokenizer, params) for `config.tokenizer` at `image_size` (vq / kl: read from
  `tokenizer_config.checkpoint`; pixel: no parameters)."""
  kind = tokenizer_config.kind
  if kind == 'pixel':
    return tokenizers.PixelTokenizer(image_size=image_size, patch=tokenizer_config.patch,
                                     levels=tokenizer_config.levels), {}
  if kind not in KINDS:
    raise ValueError(f'config.tokenizer.kind={kind!r} is not one of {list(tokenizers.KINDS)}.')
  config = dataclasses.replace(stored_config(tokenizer_config, kind), image_size=image_size)
  params = load_tokenizer_params(paths.resolve(tokenizer_config.checkpoint, 'config.tokenizer.checkpoint'), config,
                                 key=tokenizer_config.checkpoint_key)
  tokenizer = tokenizer_for(kind, config)
  if kind == 'kl':
    tokenizer = tokenizers.LatentTokenizer(tokenizer, tokenizer_config.latent_scale,
                                           tokenizer_config.sample_posterior)
  return tokenizer, params


def _check_grid(config: Any, model: ModelConfig, name: str, stride: int) -> None:
  """The model's grid must be the learned tokenizer's: data.image_size / its stride."""
  size, ckpt = config.data.image_size, config.tokenizer.checkpoint
  if size % stride:
    raise ValueError(f'config.data.image_size={size} is not a multiple of the {name} tokenizer\'s '
                     f'stride {stride} ({ckpt}).')
  grid = (size // stride,) * 2
  if tuple(model.grid_size) != grid:
    raise ValueError(f'config.model.grid_size={tuple(model.grid_size)} does not match the {name} '
                     f'tokenizer grid {grid} (data.image_size={size} / stride {stride}).')


def check_model_config(config: Any, model: ModelConfig) -> None:
  """Checks the experiment's model section against the tokenizer checkpoint it names.

  `config_lib.validate` checks everything that needs no file; this reads the stored
  tokenizer config (metadata only) of a vq / kl tokenizer and checks the grid
  (data.image_size / stride), the VQ codebook size against model.vocab_size, and the
  KL latent channels against model.token_dim. A pixel tokenizer needs nothing here.

  Raises:
    ValueError naming the config field and the checkpoint.
  """
  tok = config.tokenizer
  if tok.kind == 'kl':
    klc = stored_config(tok, 'kl')
    _check_grid(config, model, 'KL', klc.downsample_factor)
    if not model.continuous or model.token_dim != klc.embed_dim:
      raise ValueError(f'config.tokenizer.kind="kl" needs config.model.tokens="kl" and '
                       f'config.model.token_dim={klc.embed_dim} (the latent channels of '
                       f'{tok.checkpoint}); got tokens={model.tokens!r}, token_dim={model.token_dim}.')
  elif tok.kind == 'vq':
    vq = stored_config(tok, 'vq')
    _check_grid(config, model, 'VQ', vq.downsample_factor)
    if model.vocab_size != vq.codebook_size:
      raise ValueError(f'config.model.vocab_size={model.vocab_size} must equal the VQ codebook size '
                       f'{vq.codebook_size} of {tok.checkpoint}.')
