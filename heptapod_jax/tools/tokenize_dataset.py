"""Pre-tokenizes a split: every augmented view of every image, encoded once (LlamaGen-style).

  python -m heptapod_jax.tools.tokenize_dataset --config=configs/demo.py --out=DIR \
      [--split=train] [--variants=ten_crop|flip|center] [--shard_size=N] [--batch_size=B] \
      [--moments_dtype=float32|bfloat16|float16]  (KL tokenizer only)

`config.data` says which images (source, split, image_size) and `config.tokenizer`
which tokenizer (`make_tokenizer(config.tokenizer, config.data.image_size)`).
Train on the result with `--config.data.tokenized_dir=DIR` and the matching
`--config.data.augment` (ten_crop <- ten_crop, flip <- flip, none <- center);
the format is described in heptapod_jax/data/codes_format.py.

* Views: those of `preprocess.augmented_views` for the augment the variants
  stand for, exactly the images the on-the-fly pipeline would train on.
* Sharding: shard s holds source examples [s * shard_size, (s + 1) * shard_size);
  shards go to processes round-robin (shard s to process s % process_count),
  and each process encodes batches of views on a 1-D 'data' mesh over its
  local devices. Multi-host: run it on every host (`--distributed` as in
  heptapod_jax.main), or as independent jobs with --process_index/--process_count.
* Resumable: a shard is written under a temporary name and renamed when
  complete; a rerun skips the shards that exist (after reading each through,
  its zip CRC-32 checked, and checking its header) and writes metadata.json
  once every shard is there: process 0 after a barrier under jax.distributed,
  otherwise whichever run finds the set complete. An existing metadata.json
  (or shard) written with other settings stops the run with the differing
  field named; a damaged shard (truncated, a checksum mismatch) is moved aside
  to codes-SSSSS.npz.bad-<UTC time> with a warning naming it and encoded again.
* Unreadable images are left out, as the image pipeline drops them; each shard
  records the source indices of its rows, and the reader counts the missing
  ones as skipped records, so example numbering stays aligned with the source.
* Payload: discrete tokenizers (pixel, vq) write integer codes
  (`encode_to_indices`); the continuous KL tokenizer (kind 'kl') writes each
  view's posterior moments, the latent mean and std = exp(0.5 * logvar) of
  `autoencoder.encode`, unscaled (latent_scale and posterior sampling are
  applied by the trainer), in float32 or --moments_dtype. See codes_format.py.
"""
from __future__ import annotations

if __name__ == '__main__':  # Before TensorFlow or JAX load: their start-up notices.
  from heptapod_jax import console as _console
  _console.quiet_dependencies()
  _console.import_tensorflow()

import functools  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from absl import app, flags, logging  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from heptapod_jax import console  # noqa: E402
from heptapod_jax.data import input_pipeline, sources  # noqa: E402
from heptapod_jax.data import preprocess, record_order, schema  # noqa: E402
from heptapod_jax.data import codes_format  # noqa: E402
from heptapod_jax.models.tokenizers import LatentTokenizer  # noqa: E402
from heptapod_jax.storage import artifacts  # noqa: E402
from heptapod_jax.storage import paths  # noqa: E402
from heptapod_jax.storage.tokenizer_checkpoint import make_tokenizer  # noqa: E402


def _moments_fn(autoencoder: Any) -> Any:
  """(params, images[B, S, S, 3]) -> float32[B, h, w, 2, C]: latent mean and std, unscaled."""

  def moments(params, images):
    mean, logvar = autoencoder.encode(params, images)
    return jnp.stack([mean, jnp.exp(0.5 * logvar)], axis=-2)

  return moments


def _local_encoder(tokenizer: Any, params: Any) -> tuple[Any, Any, jax.sharding.NamedSharding]:
  """(jitted encode, device params, batch sharding) over this process's devices.

  encode gives codes int32[B, h, w], or for a `LatentTokenizer` moments float32[B, h, w, 2, C].
  """
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ('data',))
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  fn = (_moments_fn(tokenizer.autoencoder) if isinstance(tokenizer, LatentTokenizer)
        else tokenizer.encode_to_indices)
  encode = jax.jit(fn, in_shardings=(replicated, batch), out_shardings=batch)
  return encode, jax.device_put(params, replicated), batch


def _encode_shard(source: sources.Source, split: str, start: int, end: int, *,
                  image_size: int, augment: str, num_parallel_calls: int, encode: Any,
                  params: Any, sharding: jax.sharding.NamedSharding, examples_per_call: int,
                  rows_per_call: int, grid_size: tuple[int, int], dtype: np.dtype,
                  payload: str = 'codes', latent_channels: int | None = None,
                  progress: console.Progress | None = None) -> dict[str, np.ndarray]:
  """Codes (or moments) of every view of source examples [start, end), unreadable ones left out.

  Returns:
    {'codes': dtype[n, V, h, w], 'labels': int32[n], 'source_index': int64[n]}; payload
    'moments': {'moments': dtype[n, V, h, w, 2, C], ...} instead of 'codes'.
  """
  data = source.read_range(split, start, end)
  num_variants = len(schema.VARIANT_NAMES[augment])

  def views(index, record):
    image = input_pipeline.load_image(record, data.load_from_path)
    # The same ops as the image pipeline's decode, so the codes are of its images.
    return {'views': preprocess.to_model_range(
                preprocess.augmented_views(image, image_size, augment)),
            'label': tf.cast(record['label'], tf.int32),
            'source_index': index}

  ds = data.records.enumerate(start)
  ds = ds.map(record_order.traced_as_written(views),
              num_parallel_calls=tf.data.AUTOTUNE if num_parallel_calls == -1
              else num_parallel_calls, deterministic=True)
  ds = ds.ignore_errors(log_warning=True)
  ds = ds.batch(examples_per_call).prefetch(2)

  pending = []
  for batch in ds.as_numpy_iterator():
    images = batch['views'].reshape((-1,) + batch['views'].shape[2:])
    # One padded shape: one compilation, and rows divide over the devices.
    padded = np.zeros((rows_per_call,) + images.shape[1:], np.float32)
    padded[:len(images)] = images
    # Dispatch is asynchronous: the next batch is prepared while this one encodes.
    pending.append((encode(params, jax.device_put(padded, sharding)), len(images),
                    batch['label'], batch['source_index']))
    if progress is not None:
      progress.update(progress.n + len(batch['label']))
  h, w = grid_size
  view_shape = (h, w) if payload == 'codes' else (h, w, 2, latent_channels)
  if not pending:
    return {payload: np.zeros((0, num_variants, *view_shape), dtype),
            'labels': np.zeros((0,), np.int32), 'source_index': np.zeros((0,), np.int64)}
  codes = np.concatenate([np.asarray(c)[:n] for c, n, _, _ in pending])
  codes = codes.reshape(-1, num_variants, *view_shape)
  if payload == 'codes':
    if codes.min() < 0 or codes.max() > np.iinfo(dtype).max:
      raise ValueError(f'codes in [{codes.min()}, {codes.max()}] do not fit {dtype}')
  elif not np.isfinite(codes).all():
    raise ValueError(f'the encoder gave non-finite moments for examples [{start}, {end})')
  return {payload: codes.astype(dtype),
          'labels': np.concatenate([p[2] for p in pending]).astype(np.int32),
          'source_index': np.concatenate([p[3] for p in pending]).astype(np.int64)}


def _keep_existing_shard(path: str, header: dict[str, Any]) -> bool:
  """Whether a shard written before is kept: True when it reads back whole with this run's header.

  A damaged shard (truncated, a checksum mismatch: `codes_format.check_shard`) returns False
  after a warning naming it and the damage: it is moved aside to `<path>.bad-<UTC time>`, kept
  for inspection, and the caller encodes it again (a rerun is how a directory is repaired).
  A whole shard written with other settings is not damaged, and mixing it in is never right:
  ValueError naming the field, as before.
  """
  try:
    found = codes_format.check_shard(path)
  except artifacts.DamagedFileError as damage:
    try:
      aside = codes_format.move_shard_aside(path)
    except (OSError, tf.errors.OpError) as e:
      raise OSError(f'{damage}; could not move it aside ({e}): move it away by hand and rerun'
                    ) from e
    logging.warning('%s; moved it aside to %s (kept for inspection, delete it when no longer '
                    'needed) and encoding the shard again', damage, aside)
    return False
  # A shard from a run with other settings must not be mixed into this one.
  codes_format.check_header(found, header, path)
  return True


def _finalize(out_dir: str, header: dict[str, Any]) -> dict[str, Any] | None:
  """Writes (or checks) metadata.json once every shard exists; None while some are missing."""
  num_shards = header['num_shards']
  missing = [s for s in range(num_shards)
             if not paths.exists(codes_format.shard_path(out_dir, s))]
  if missing:
    logging.info('%s: %d of %d shards still missing (e.g. %s); metadata.json is written when '
                 'all are there', out_dir, len(missing), num_shards, missing[:5])
    return None
  num_kept = sum(len(codes_format.load_shard(codes_format.shard_path(out_dir, s),
                                             ('source_index',))['source_index'])
                 for s in range(num_shards))
  metadata = dict(header, num_kept=num_kept, num_skipped=header['num_examples'] - num_kept)
  path = os.path.join(out_dir, codes_format.METADATA_FILE)
  existing = codes_format.read_metadata(out_dir)
  if existing is not None:
    codes_format.check_header(existing, header, path)
    return existing
  codes_format.write_json_atomic(path, metadata)
  logging.info('wrote %s: %d examples, %d kept, %d unreadable left out', path,
               header['num_examples'], num_kept, metadata['num_skipped'])
  return metadata


def tokenize_dataset(config: Any, out_dir: str, *, split: str | None = None,
                     variants: str = 'ten_crop', shard_size: int = 10_000, batch_size: int = 256,
                     process_index: int | None = None, process_count: int | None = None,
                     max_shards: int | None = None, moments_dtype: str | None = None
                     ) -> dict[str, Any]:
  """Encodes this process's shards of a split into `out_dir` (see the module docstring).

  Args:
    config: experiment config; reads `config.data` and `config.tokenizer`.
    out_dir: output directory (local or gs://, storage.paths).
    split: split to encode; default `config.data.train_split`.
    variants: 'ten_crop' | 'flip' | 'center': the views of augment 'ten_crop',
      'flip' or 'none'.
    shard_size: source examples per shard.
    batch_size: images (views) per encoder call over this process's devices.
    process_index: this process; default `jax.process_index()`.
    process_count: number of processes; default `jax.process_count()`.
    max_shards: write at most this many new shards, then stop (time-boxed
      jobs; rerun to continue); None = all.
    moments_dtype: KL tokenizer only: 'float32' (None: the default), 'bfloat16'
      or 'float16' for the stored moments.

  Returns:
    {'written': shard numbers encoded now, 'skipped': this process's shards
    that already existed, 'metadata': the metadata dict once the directory is
    complete, else None}.
  """
  process_index, process_count = record_order.resolve_process(process_index, process_count)
  data_config = config.data
  split = data_config.train_split if split is None else split
  if batch_size <= 0:
    raise ValueError(f'batch_size={batch_size} must be positive')
  source = sources.resolve_source(data_config)
  num_examples = source.num_examples(split)
  tokenizer, params = make_tokenizer(config.tokenizer, data_config.image_size)
  weights = codes_format.weights_fingerprint(params)
  if isinstance(tokenizer, LatentTokenizer):
    header = codes_format.make_header(
        source=sources.source_id(data_config), split=split, num_examples=num_examples,
        num_classes=source.num_classes, image_size=data_config.image_size, variants=variants,
        tokenizer_config=config.tokenizer, grid_size=tokenizer.grid_size,
        latent_channels=tokenizer.token_dim, shard_size=shard_size,
        moments_dtype=moments_dtype or 'float32', weights_sha256=weights)
  else:
    if moments_dtype is not None:
      raise ValueError(f'moments_dtype={moments_dtype!r} applies to config.tokenizer.kind="kl" '
                       f'only, not {config.tokenizer.kind!r} (its codes are integers)')
    header = codes_format.make_header(
        source=sources.source_id(data_config), split=split, num_examples=num_examples,
        num_classes=source.num_classes, image_size=data_config.image_size, variants=variants,
        tokenizer_config=config.tokenizer, grid_size=tokenizer.grid_size,
        vocab_size=tokenizer.vocab_size, shard_size=shard_size, weights_sha256=weights)
  paths.makedirs(out_dir)
  metadata_path = os.path.join(out_dir, codes_format.METADATA_FILE)
  my_shards = list(range(process_index, header['num_shards'], process_count))
  existing = codes_format.read_metadata(out_dir)
  if existing is not None:
    codes_format.check_header(existing, header, metadata_path)
    logging.info('%s is complete already (%d shards); nothing to do', out_dir,
                 header['num_shards'])
    return {'written': [], 'skipped': my_shards, 'metadata': existing}

  # Shards written before are read through first: a damaged one is set aside and made again,
  # one of other settings stops the run before anything is encoded.
  t0 = time.time()
  kept = [s for s in my_shards if paths.exists(codes_format.shard_path(out_dir, s))
          and _keep_existing_shard(codes_format.shard_path(out_dir, s), header)]
  if kept:
    logging.info('%d shards written before read back whole, %.1f s', len(kept), time.time() - t0)
  augment = header['augment']
  num_variants = header['num_variants']
  encode, device_params, sharding = _local_encoder(tokenizer, params)
  num_devices = len(jax.local_devices())
  examples_per_call = max(1, batch_size // num_variants)
  rows_per_call = -(-examples_per_call * num_variants // num_devices) * num_devices
  written, skipped = [], []
  todo = [s for s in my_shards if s not in kept]
  if max_shards is not None:
    todo = todo[:max_shards]
  total = sum(min((s + 1) * shard_size, num_examples) - s * shard_size for s in todo)
  # In a pipe: a line per tenth, at most one a minute (a short job prints only its last).
  bar = console.progress(total, desc='tokenize', unit='image', every=max(1, total // 10),
                         min_seconds=60)
  for shard in my_shards:
    path = codes_format.shard_path(out_dir, shard)
    if shard in kept:
      skipped.append(shard)
      continue
    if max_shards is not None and len(written) >= max_shards:
      logging.info('stopping after %d new shards (max_shards); rerun to continue', len(written))
      break
    start = shard * shard_size
    end = min(start + shard_size, num_examples)
    t0 = time.time()
    arrays = _encode_shard(source, split, start, end, image_size=data_config.image_size,
                           augment=augment, num_parallel_calls=data_config.num_parallel_calls,
                           encode=encode, params=device_params, sharding=sharding,
                           examples_per_call=examples_per_call, rows_per_call=rows_per_call,
                           grid_size=tuple(header['grid_size']), dtype=np.dtype(header['dtype']),
                           payload=header['payload'], latent_channels=header.get('latent_channels'),
                           progress=bar)
    codes_format.save_shard(path, header=header, **arrays)
    written.append(shard)
    logging.info('shard %d of %d: examples [%d, %d), %d unreadable left out, %.1f s', shard,
                 header['num_shards'], start, end, (end - start) - len(arrays['labels']),
                 time.time() - t0)
  bar.close()
  if skipped:
    logging.info('skipped %d complete shards written before: %s', len(skipped), skipped)

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('tokenize_dataset: shards written')
    metadata = _finalize(out_dir, header) if jax.process_index() == 0 else None
  else:
    metadata = _finalize(out_dir, header)
  return {'written': written, 'skipped': skipped, 'metadata': metadata}


def _multihost_environment() -> bool:
  """As heptapod_jax.main: multi-host TPU, multi-task SLURM/MPI, or a coordinator address."""
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return True
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  if len([h for h in hosts.split(',') if h]) > 1 or os.environ.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return True
  return (int(os.environ.get('SLURM_NTASKS', '1')) > 1
          or int(os.environ.get('OMPI_COMM_WORLD_SIZE', '1')) > 1)


def _define_flags() -> dict[str, Any]:
  # Defined only when run as a program, so importing tokenize_dataset() next to
  # heptapod_jax.main (which also has --config) does not clash.
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  return {
      'config': config_flags.DEFINE_config_file(
          'config', None, 'Recipe file (configs/*.py[:options]).', lock_config=True),
      'out': flags.DEFINE_string('out', None, 'Output directory.', required=True),
      'split': flags.DEFINE_string('split', None, 'Split; default config.data.train_split.'),
      'variants': flags.DEFINE_enum('variants', 'ten_crop', list(codes_format.VARIANT_SETS),
                                    'Views: ten_crop (augment=ten_crop), flip, center (none).'),
      'shard_size': flags.DEFINE_integer('shard_size', 10_000, 'Examples per shard.'),
      'batch_size': flags.DEFINE_integer('batch_size', 256,
                                         'Images per encoder call over the local devices.'),
      'max_shards': flags.DEFINE_integer('max_shards', None,
                                         'Stop after this many new shards (rerun to continue).'),
      'moments_dtype': flags.DEFINE_enum(
          'moments_dtype', None, list(codes_format.MOMENTS_DTYPES),
          'KL tokenizer only: dtype of the stored latent mean/std (default float32).'),
      'process_index': flags.DEFINE_integer('process_index', None,
                                            'This job; default jax.process_index().'),
      'process_count': flags.DEFINE_integer('process_count', None,
                                            'Jobs; default jax.process_count().'),
      'distributed': flags.DEFINE_enum('distributed', 'auto', ['auto', 'on', 'off'],
                                       'jax.distributed.initialize(): auto = when multi-host.'),
  }


def _main(argv, flag_values: dict[str, Any]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  console.setup(None, hold=True)  # The terminal's threshold; records held until the log exists.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  # TensorFlow only reads and resizes: keep it off the accelerators JAX owns.
  tf.config.set_visible_devices([], 'GPU')
  distributed = flag_values['distributed'].value
  if distributed == 'on' or (distributed == 'auto' and _multihost_environment()):
    jax.distributed.initialize()
  # Every record to <out>/log.txt (log.process<i>.txt); the reader only opens its own files.
  console.setup(flag_values['out'].value, process_index=jax.process_index())
  result = tokenize_dataset(
      flag_values['config'].value, flag_values['out'].value, split=flag_values['split'].value,
      variants=flag_values['variants'].value, shard_size=flag_values['shard_size'].value,
      batch_size=flag_values['batch_size'].value, max_shards=flag_values['max_shards'].value,
      moments_dtype=flag_values['moments_dtype'].value,
      process_index=flag_values['process_index'].value,
      process_count=flag_values['process_count'].value)
  done = 'complete' if result['metadata'] else 'incomplete (rerun, or wait for other processes)'
  console.summary(f'{flag_values["out"].value}: wrote shards {result["written"]}, skipped '
                  f'{result["skipped"]}; {done}')


def run() -> None:
  """Console entry point."""
  flag_values = _define_flags()
  app.run(functools.partial(_main, flag_values=flag_values))


if __name__ == '__main__':
  run()
