"""Encode and decode throughput (images/s) of the VQ-16 / KL-16 tokenizers.

  python benchmarks/tokenizer_throughput.py                 # VQ-16 and KL-16 at 256x256, batch 8
  python benchmarks/tokenizer_throughput.py --kinds=vq --image_size=256 --batch=16

Random weights (throughput does not depend on them), float32, jitted, median
of `--repeats` timed calls after a warm-up call (compilation excluded), on
whatever devices JAX sees (all of them, batch split over a 1-D mesh).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec as P

from _util import median_time
from heptapod_jax.models.tokenizers import kl, vq

_KINDS = flags.DEFINE_list('kinds', ['vq', 'kl'], 'Which tokenizers: vq, kl.')
_SIZE = flags.DEFINE_integer('image_size', 256, 'Image side.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Images per call.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed calls (median reported).')


def _time(fn, *args) -> float:
  return median_time(fn, *args, repeats=_REPEATS.value)


def main(argv):
  del argv
  mesh = jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  batch_sharding = NamedSharding(mesh, P('data'))
  images = jax.device_put(
      jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (_BATCH.value, _SIZE.value, _SIZE.value, 3)),
                  jnp.float32), batch_sharding)
  print(f'image_size={_SIZE.value} batch={_BATCH.value} devices={jax.device_count()} x '
        f'{jax.devices()[0].device_kind}')
  print(f'{"tokenizer":10s} {"encode img/s":>13s} {"decode img/s":>13s}')
  for kind in _KINDS.value:
    if kind == 'vq':
      tok = vq.VQTokenizer(vq.VQConfig(image_size=_SIZE.value))
      params = tok.init_params(jax.random.key(0))
      encode = jax.jit(tok.encode_to_indices)
      codes = encode(params, images)
      decode = jax.jit(tok.decode_from_indices)
      t_enc, t_dec = _time(encode, params, images), _time(decode, params, codes)
    elif kind == 'kl':
      tok = kl.KLTokenizer(kl.KLConfig(image_size=_SIZE.value))
      params = tok.init_params(jax.random.key(0))
      encode = jax.jit(tok.encode)
      mean, _ = encode(params, images)
      decode = jax.jit(tok.decode)
      t_enc, t_dec = _time(encode, params, images), _time(decode, params, mean)
    else:
      raise app.UsageError(f'--kinds: {kind!r} is not one of vq, kl.')
    print(f'{kind + "-16":10s} {_BATCH.value / t_enc:13.2f} {_BATCH.value / t_dec:13.2f}', flush=True)


if __name__ == '__main__':
  app.run(main)
