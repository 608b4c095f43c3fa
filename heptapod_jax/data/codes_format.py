"""Pre-tokenized training data (LlamaGen-style): the file format.

`python -m heptapod_jax.tools.tokenize_dataset` encodes every view of every
image of a split once; training then reads the codes (or, for the continuous KL
tokenizer, the latent moments) instead of decoding, resizing and tokenizing
images each step. This module is what the writer (tools/tokenize_dataset.py)
and the reader (heptapod_jax/data/tokenized.py) share: headers, shard paths,
saving, loading and checking shards, metadata.json, and the checks of a run's
data and tokenizer settings against a directory.

File format of a directory DIR:

  DIR/metadata.json     written last, when every shard exists (see `HEADER_FIELDS`,
                        plus num_kept / num_skipped, the examples kept and dropped)
  DIR/codes-SSSSS.npz   shard s (`shard_path`), uncompressed np.savez with one
                        payload array (named by the header's `payload`, see below)
      codes         int16|int32[n, V, h, w]  tokenizer indices of the V views
                    (`variant_names`, in `schema.VARIANT_NAMES` order); int16
                    when vocab_size <= 32768
   or moments       float32|bfloat16|float16[n, V, h, w, 2, C]  the KL encoder's
                    posterior of each view: [..., 0, :] the latent mean,
                    [..., 1, :] its std = exp(0.5 * logvar), both unscaled (before
                    config.tokenizer.latent_scale) and unsampled; C = the
                    tokenizer's latent channels. bfloat16 is stored as its uint16
                    bit pattern (numpy has no bfloat16; `load_shard` views it back)
      labels        int32[n]
      source_index  int64[n]  source index (position in the split's canonical
                    order, see input_pipeline) of each row, increasing
      header        str, JSON of the HEADER_FIELDS of the run that wrote it

Integrity: a shard is read back whole or refused. Every member read is read to its end, so
the zip CRC-32 its writer recorded is checked (np.load alone stops where the .npy header says
the array ends, and a member never read is never checked); a truncated or damaged shard raises
`artifacts.DamagedFileError` naming it and what is wrong. The reader (tokenized.py) also
checks each shard's header against metadata.json and its rows against its range; a rerun of
tokenize_dataset reads every existing shard through (`check_shard`), moves a damaged one
aside to `codes-SSSSS.npz.bad-<UTC time>` with a warning and encodes it again.

Shard s covers source examples [s * shard_size, min((s + 1) * shard_size,
num_examples)) in source order (not shuffled). Examples whose image cannot be
decoded are left out, as the image pipeline drops them: n can be smaller than
the range, and `source_index` says which examples the rows are. The reader
counts a dropped example as a skipped record, so its data state matches the
image pipeline's exactly.

Payload: `payload` names the array holding the per-view data and `dtype` its
type (`PAYLOADS`):
  codes     discrete tokenizers (pixel, vq; `encode_to_indices`); the header
            has vocab_size. Header fields: `HEADER_FIELDS`.
  moments   the continuous KL tokenizer (kind 'kl'): latent mean and std as
            above, dtype float32 by default (tokenize_dataset --moments_dtype=
            bfloat16|float16 halves the disk and the reader's memory). The
            header has latent_channels in place of vocab_size
            (`MOMENTS_HEADER_FIELDS`), and its `tokenizer` leaves out
            latent_scale and sample_posterior (`TRAINING_TIME_FIELDS`): they
            are applied when training, so one directory serves any of them.
The payload follows from config.tokenizer.kind (`payload_of`); a run or a
trainer whose tokenizer needs the other payload is refused, naming
tokenizer.kind / payload.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from absl import logging
import jax
import ml_dtypes
import numpy as np

from heptapod_jax.data import schema, sources
from heptapod_jax.storage import artifacts
from heptapod_jax.storage import paths
from heptapod_jax.storage.artifacts import first_difference, lookup

FORMAT_VERSION = 1
METADATA_FILE = 'metadata.json'
# --variants of the tool -> the data.augment whose views it encodes.
VARIANT_SETS = {'center': 'none', 'flip': 'flip', 'ten_crop': 'ten_crop'}
# Fields fixed by the run's settings: a rerun must agree on all of them.
HEADER_FIELDS = ('format_version', 'source', 'split', 'num_examples', 'num_classes',
                 'image_size', 'variants', 'augment', 'num_variants', 'variant_names',
                 'tokenizer', 'grid_size', 'vocab_size', 'payload', 'dtype', 'shard_size',
                 'num_shards')
# The same for payload 'moments' (continuous tokenizer): latent channels instead of a vocabulary.
MOMENTS_HEADER_FIELDS = tuple('latent_channels' if f == 'vocab_size' else f
                              for f in HEADER_FIELDS)
# Payload arrays (the header's 'payload'): integer codes, or a KL tokenizer's latent moments.
PAYLOADS = ('codes', 'moments')
MOMENTS_DTYPES = ('float32', 'bfloat16', 'float16')
# config.tokenizer fields a payload does not depend on (applied at training time): left out of
# the header's `tokenizer` and of `check_tokenizer`.
TRAINING_TIME_FIELDS = {'codes': (), 'moments': ('latent_scale', 'sample_posterior')}


def payload_of(tokenizer_kind: str) -> str:
  """'moments' for the continuous tokenizer (kind 'kl'), 'codes' for the discrete ones."""
  return 'moments' if tokenizer_kind == 'kl' else 'codes'


def header_fields(payload: str) -> tuple[str, ...]:
  """The header fields of a payload's directories."""
  if payload not in PAYLOADS:
    raise ValueError(f'payload={payload!r} is not one of {list(PAYLOADS)}')
  return MOMENTS_HEADER_FIELDS if payload == 'moments' else HEADER_FIELDS


def header_tokenizer(tokenizer_config: Any, payload: str) -> dict[str, Any]:
  """config.tokenizer as the header records it (JSON-able, training-time fields left out)."""
  config = _jsonable(tokenizer_config)
  return {k: v for k, v in config.items() if k not in TRAINING_TIME_FIELDS[payload]}


def weights_fingerprint(params: Any) -> str:
  """sha256 (hex) of a parameter tree: every leaf's path, dtype, shape and bytes. Recorded as
  the header's `tokenizer.weights_sha256`, so that codes of a retrained tokenizer saved at the
  same checkpoint path are told apart. Replicated leaves of a multi-host mesh are read from
  this process's copy."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      leaf = leaf.addressable_data(0)
    array = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f'{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|'.encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def shard_path(directory: str, shard: int) -> str:
  """Path of shard `shard`: DIR/codes-SSSSS.npz."""
  return os.path.join(directory, f'codes-{shard:05d}.npz')


def codes_dtype(vocab_size: int) -> np.dtype:
  """int16 when every index fits, else int32."""
  return np.dtype(np.int16 if vocab_size <= np.iinfo(np.int16).max + 1 else np.int32)


def _jsonable(value: Any) -> Any:
  """Normalises tuples and ConfigDicts the way a JSON round trip would."""
  return json.loads(json.dumps(value.to_dict() if hasattr(value, 'to_dict') else value))


def make_header(*, source: str, split: str, num_examples: int, num_classes: int, image_size: int,
                variants: str, tokenizer_config: Any, grid_size: tuple[int, int],
                vocab_size: int | None = None, shard_size: int,
                latent_channels: int | None = None, moments_dtype: str = 'float32',
                weights_sha256: str | None = None) -> dict[str, Any]:
  """The run-invariant metadata of a tokenized directory (`header_fields(payload)`).

  Args:
    source: data.source of the images.
    split: split that was encoded.
    num_examples: examples in the split (kept or not).
    num_classes: classes of the source.
    image_size: side of the views.
    variants: one of VARIANT_SETS.
    tokenizer_config: config.tokenizer (ConfigDict or dict).
    grid_size: (h, w) of the codes.
    vocab_size: tokenizer vocabulary size (payload 'codes').
    shard_size: examples per shard.
    latent_channels: C of the latents (payload 'moments', tokenizer kind 'kl').
    moments_dtype: one of MOMENTS_DTYPES (payload 'moments').
    weights_sha256: `weights_fingerprint` of the tokenizer's parameters, recorded as
      `tokenizer.weights_sha256` (None: not recorded, as directories of earlier versions).

  Returns:
    JSON-able dict.
  """
  if variants not in VARIANT_SETS:
    raise ValueError(f'variants={variants!r} is not one of {list(VARIANT_SETS)}')
  if shard_size <= 0:
    raise ValueError(f'shard_size={shard_size} must be positive')
  augment = VARIANT_SETS[variants]
  names = schema.VARIANT_NAMES[augment]
  payload = payload_of(_jsonable(tokenizer_config)['kind'])
  weights = {} if weights_sha256 is None else {'weights_sha256': weights_sha256}
  base = {
      'format_version': FORMAT_VERSION,
      'source': source,
      'split': split,
      'num_examples': int(num_examples),
      'num_classes': int(num_classes),
      'image_size': int(image_size),
      'variants': variants,
      'augment': augment,
      'num_variants': len(names),
      'variant_names': list(names),
  }
  tail = {'shard_size': int(shard_size), 'num_shards': -(-int(num_examples) // int(shard_size))}
  grid = [int(g) for g in grid_size]
  if payload == 'moments':
    if latent_channels is None or latent_channels <= 0:
      raise ValueError(f'latent_channels={latent_channels} must be positive for payload moments')
    if moments_dtype not in MOMENTS_DTYPES:
      raise ValueError(f'moments_dtype={moments_dtype!r} is not one of {list(MOMENTS_DTYPES)}')
    header = {**base, 'tokenizer': {**header_tokenizer(tokenizer_config, payload), **weights},
              'grid_size': grid,
              'latent_channels': int(latent_channels), 'payload': payload, 'dtype': moments_dtype,
              **tail}
    assert tuple(header) == MOMENTS_HEADER_FIELDS
    return _jsonable(header)
  if vocab_size is None:
    raise ValueError('vocab_size is needed for payload codes')
  return _jsonable({**base, 'tokenizer': {**_jsonable(tokenizer_config), **weights},
                    'grid_size': grid,
                    'vocab_size': int(vocab_size), 'payload': 'codes',
                    'dtype': codes_dtype(vocab_size).name, **tail})


def check_header(found: dict[str, Any], expected: dict[str, Any], where: str, *,
                 theirs: str = 'this run has',
                 advice: str = ('use another output directory (or delete that one) to tokenize '
                                'with other settings')) -> None:
  """Raises ValueError naming the first header field where `found` differs.

  Args:
    found: metadata read from `where` (may hold more than the header).
    expected: `make_header` of this run (or the header fields of the metadata.json a shard
      is read under).
    where: file the metadata came from, for the message.
    theirs: who holds `expected`, for the message ('this run has', '<metadata.json> says').
    advice: what to do instead, for the message.
  """
  if found.get('payload') != expected['payload']:
    # Codes and moments never mix: say so before any field the two headers do not share.
    kind = lambda header: lookup(header, 'tokenizer.kind')  # noqa: E731
    raise ValueError(
        f'{where} was written with payload={found.get("payload")!r} '
        f'(tokenizer.kind={kind(found)!r}) but {theirs} payload={expected["payload"]!r} '
        f'(tokenizer.kind={kind(expected)!r}); use another output directory to tokenize with '
        'another kind of tokenizer')
  found = {k: found.get(k) for k in header_fields(expected['payload'])}
  field = first_difference(found, expected, '')
  if field:
    raise ValueError(
        f'{where} was written with {field}={lookup(found, field)!r} but {theirs} '
        f'{field}={lookup(expected, field)!r}; {advice}')


def write_json_atomic(path: str, value: dict[str, Any]) -> None:
  """Writes JSON whole or not at all (`paths.atomic_write`: local or one object upload)."""
  paths.write_text(path, json.dumps(value, indent=2, sort_keys=True) + '\n')


def read_metadata(directory: str) -> dict[str, Any] | None:
  """DIR/metadata.json, or None when it does not exist (yet).

  Raises:
    artifacts.DamagedFileError naming the file when it is not a JSON object (torn, edited).
  """
  path = paths.join(directory, METADATA_FILE)
  if not paths.exists(path):
    return None
  text = paths.read_text(path)
  advice = (f'delete it and rerun tokenize_dataset on {directory}: it checks every shard and '
            'writes it again')
  try:
    metadata = json.loads(text)
  except ValueError as e:
    raise artifacts.DamagedFileError(f'{path} is not valid JSON ({e}); {advice}') from e
  if not isinstance(metadata, dict):
    raise artifacts.DamagedFileError(
        f'{path} holds a JSON {type(metadata).__name__}, not an object; {advice}')
  return metadata


def save_shard(path: str, *, labels: np.ndarray, source_index: np.ndarray,
               header: dict[str, Any], **payload: np.ndarray) -> None:
  """Writes one shard whole or not at all (`artifacts.writing`): a shard under its final name is
  complete, a crash leaves at most a local `path`.tmp (replaced by the rerun) and nothing on a
  bucket. A failed write (a full disk) raises OSError naming the shard and the free space.

  Args:
    path: `shard_path(...)`.
    labels: int32[n].
    source_index: int64[n].
    header: `make_header(...)`.
    **payload: the one array header['payload'] names, in header['dtype']:
      codes=int[n, V, h, w] or moments=float[n, V, h, w, 2, C].
  """
  name = header['payload']
  if set(payload) != {name}:
    raise ValueError(f'header payload {name!r} but got arrays {sorted(payload)}')
  array = payload[name]
  if array.dtype.name != header['dtype']:
    raise ValueError(f'{name} is {array.dtype.name}, the header says {header["dtype"]}')
  if array.dtype.name == 'bfloat16':
    array = array.view(np.uint16)  # np.load cannot restore bfloat16 (it reads back |V2).
  with artifacts.writing(path) as f:
    np.savez(f, **{name: array}, labels=labels.astype(np.int32),
             source_index=source_index.astype(np.int64),
             header=np.array(json.dumps(header, sort_keys=True)))


def load_shard(path: str, keys: tuple[str, ...] = ('codes', 'labels', 'source_index')
               ) -> dict[str, Any]:
  """Reads the named arrays of a shard ('header' comes back as a dict).

  Each member asked for is read to its end, so that its zip CRC-32 is checked (np.load stops
  where the .npy header says, unchecked); the others are not read: a header check does not
  read the codes. 'moments' stored as bfloat16 bits (uint16) comes back as ml_dtypes' bfloat16.

  Raises:
    artifacts.DamagedFileError naming the shard and what is wrong (truncated, checksum
    mismatch in member X, a header that is not JSON).
  """
  with paths.open(path, 'rb') as f:  # Seekable: members are read where they are.
    out: dict[str, Any] = artifacts.read_npz(f, keys, path)
  if 'header' in out:
    try:
      out['header'] = json.loads(str(out['header']))
    except ValueError as e:
      raise artifacts.DamagedFileError(f'{path}: member header.npy is not JSON ({e})') from e
    if not isinstance(out['header'], dict):
      raise artifacts.DamagedFileError(f'{path}: member header.npy holds a JSON '
                                       f'{type(out["header"]).__name__}, not an object')
  if 'moments' in out and out['moments'].dtype == np.uint16:
    out['moments'] = out['moments'].view(ml_dtypes.bfloat16)
  return out


def check_shard(path: str) -> dict[str, Any]:
  """Reads every member of a shard to its end (each zip CRC-32 checked); its header.

  What a rerun of tokenize_dataset does before it skips a shard written before: the header
  alone would not notice damage to the payload.

  Raises:
    artifacts.DamagedFileError as `load_shard`.
  """
  artifacts.check_npz(path, path)
  return load_shard(path, ('header',))['header']


def move_shard_aside(path: str) -> str:
  """Renames a damaged shard to `<path>.bad-<UTC time>` (kept, never overwritten); the new path."""
  return artifacts.move_aside(path)


def check_data_config(metadata: dict[str, Any], data_config: Any, directory: str) -> None:
  """The data settings training uses must be those the codes were made with.

  Raises:
    ValueError naming the data config field and both values.
  """
  where = os.path.join(directory, METADATA_FILE)
  pairs = (('source', 'source'), ('train_split', 'split'), ('image_size', 'image_size'),
           ('augment', 'augment'))
  for field, key in pairs:
    value = sources.source_id(data_config) if field == 'source' else getattr(data_config, field)
    held = metadata.get(key, '<missing>')
    if value != held:
      hint = ''
      if field == 'augment':
        sets = [k for k, v in VARIANT_SETS.items() if v == value]
        hint = f' (tokenize with --variants={sets[0]})' if sets else ''
      raise ValueError(f'data.{field}={value!r} but {where} holds {key}={held!r}{hint}')
  if metadata.get('payload') not in PAYLOADS:
    raise NotImplementedError(f'{where}: payload {metadata.get("payload")!r}; this reader '
                              f'reads {list(PAYLOADS)}')
  if metadata.get('format_version') != FORMAT_VERSION:
    raise ValueError(f'{where}: format_version={metadata.get("format_version")}, this reader '
                     f'reads {FORMAT_VERSION}')


def check_tokenizer(metadata: dict[str, Any], tokenizer_config: Any,
                    weights_sha256: str | None = None) -> None:
  """For the trainer: the codes must come from the tokenizer the model is trained for.

  Payload 'moments' (kind 'kl') does not depend on latent_scale and
  sample_posterior (`TRAINING_TIME_FIELDS`): those may differ. `weights_sha256`
  (`weights_fingerprint` of the trainer's tokenizer parameters) is compared with the
  directory's when both are known: the same config with retrained weights is refused.

  Raises:
    ValueError naming tokenizer.kind when the config's kind needs the other
    payload, else the first differing `tokenizer.<field>`.
  """
  kind = _jsonable(tokenizer_config)['kind']
  payload = metadata.get('payload')
  if payload != payload_of(kind):
    raise ValueError(
        f'config.tokenizer.kind={kind!r} but the pre-tokenized data was made with '
        f'tokenizer.kind={lookup(metadata, "tokenizer.kind")!r} (payload={payload!r}; kind '
        f'{kind!r} trains on payload {payload_of(kind)!r}); tokenize with this tokenizer')
  theirs = {'tokenizer': dict(metadata['tokenizer'])}
  recorded = theirs['tokenizer'].pop('weights_sha256', None)
  ours = {'tokenizer': header_tokenizer(tokenizer_config, payload)}
  field = first_difference(theirs, ours, '')
  if field:
    raise ValueError(f'config.{field}={lookup(ours, field)!r} but the pre-tokenized data was '
                     f'made with {field}={lookup(theirs, field)!r}')
  if weights_sha256 is not None and recorded is None:
    logging.warning('The pre-tokenized data records no tokenizer weights fingerprint (written '
                    'by an earlier version): it cannot be checked against the weights at '
                    'config.tokenizer.checkpoint.')
  elif weights_sha256 is not None and recorded != weights_sha256:
    raise ValueError(
        f'the pre-tokenized data was made with other tokenizer weights than those at '
        f'config.tokenizer.checkpoint={lookup(ours, "tokenizer.checkpoint")!r} (weights sha256 '
        f'{recorded[:12]}... there, {weights_sha256[:12]}... here: retrained since?); tokenize '
        'again into a fresh directory')
