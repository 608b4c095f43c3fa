"""Imports pytorch-fid's FID Inception weights into the project's .npz weight file.

  python -m heptapod_jax.tools.convert_inception \\
      --src pt_inception-2015-12-05-6726825d.pth --dst inception_fid.npz

`--src` is the file pytorch-fid downloads (FID_WEIGHTS_URL in
pytorch_fid/inception.py; fetch it yourself, nothing is downloaded here): a bare
state dict of torchvision's Inception3 with pytorch-fid's FID blocks, 1008
classes and no AuxLogits. Every key is mapped:

  X.conv.weight          [O, I, kh, kw] -> params/X/conv/kernel [kh, kw, I, O]
  X.bn.weight / .bias                   -> params/X/bn/scale / bias
  X.bn.running_mean / running_var       -> batch_stats/X/bn/mean / var
  fc.weight [1008, 2048]                -> params/fc/kernel [2048, 1008]
  fc.bias                               -> params/fc/bias

(X is the dotted module path, e.g. Mixed_6d.branch1x1 -> Mixed_6d/branch1x1).
`*.num_batches_tracked` counters are skipped; any other unmapped key, any
missing parameter or any shape mismatch aborts the import naming the keys.
torch is needed only here (CPU), never by the library.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from heptapod_jax.evaluators import inception
from heptapod_jax.storage import artifacts

SOURCE = 'pytorch-fid Inception state dict'

# torch BatchNorm leaf -> (collection, Flax leaf).
_BN_LEAVES = {
    'weight': ('params', 'scale'),
    'bias': ('params', 'bias'),
    'running_mean': ('batch_stats', 'mean'),
    'running_var': ('batch_stats', 'var'),
}


def map_key(key: str, value: np.ndarray) -> tuple[str, np.ndarray] | None:
  """One torch key/value -> ('collection/module/.../leaf', converted value); None for skipped buffers.

  Raises:
    KeyError if the key has no counterpart in the Flax network.
  """
  parts = key.split('.')
  if parts[-1] == 'num_batches_tracked':
    return None
  if parts[0] == 'fc' and len(parts) == 2:
    if parts[1] == 'weight' and value.ndim == 2:
      return 'params/fc/kernel', value.T
    if parts[1] == 'bias':
      return 'params/fc/bias', value
  elif len(parts) >= 3 and parts[-2] == 'conv' and parts[-1] == 'weight' and value.ndim == 4:
    return 'params/' + '/'.join(parts[:-1]) + '/kernel', np.transpose(value, (2, 3, 1, 0))
  elif len(parts) >= 3 and parts[-2] == 'bn' and parts[-1] in _BN_LEAVES:
    collection, leaf = _BN_LEAVES[parts[-1]]
    return f'{collection}/' + '/'.join(parts[:-1]) + f'/{leaf}', value
  raise KeyError(key)


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """pytorch-fid FID Inception state dict {key: array-like} -> {'params': ..., 'batch_stats': ...}.

  Args:
    state_dict: torch tensors (CPU) or numpy arrays, keyed as in
      `pytorch_fid.inception.fid_inception_v3().state_dict()`.

  Returns:
    Nested dicts of float32 numpy arrays for `FIDInceptionV3().apply`.

  Raises:
    ValueError naming every unmapped torch key, every Flax parameter left
    missing, or the first shape mismatch with both shapes.
  """
  want = inception.expected_shapes()
  out: dict[str, np.ndarray] = {}
  unmapped = []
  for key, value in state_dict.items():
    if hasattr(value, 'detach'):  # torch.Tensor
      value = value.detach().cpu().float().numpy()
    value = np.asarray(value)
    try:
      mapped = map_key(key, value)
    except KeyError:
      unmapped.append(f'{key} {tuple(value.shape)}')
      continue
    if mapped is None:
      continue
    path, converted = mapped
    if path not in want:
      unmapped.append(f'{key} {tuple(value.shape)} (would be {path})')
      continue
    if tuple(converted.shape) != want[path]:
      raise ValueError(f'{SOURCE}: {key} has shape {tuple(value.shape)}, converted '
                       f'{tuple(converted.shape)}, but the Flax parameter {path} expects {want[path]}.')
    out[path] = np.ascontiguousarray(converted, dtype=np.float32)
  missing = [k for k in want if k not in out]
  if unmapped or missing:
    lines = []
    if unmapped:
      lines.append(f'{len(unmapped)} {SOURCE} keys have no Flax counterpart: ' + ', '.join(unmapped[:20])
                   + (' ...' if len(unmapped) > 20 else ''))
    if missing:
      lines.append(f'{len(missing)} Flax parameters were not found in the {SOURCE}: '
                   + ', '.join(missing[:20]) + (' ...' if len(missing) > 20 else ''))
    raise ValueError('; '.join(lines) + ". Is this pytorch-fid's FID Inception "
                     '(pt_inception-2015-12-05-6726825d.pth), not torchvision\'s inception_v3?')
  return artifacts.unflatten(out)


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a PyTorch state dict file on CPU (weights_only=True) -> {key: float32 numpy array}."""
  import torch

  try:
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'pytorch-fid weight file {path} does not exist.') from e
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'could not load {path} as a PyTorch state dict with weights_only=True '
                     f'({type(e).__name__}: {e}).') from e
  if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get('state_dict'), Mapping):
    checkpoint = checkpoint['state_dict']
  if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
    what = sorted(checkpoint)[:20] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
    raise ValueError(f'{path} is not a bare state dict of tensors (got {what}).')
  return {k: v.detach().to(torch.float32).numpy() for k, v in checkpoint.items()}


def main(argv: Sequence[str] | None = None) -> None:
  """CLI entry point."""
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--src', required=True, help='pytorch-fid weights, pt_inception-2015-12-05-6726825d.pth.')
  p.add_argument('--dst', required=True, help='Output .npz for heptapod_jax.evaluators.inception.')
  args = p.parse_args(argv)
  variables = convert_state_dict(load_torch_state_dict(args.src))
  inception.save_variables(args.dst, variables)
  n = sum(v.size for v in _flat(variables).values())
  print(f'wrote {args.dst}: FID Inception-v3, {n:,} values (params + batch_stats)')


def _flat(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  flat: dict[str, Any] = {}
  for k, v in tree.items():
    key = f'{prefix}/{k}' if prefix else k
    flat.update(_flat(v, key) if isinstance(v, Mapping) else {key: v})
  return flat


if __name__ == '__main__':
  main(sys.argv[1:])
