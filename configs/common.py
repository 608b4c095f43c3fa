"""Shared pieces of the recipes: the base config and the size presets.

Recipes are loaded by path (`--config=configs/x.py`), so they import this file
with a path-relative import helper rather than as a package.
"""
from __future__ import annotations

import ml_collections

from heptapod_jax import config_lib, presets


def base_config() -> ml_collections.ConfigDict:
  """Every declared field with its default (see heptapod_jax/config_lib.py)."""
  return config_lib.base_config()


def apply_size(config: ml_collections.ConfigDict, size: str) -> ml_collections.ConfigDict:
  """Sets config.model.backbone/head shapes from preset `size` (tiny, B, L, XL, H)."""
  for section, fields in presets.size_overrides(size).items():
    for key, value in fields.items():
      config.model[section][key] = value
  return config
