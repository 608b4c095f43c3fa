"""Small ablation on the built-in digits: next_token vs local vs global at equal training compute.

  python benchmarks/ablation_small.py                 # the three heads (see the timing below)
  python benchmarks/ablation_small.py --quick         # ~5 min: fewer steps and samples
  python benchmarks/ablation_small.py --budget=steps --budget_steps=600 \
      --workdir=workdirs/ablation_small_steps         # equal steps instead of equal FLOPs

Every run is configs/demo.py (VQ tokenizer of `make demo`'s first stage, tiny preset, batch 32)
with `head=<kind>`; only the number of training steps differs between heads.

Budget (--budget=flops, the default): equal training FLOPs. Each head's cost per image is
`flops.train_flops_per_image(model)['total']` (analytic model FLOPs, fwd + bwd); the most
expensive of --heads trains --budget_steps steps, and every other head trains
round(budget_steps * F_max / F_head) steps, so the cheaper next_token baseline gets
proportionally more updates. --budget=steps gives every head --budget_steps steps. The
learning-rate schedule (warmup, cosine) follows each run's own step count.

Each head is trained by `train.train_and_evaluate` in <workdir>/<head> (held-out NLL and
next-token accuracy at the end), sampled and scored by `sample_mode.sample_and_evaluate` (FID,
precision, recall, class accuracy of --num_samples class-balanced samples in the feature space
of the demo's small CNN, against the train split, as configs/demo.py's end-of-run evaluation),
and probed by `evaluators.probe.run` (a linear classifier on mean-pooled backbone features;
the probe's default layer is the final one, the states the head reads; the best layer over all
of them is reported too, picked on the held-out split, so it is an optimistic figure). All
heads share one feature network (<workdir>/feature_net). Rerunning skips heads whose
<workdir>/<head>/ablation_result.json exists; an interrupted head resumes from its checkpoint
and its sample chunks. The table is printed and written with everything else to
<workdir>/results.json.

Time (defaults: budget_steps 800 -> next_token 1272, local 1155, global 800 steps of batch 32):
on 2 CPU cores of an AMD EPYC the rerun of 2026-12-04 took 20 min 18 s (training 453 / 347 /
299 s, then sampling and probes; partly beside other tests). Measured (seed 0, 300 samples,
2026-12-04):

  head        steps  NLL    acc    FID    prec   recall cls acc  probe L  probe best
  next_token   1272  1.087  0.634   7.53  0.873  0.858   0.967    0.848  0.848 (L4)
  local        1155  1.383  0.533  20.72  0.757  0.756   0.940    0.791  0.798 (L3)
  global        800  1.534  0.503  20.95  0.760  0.605   0.927    0.731  0.731 (L4)
  real (test)                      34.99  0.747  0.763   0.960

At equal training FLOPs on this small set the 1D baseline is ahead on held-out NLL, FID,
precision, recall, class accuracy and the probe; one seed, and the caveats on these FIDs in docs/getting-started.md
apply. `python -m heptapod_jax.tools.readme_figures` plots each head's NLL by distance ahead.
"""
from __future__ import annotations

import importlib.util
import json
import os
import time
from typing import Any, Callable, Sequence

import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADS = ('next_token', 'local', 'global')
RESULT_FILE = 'ablation_result.json'
SETTINGS_FILE = 'ablation_settings.json'
TOKENIZER_HINT = ('train it first (the first stage of `make demo`): python -m heptapod_jax.main '
                  '--config=configs/vq_demo.py --workdir=workdirs/demo/tokenizer')

Configure = Callable[[ml_collections.ConfigDict], None]


# --------------------------------------------------------------------------- configs and budget


def demo_config(head: str, options: str = '') -> ml_collections.ConfigDict:
  """configs/demo.py with `head=<head>` (plus `options`, e.g. 'tokenizer=pixel'), unlocked."""
  spec = importlib.util.spec_from_file_location('demo_recipe', os.path.join(ROOT, 'configs',
                                                                            'demo.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  arg = ','.join(a for a in (f'head={head}', options) if a)
  return module.get_config(arg)


def _resolve_tokenizer(config: ml_collections.ConfigDict) -> None:
  """A relative tokenizer checkpoint is looked up from the cwd, then from the repository root;
  a missing one stops with the command that makes it."""
  tok = config.tokenizer
  if tok.kind == 'pixel' or not tok.checkpoint:
    return
  path = tok.checkpoint
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(ROOT, path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'the {tok.kind} tokenizer checkpoint {tok.checkpoint} does not exist; '
                            f'{TOKENIZER_HINT}.')
  tok.checkpoint = path


def head_config(head: str, *, steps: int, seed: int, num_samples: int, feature_net_dir: str,
                options: str = '', configure: Configure | None = None,
                resolve_tokenizer: bool = True) -> ml_collections.ConfigDict:
  """The experiment config of one run: demo.py for `head`, trained for `steps` steps.

  Periodic evaluations and sample grids are off (only the end-of-run held-out evaluation
  remains); generation and scoring happen in `sample_mode.sample_and_evaluate` afterwards.
  `configure` (tests, the objective study) edits the config last; the tokenizer checkpoint it
  leaves is then looked up (resolve_tokenizer=False: not looked up, for a config that only
  describes a run).
  """
  c = demo_config(head, options)
  c.seed = seed
  c.train.num_steps = steps
  c.train.sample_every = c.train.eval_every = 0
  c.train.num_sample_images = 0
  c.train.sample_at_end = False
  c.train.eval_at_end = True
  c.train.checkpoint_every = max(steps // 2, 1)
  c.evaluator.at_end = False
  c.evaluator.every_steps = 0
  c.evaluator.real_baseline = False
  c.evaluator.features = 'feature_net'
  c.evaluator.feature_net_dir = feature_net_dir
  c.evaluator.num_samples = num_samples
  c.sample.num_samples = num_samples
  c.sample.chunk_size = min(c.sample.chunk_size or num_samples, num_samples)
  c.sample.seed = seed
  c.sample.evaluate = True
  if configure is not None:
    configure(c)
  if resolve_tokenizer:
    _resolve_tokenizer(c)
  return c


def train_flops(config: ml_collections.ConfigDict) -> float:
  """Training model FLOPs of one image of `config`'s model (forward + backward)."""
  from heptapod_jax import config_lib, flops
  return float(flops.train_flops_per_image(config_lib.validate(config))['total'])


def plan_steps(flops_per_image: dict[str, float], budget_steps: int,
               budget: str = 'flops') -> dict[str, int]:
  """Training steps per head: equal FLOPs (the costliest head gets `budget_steps`) or equal steps.

  Equal FLOPs at equal batch means steps_h * F_h = budget_steps * F_max, rounded to the
  nearest step (so the budgets agree to within half of one head's step).
  """
  if budget_steps < 1:
    raise ValueError(f'budget_steps={budget_steps}: must be >= 1.')
  if budget == 'steps':
    return {h: budget_steps for h in flops_per_image}
  if budget != 'flops':
    raise ValueError(f"budget={budget!r} is not one of ['flops', 'steps'].")
  most = max(flops_per_image.values())
  return {h: max(1, round(budget_steps * most / f)) for h, f in flops_per_image.items()}


# --------------------------------------------------------------------------- one head


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, obj: Any) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, default=float)
  os.replace(tmp, path)


def settings_diff(stored: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
  """{field: (stored, asked)} where a run's stored settings differ from `settings` (compared
  as JSON, so tuples equal lists); empty when they agree."""
  asked = json.loads(json.dumps(settings))
  return {k: (stored.get(k), asked.get(k)) for k in sorted(set(stored) | set(asked))
          if stored.get(k) != asked.get(k)}


def _check_settings(workdir: str, settings: dict[str, Any]) -> None:
  """Refuses to continue a head's workdir that was started with other settings."""
  path = os.path.join(workdir, SETTINGS_FILE)
  if os.path.exists(path):
    diff = settings_diff(_read_json(path), settings)
    if diff:
      raise ValueError(f'{workdir} holds a run with other settings (stored, asked): {diff}; '
                       'pass another --workdir or delete that directory.')
  else:
    _write_json(path, settings)


def run_head(head: str, config: ml_collections.ConfigDict, workdir: str,
             settings: dict[str, Any], *, probe_layers: Sequence[str] = ('all',),
             probe_steps: int = 5000, probe_max_examples: int = 0,
             log=print) -> dict[str, Any]:
  """Trains, samples + scores, and probes one head in `workdir`; the result dict (also saved)."""
  from heptapod_jax.evaluators import probe
  from heptapod_jax.sampling import sample_mode
  from heptapod_jax.training import train

  result_path = os.path.join(workdir, RESULT_FILE)
  _check_settings(workdir, settings)
  if os.path.exists(result_path):
    log(f'[{head}] done before: {result_path}')
    return _read_json(result_path)
  steps = settings['steps']
  have = probe.latest_step(workdir)
  if have is not None and have > steps:
    raise ValueError(f'{workdir} has a checkpoint at step {have} > {steps} steps asked.')

  log(f'[{head}] training {steps} steps in {workdir} ...')
  t0 = time.time()
  summary = train.train_and_evaluate(config, workdir)
  train_s = time.time() - t0
  if summary.get('preempted'):
    raise RuntimeError(f'[{head}] stopped by {summary["preempted"]} at step {summary["step"]}; '
                       'run the same command again to resume.')
  ev = summary.get('eval') or {}
  if 'nll' in ev:
    heldout = f'held-out NLL {ev["nll"]:.4f}, accuracy {ev.get("accuracy", float("nan")):.3f}'
  elif 'mse' in ev:  # Continuous tokens: the held-out diffusion loss.
    heldout = f'held-out diffusion loss (MSE) {ev["mse"]:.4f}'
  else:
    heldout = 'no held-out pass'
  log(f'[{head}] trained in {train_s:.0f} s: {heldout}')

  t0 = time.time()
  sampled = sample_mode.sample_and_evaluate(config, workdir)
  sample_s = time.time() - t0
  gen = sampled.get('metrics') or {}
  log(f'[{head}] {sampled["num_samples"]} samples scored in {sample_s:.0f} s: '
      + ', '.join(f'{k} {gen[k]:.3f}' for k in ('fid', 'precision', 'recall', 'class_accuracy')
                  if k in gen))

  t0 = time.time()
  probes = probe.run(config, workdir, list(probe_layers), probe_steps=probe_steps,
                     max_train_examples=probe_max_examples, max_eval_examples=probe_max_examples,
                     seed=settings['seed'], log=lambda m: log(f'[{head}] probe: {m}'))
  probe_s = time.time() - t0
  depth = probes[0]['num_layers']
  final = next((p for p in probes if p['layer'] == depth), None)
  best = max(probes, key=lambda p: p['top1'])

  result = dict(
      head=head, settings=settings, steps=int(summary.get('step', steps)),
      train_flops_per_image=settings['train_flops_per_image'],
      train_flops=settings['train_flops_per_image'] * steps * settings['batch'],
      train_seconds=train_s, sample_seconds=sample_s, probe_seconds=probe_s,
      steps_per_sec=(summary.get('train') or {}).get('steps_per_sec'),
      train_loss=(summary.get('train') or {}).get('loss'),
      eval={k: float(v) for k, v in ev.items()},
      generative={k: float(v) for k, v in gen.items()},
      samples_npz=sampled.get('npz'), samples_grid=sampled.get('grid'),
      probe=[{k: (float(v) if isinstance(v, float) else v) for k, v in p.items()} for p in probes],
      probe_final_top1=final['top1'] if final else None,
      probe_best_top1=best['top1'], probe_best_layer=best['layer'], probe_num_layers=depth)
  _write_json(result_path, result)
  return result


# --------------------------------------------------------------------------- the ablation


def real_baseline(config: ml_collections.ConfigDict, workdir: str, log=print) -> dict[str, Any]:
  """Held-out real digits, raw and through the tokenizer, scored like the samples (cached)."""
  path = os.path.join(workdir, 'real_baseline.json')
  if os.path.exists(path):
    return _read_json(path)
  from heptapod_jax.evaluators import generative
  from heptapod_jax.storage.tokenizer_checkpoint import make_tokenizer
  tokenizer, params = make_tokenizer(config.tokenizer, config.data.image_size)
  out = generative.GenerativeEvaluator(config, workdir).real_baseline(tokenizer, params)
  out = {name: {k: float(v) for k, v in m.items()} for name, m in out.items()}
  _write_json(path, out)
  log(f'real baseline: {out}')
  return out


def run_ablation(*, heads: Sequence[str] = HEADS, budget_steps: int = 800, budget: str = 'flops',
                 seed: int = 0, num_samples: int = 300, workdir: str = 'workdirs/ablation_small',
                 options: str = '', probe_layers: Sequence[str] = ('all',),
                 probe_steps: int = 5000, probe_max_examples: int = 0,
                 with_real_baseline: bool = True,
                 configure: Configure | None = None, log=print) -> dict[str, Any]:
  """Plans the steps, runs every head (skipping finished ones), returns and writes the results.

  Returns dict(settings, plan={head: {steps, train_flops_per_image, train_flops}},
  runs=[result per head], real_baseline, table).
  """
  for h in heads:
    if h not in HEADS:
      raise ValueError(f'head {h!r} is not one of {list(HEADS)}.')
  if len(set(heads)) != len(heads) or not heads:
    raise ValueError(f'heads={list(heads)}: give each head once.')
  workdir = os.path.abspath(workdir)
  feature_net_dir = os.path.join(workdir, 'feature_net')

  def make(head: str, steps: int) -> ml_collections.ConfigDict:
    return head_config(head, steps=steps, seed=seed, num_samples=num_samples,
                       feature_net_dir=feature_net_dir, options=options, configure=configure)

  per_image = {h: train_flops(make(h, 1)) for h in heads}
  steps = plan_steps(per_image, budget_steps, budget)
  batch = make(heads[0], 1).train.global_batch_size
  plan = {h: dict(steps=steps[h], train_flops_per_image=per_image[h],
                  train_flops=per_image[h] * steps[h] * batch) for h in heads}
  log(f'budget={budget}, budget_steps={budget_steps}, batch {batch}:')
  for h in heads:
    p = plan[h]
    log(f'  {h:<10s} {p["train_flops_per_image"] / 1e9:7.3f} GFLOP/image -> {p["steps"]:5d} '
        f'steps = {p["train_flops"] / 1e12:7.2f} TFLOP')

  runs = []
  for h in heads:
    settings = dict(head=h, steps=steps[h], seed=seed, num_samples=num_samples, budget=budget,
                    budget_steps=budget_steps, batch=batch, options=options,
                    train_flops_per_image=per_image[h], probe_layers=list(probe_layers),
                    probe_steps=probe_steps)
    if probe_max_examples:  # Only when set: workdirs of full-split probes stay resumable.
      settings['probe_max_examples'] = probe_max_examples
    runs.append(run_head(h, make(h, steps[h]), os.path.join(workdir, h), settings,
                         probe_layers=probe_layers, probe_steps=probe_steps,
                         probe_max_examples=probe_max_examples, log=log))
  real = (real_baseline(make(heads[0], 1), workdir, log=log) if with_real_baseline else None)
  out = dict(settings=dict(heads=list(heads), budget=budget, budget_steps=budget_steps, seed=seed,
                           num_samples=num_samples, options=options, batch=batch),
             plan=plan, runs=runs, real_baseline=real)
  out['table'] = format_table(runs, real)
  _write_json(os.path.join(workdir, 'results.json'), out)
  return out


def _fmt(value: Any, spec: str, width: int) -> str:
  if value is None:
    return f'{"-":>{width}s}'
  return f'{value:>{width}{spec}}'


def format_table(runs: Sequence[dict[str, Any]], real: dict[str, Any] | None = None) -> str:
  """One row per head (and the real-image reference rows): budget, held-out NLL / accuracy,
  FID / precision / recall / class accuracy of the samples, probe top-1 (final, best layer)."""
  cols = (('head', 12), ('steps', 6), ('TFLOP', 6), ('train s', 8), ('NLL', 6), ('acc', 6),
          ('FID', 7), ('prec', 6), ('recall', 6), ('cls acc', 7), ('probe L', 8),
          ('probe best', 11))
  lines = [' '.join(f'{name:<{w}s}' if i == 0 else f'{name:>{w}s}'
                    for i, (name, w) in enumerate(cols))]
  lines.append('-' * len(lines[0]))
  for r in runs:
    ev, gen = r.get('eval') or {}, r.get('generative') or {}
    best = (f'{r["probe_best_top1"]:.3f} (L{r["probe_best_layer"]})'
            if r.get('probe_best_top1') is not None else '-')
    cells = [f'{r["head"]:<12s}', _fmt(r['steps'], 'd', 6), _fmt(r['train_flops'] / 1e12, '.2f', 6),
             _fmt(r.get('train_seconds'), '.0f', 8), _fmt(ev.get('nll'), '.3f', 6),
             _fmt(ev.get('accuracy'), '.3f', 6), _fmt(gen.get('fid'), '.2f', 7),
             _fmt(gen.get('precision'), '.3f', 6), _fmt(gen.get('recall'), '.3f', 6),
             _fmt(gen.get('class_accuracy'), '.3f', 7), _fmt(r.get('probe_final_top1'), '.3f', 8),
             f'{best:>11s}']
    lines.append(' '.join(cells))
  for name, label in (('real', 'real (test)'), ('real_tokenized', 'real tok.')):
    if real and name in real:
      m = real[name]
      cells = [f'{label:<12s}'] + [f'{"":>6s}', f'{"":>6s}', f'{"":>8s}', f'{"":>6s}', f'{"":>6s}',
                                   _fmt(m.get('fid'), '.2f', 7), _fmt(m.get('precision'), '.3f', 6),
                                   _fmt(m.get('recall'), '.3f', 6),
                                   _fmt(m.get('class_accuracy'), '.3f', 7)]
      lines.append(' '.join(cells).rstrip())
  return '\n'.join(lines)


# --------------------------------------------------------------------------- command line

_FLAGS: dict[str, Any] = {}


def _quiet_orbax_read_only(record) -> bool:
  """Drops Orbax's 'read only' warnings, logged at every read of a tokenizer or checkpoint."""
  return not ('/orbax/' in record.pathname and 'read' in str(record.msg).lower()
              and 'only' in str(record.msg).lower())


def _define_flags() -> dict[str, Any]:
  from absl import flags
  return dict(
      heads=flags.DEFINE_list('heads', list(HEADS), 'Heads to compare.'),
      budget=flags.DEFINE_enum('budget', 'flops', ['flops', 'steps'],
                               'flops: equal training FLOPs; steps: equal steps.'),
      budget_steps=flags.DEFINE_integer('budget_steps', None, 'Steps of the most expensive head '
                                        '(default 800, 150 with --quick).'),
      seed=flags.DEFINE_integer('seed', 0, 'Training, sampling and probe seed.'),
      num_samples=flags.DEFINE_integer('num_samples', None, 'Class-balanced samples scored per '
                                       'head (default 300, 100 with --quick).'),
      workdir=flags.DEFINE_string('workdir', None, 'Root of the runs (<workdir>/<head>); default '
                                  'workdirs/ablation_small, workdirs/ablation_small_quick with '
                                  '--quick.'),
      options=flags.DEFINE_string('options', '', 'Extra configs/demo.py options, e.g. size=tiny.'),
      probe_layers=flags.DEFINE_list('probe_layers', ['all'], 'Probed layers ("all" or ints).'),
      probe_steps=flags.DEFINE_integer('probe_steps', 5000, 'Linear-probe updates.'),
      real_baseline=flags.DEFINE_bool('real_baseline', True, 'Also score held-out real digits.'),
      quick=flags.DEFINE_bool('quick', False, 'Smaller defaults: a few minutes in all.'),
  )


def main(argv: Sequence[str]) -> None:
  from absl import app, logging
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from heptapod_jax import console
  f = _FLAGS
  quick = f['quick'].value
  budget_steps = f['budget_steps'].value or (150 if quick else 800)
  num_samples = f['num_samples'].value or (100 if quick else 300)
  workdir = f['workdir'].value or ('workdirs/ablation_small_quick' if quick
                                   else 'workdirs/ablation_small')
  # The terminal: the per-head lines below and each run's progress; every record (the runs'
  # metrics, Orbax's notices, TensorFlow's load-time notices) to <workdir>/log.txt.
  console.setup(workdir)
  logging.get_absl_handler().addFilter(_quiet_orbax_read_only)
  tf = console.import_tensorflow()
  tf.config.set_visible_devices([], 'GPU')
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  t0 = time.time()
  out = run_ablation(heads=f['heads'].value, budget_steps=budget_steps, budget=f['budget'].value,
                     seed=f['seed'].value, num_samples=num_samples, workdir=workdir,
                     options=f['options'].value, probe_layers=f['probe_layers'].value,
                     probe_steps=f['probe_steps'].value,
                     with_real_baseline=f['real_baseline'].value,
                     log=lambda m: print(m, flush=True))
  s = out['settings']
  print(f'\nAblation ({s["budget"]} budget, budget_steps {s["budget_steps"]}, batch {s["batch"]}, '
        f'seed {s["seed"]}, {s["num_samples"]} samples per head), {time.time() - t0:.0f} s:\n'
        'NLL / acc: held-out nats per token / next-token accuracy; FID..cls acc: samples in the '
        'feature-net space vs the train split;\nprobe L: linear probe top-1 (test split) on the '
        'final layer; probe best: best layer (picked on the test split)\n', flush=True)
  print(out['table'], flush=True)
  print(f'\nResults: {os.path.join(os.path.abspath(workdir), "results.json")}', flush=True)


if __name__ == '__main__':
  from heptapod_jax import console as _console
  _console.quiet_dependencies()  # Before TensorFlow or JAX load: their start-up notices.
  from absl import app as _app
  _FLAGS.update(_define_flags())
  _app.run(main)
