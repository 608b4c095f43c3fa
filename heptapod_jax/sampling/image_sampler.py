"""A run's model ready to draw images: class labels in, uint8 images out.

    sampler = ImageSampler(config)                  # validated model, tokenizer, mesh
    with jax.set_mesh(sampler.mesh), nn.logical_axis_rules(sampler.rules):
      params = <restore into sampler.abstract_params()>
      images = sampler.sample_images(params, labels, seed=0)

What sampling needs and nothing of training (no optimizer, no train step): the
trainer (`train.Trainer`) extends it with those, and sample mode, the sampling
command line and the notebooks use it alone. Building one validates the config
(`config_lib.validate`, pure) and checks it against the tokenizer checkpoint on
disk (`tokenizer_checkpoint.check_model_config`).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from heptapod_jax import config_lib, images, sharding
from heptapod_jax.models import attention, layers
from heptapod_jax.models.config import ModelConfig
from heptapod_jax.models.heptapod import Heptapod, init_params
from heptapod_jax.models.tokenizers import decode_tokens
from heptapod_jax.sampling import decode
from heptapod_jax.storage.tokenizer_checkpoint import check_model_config, make_tokenizer


class ImageSampler:
  """The model, its tokenizer (with frozen params) and the mesh of one run's config."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.model_config: ModelConfig = config_lib.validate(config)
    check_model_config(config, self.model_config)
    attention.check_attention_impl(self.model_config.attention_impl,
                                layers.dtype_of(self.model_config.dtype))
    self.model = Heptapod(self.model_config)
    self.is_chief = jax.process_index() == 0
    self.mesh = sharding.create_mesh(config.mesh.shape, config.mesh.dcn_shape)
    self.rules = sharding.RULE_PRESETS[config.mesh.rules_preset]
    self.tokenizer, tokenizer_params = make_tokenizer(config.tokenizer, config.data.image_size)
    # Frozen and replicated on every device; passed to the jitted functions as an argument
    # (a closure would bake tens of MB of weights into the program as constants).
    self.tokenizer_params = jax.device_put(tokenizer_params, sharding.replicated(self.mesh))

  def abstract_params(self) -> Any:
    """ShapeDtypeStructs of the model's parameters with their NamedShardings on the mesh (from
    the parameters' logical annotations): the target to restore params or EMA params into."""
    boxed = jax.eval_shape(lambda: init_params(self.model, jax.random.key(0)))
    shardings = sharding.logical_shardings(boxed, self.mesh, self.rules)
    shapes = jax.eval_shape(lambda: nn.unbox(init_params(self.model, jax.random.key(0))))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        shapes, shardings)

  def sample_images(self, params: Any, labels: np.ndarray, seed: int, start_index: int = 0,
                    pad_to: int | None = None) -> np.ndarray:
    """uint8[B, S, S, 3] images for class `labels` (sharded over the data axes).

    Sample i is drawn with its own key, `decode.example_keys(seed, start_index + i)`,
    so it depends only on (seed, its global index) and not on the batch or mesh.
    The batch is padded to `pad_to` rows (and to a multiple of the data-parallel
    size) so that chunks of one run share one compiled program.
    """
    dp = sharding.data_parallel_size(self.mesh, self.rules)
    n = len(labels)
    rows = max(n, pad_to or 0)
    rows += (-rows) % dp
    padded = np.zeros((rows,), np.int32)
    padded[:n] = labels
    indices = (start_index + np.arange(rows)).astype(np.int32)
    spec = sharding.batch_sharding(self.mesh, self.rules, 1)
    labels_arr = jax.make_array_from_callback(padded.shape, spec, lambda idx: padded[idx])
    indices_arr = jax.make_array_from_callback(indices.shape, spec, lambda idx: indices[idx])
    out = self._generate_fn(params, self.tokenizer_params, labels_arr, indices_arr,
                            jnp.asarray(seed, jnp.uint32))
    return images.to_uint8(np.asarray(jax.device_get(out))[:n])

  @functools.cached_property
  def _generate_fn(self):
    """Jitted (params, tokenizer params, labels, indices, seed) -> decoded images in [-1, 1]."""
    scfg = decode.SamplingConfig(**self.config.sampling.to_dict())

    def generate(params, tokenizer_params, labels, indices, seed):
      keys = decode.example_keys(seed, indices)
      tokens = decode.sample(self.model, params, labels, keys, scfg)
      grid = tokens.reshape(tokens.shape[0], *self.model_config.grid_size, *tokens.shape[2:])
      return decode_tokens(self.tokenizer, tokenizer_params, grid)

    return jax.jit(generate, out_shardings=sharding.replicated(self.mesh))
