"""benchmarks/ablation_small.py end to end at a tiny budget: the budget arithmetic, one table row
per head, every metric present, and a rerun that skips the finished heads.

The end-to-end run trains the cheapest and the costliest head (next_token, global: ~40 s on 2
cores); the budget of all three heads is checked against flops.py without training."""
import importlib.util
import os

import pytest

from heptapod_jax import config_lib, flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADS = ('next_token', 'local', 'global')
RUN_HEADS = ('next_token', 'global')
BUDGET_STEPS = 3


def _load_script():
  spec = importlib.util.spec_from_file_location(
      'ablation_small', os.path.join(ROOT, 'benchmarks', 'ablation_small.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _tiny(data_dir: str):
  def configure(c):
    c.data.data_dir = data_dir
    m = c.model
    m.backbone.width, m.backbone.depth, m.backbone.num_heads = 32, 2, 2
    m.head.width, m.head.depth, m.head.num_heads = 32, 1, 2
    c.optim.warmup_steps = 1
    c.train.global_batch_size = 16
    c.train.log_every = 1
    c.train.eval_batches = 2
    c.train.peak_tflops = 1.0  # No start-up matmul timing for the logged MFU.
    c.train.checkpoint_every = c.train.num_steps
    c.evaluator.feature_net_steps = 5
  return configure


def test_plan_steps_equal_flops_and_equal_steps():
  ablation = _load_script()
  per_image = {'next_token': 3.0, 'local': 4.0, 'global': 6.0}
  assert ablation.plan_steps(per_image, 100) == {'next_token': 200, 'local': 150, 'global': 100}
  assert ablation.plan_steps(per_image, 7, 'steps') == dict.fromkeys(per_image, 7)
  with pytest.raises(ValueError, match='budget'):
    ablation.plan_steps(per_image, 7, 'tokens')


def test_tiny_ablation_runs_every_head_at_equal_flops(tmp_path):
  ablation = _load_script()
  configure = _tiny(str(tmp_path / 'tfds'))
  workdir = str(tmp_path / 'ablation')
  lines = []
  kwargs = dict(heads=RUN_HEADS, budget_steps=BUDGET_STEPS, budget='flops', seed=0, num_samples=10,
                workdir=workdir, options='tokenizer=pixel', probe_layers=['-1'], probe_steps=20,
                probe_max_examples=64, with_real_baseline=False, configure=configure,
                log=lines.append)
  out = ablation.run_ablation(**kwargs)

  # The budget, recomputed from flops.py on the configs the runs used.
  per_image = {}
  for h in HEADS:
    c = ablation.head_config(h, steps=1, seed=0, num_samples=10, feature_net_dir='unused',
                             options='tokenizer=pixel', configure=configure)
    assert c.model.head.kind == h
    per_image[h] = flops.train_flops_per_image(config_lib.validate(c))['total']
  assert per_image['next_token'] < per_image['local'] < per_image['global']
  budget = BUDGET_STEPS * per_image['global'] * 16
  for h, steps in ablation.plan_steps(per_image, BUDGET_STEPS).items():
    assert steps == round(BUDGET_STEPS * per_image['global'] / per_image[h])
    assert abs(steps * per_image[h] * 16 - budget) <= per_image[h] * 16 / 2
  runs = {r['head']: r for r in out['runs']}
  assert list(runs) == list(RUN_HEADS)
  assert runs['global']['steps'] == BUDGET_STEPS
  assert runs['next_token']['steps'] > BUDGET_STEPS
  for h in RUN_HEADS:
    steps = runs[h]['steps']
    assert steps == out['plan'][h]['steps'] == round(BUDGET_STEPS * per_image['global']
                                                     / per_image[h])
    assert abs(steps * per_image[h] * 16 - budget) <= per_image[h] * 16 / 2
    assert runs[h]['train_flops'] == pytest.approx(steps * per_image[h] * 16)
    # Every column has its number.
    for key in ('nll', 'accuracy'):
      assert key in runs[h]['eval']
    for key in ('fid', 'precision', 'recall', 'class_accuracy'):
      assert key in runs[h]['generative']
    assert runs[h]['generative']['num_images'] == 10
    assert 0.0 <= runs[h]['probe_final_top1'] <= 1.0
    assert runs[h]['probe_best_layer'] == 2  # The only probed layer: -1 = the last of 2.
  assert any('steps' in line for line in lines)

  # One table row per head, in order, with the head's steps.
  rows = out['table'].splitlines()[2:]
  assert [row.split()[0] for row in rows] == list(RUN_HEADS)
  for row, h in zip(rows, RUN_HEADS):
    assert int(row.split()[1]) == runs[h]['steps']
  assert os.path.exists(os.path.join(workdir, 'results.json'))

  # A rerun skips the finished heads and gives the same results.
  lines.clear()
  again = ablation.run_ablation(**kwargs)
  assert again['table'] == out['table']
  assert sum('done before' in line for line in lines) == len(RUN_HEADS)
  # Other settings in the same workdir are refused.
  with pytest.raises(ValueError, match='other settings'):
    ablation.run_ablation(**dict(kwargs, seed=1))
