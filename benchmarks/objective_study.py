"""Does next 2D distribution prediction help, and when? The paper's ablations x seeds, resumable.

  python benchmarks/objective_study.py                  # the default grid, 3 seeds
  python benchmarks/objective_study.py --quick          # 3 settings x 2 seeds, 150 steps: ~11 min
  python benchmarks/objective_study.py --groups=heads,weighting --seeds=0,1,2,3,4
  python benchmarks/objective_study.py --groups=density --settings=global/tps1,local/tps1
  python benchmarks/objective_study.py --list           # the grid, and which runs are done
  python benchmarks/objective_study.py --report_only    # tables and verdicts of the finished runs

Every run is configs/demo.py on the built-in digits (8x8 grid of the demo's VQ codes, 64 codes,
batch 32) with the setting's fields changed, trained by `train.train_and_evaluate`, sampled and
scored by `sample_mode.sample_and_evaluate` and probed by `evaluators.probe` (through
`benchmarks/ablation_small.run_head`), then measured on the held-out split by distance ahead.
The tokenizers (VQ, and KL for the `tokens` group) are trained once into <workdir>/tokenizers/
and the feature network once into <workdir>/feature_net: every run of every setting shares
them, so settings differ only in what the setting says (and the seed).

Groups (a setting named in several groups runs once; `global` is the reference of most):
  heads         global, local and next_token at equal steps, and local and next_token at
                equal training FLOPs (their steps scaled to global's FLOPs; flops.py);
  density       targets_per_step 1, 4, 16, all for global; 1, 4, all (= the window of 8) for
                local;
  window        the local head's window 4, 8 (local), 16, 32 (= the whole grid);
  visible       the global head without visible_context;
  weighting     loss_weighting=steps; next_weight=1 (pairs and steps);
  tokens        KL tokens with the diffusion loss (global head) vs VQ, each at 1x and 3x steps;
  conditioning  condition=add (h_t added to every grid token), direct_next (h_t straight to the
                next position's output), and both.
  temperature   the heads group and global/direct, each sampled at its best temperature
                (TEMPERATURES, picked on a split the reported FID does not use; see
                temperature_search), SEARCH_SAMPLES samples per run;
  kl_heads      global, local and next_token on KL tokens with the diffusion loss, at 1x and
                LONG x steps and (local, next_token) at global's training FLOPs, each sampled at
                its best diffusion temperature, SEARCH_SAMPLES samples per run.

Per run (each seed): held-out NLL (nats/token, the exact raster-order likelihood) and next-token
accuracy; held-out NLL by distance ahead (every step, every target the head predicts); FID,
precision, recall and class accuracy of class-balanced samples in the demo's feature-net space
against the train split; the linear probe on the backbone's final layer (fixed in advance, never
picked on the test split). KL-token runs have no likelihood: their NLL columns are empty and
their held-out diffusion MSE by distance is reported instead.

A setting with temperatures (the temperature and kl_heads groups) is also sampled at each
temperature of TEMPERATURES: the pick is the lowest FID of samples drawn with their own seed
against the held-out split, and its reported FID, precision, recall and class accuracy are those
of other draws at the picked temperature against the train split (temperature_search).

Per setting: mean and standard deviation over seeds, printed and written to <workdir>/results.json
(every run's numbers too), <workdir>/results.md (the tables), <workdir>/nll_by_distance*.svg and
<workdir>/fid_by_temperature_<group>.svg (FID against temperature, the pick side).
The paper's claims (CLAIMS) are judged from the settings run in the same command: each contrast
(held-out NLL, FID) says 'yes' only when the difference of means exceeds two pooled standard
deviations over seeds, else 'inconclusive'; rerun without --groups once the groups are done to
judge every claim (finished runs are read back, not trained again).
Each run lives in <workdir>/runs/<setting>/seed<k>/ and is skipped when its study_result.json
exists; an interrupted run resumes from its checkpoint and sample chunks. A setting whose
fields changed since its runs were made is refused (delete its directory or use another
--workdir).

Records: a finished run's numbers (not its checkpoints or samples) are also written to
benchmarks/results/objective_study/<setting>/seed<k>.json (--record_dir), with where they were
made (commit, processor, JAX version, time). They are committed with the code: a run recorded
there is read back instead of run again, on any machine, so the grid can be finished over
several sessions and `--report_only` rebuilds the tables from the records alone. The records
hold the default budget's runs; other budgets keep none unless --record_dir names a directory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import ml_collections
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_FILE = 'study_result.json'
GROUPS = ('heads', 'density', 'window', 'visible', 'weighting', 'tokens', 'conditioning',
          'temperature', 'kl_heads')
# The budget of a 1x setting (--steps). The demo's global head (1,200 steps, its cosine schedule)
# is at held-out NLL 1.540 after 600 steps and 1.510 after 1,200: 600 steps (each run with its
# own full schedule) is within a few percent of the flat part of the curve, where settings can
# be ranked; after 300 steps it is still 13% above it (1.708), where they cannot. On the 2-core
# machine a 600-step run takes about 4 minutes with its sampling, probe and held-out pass.
DEFAULT_STEPS, QUICK_STEPS = 600, 150
DEFAULT_SAMPLES, QUICK_SAMPLES = 200, 100
LONG = 3  # The tokens group's long runs: LONG x --steps.
# The sampling temperatures a setting with a temperature search tries (sampling.temperature for
# discrete tokens, model.diffusion.temperature for continuous ones), and its samples per run:
# FID's spread over seeds at 200 samples (up to +-13) hid differences of 5-15 points.
TEMPERATURES = (0.8, 0.9, 1.0, 1.1)
SEARCH_SAMPLES = 1000
# The search's samples are drawn with sample.seed + PICK_SEED_OFFSET, the reported ones with
# sample.seed: the temperature is never picked on the draws (or the images) that are reported.
PICK_SEED_OFFSET = 1000
BEST_T = '/best_t'  # The name suffix of a setting sampled at its best temperature.
DEFAULT_RECORDS = os.path.join('benchmarks', 'results', 'objective_study')

Configure = Callable[[ml_collections.ConfigDict], None]


def _ablation():
  spec = importlib.util.spec_from_file_location(
      'ablation_small', os.path.join(ROOT, 'benchmarks', 'ablation_small.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


ablation = _ablation()


# --------------------------------------------------------------------------- the grid


@dataclasses.dataclass(frozen=True)
class Setting:
  """One cell of the grid: a head of configs/demo.py with some fields changed.

  fields: {dotted config path under config.model.head (or 'model.' / 'train.' paths): value}.
  steps: a multiple of the study's --steps, or 'flops' = the training FLOPs of the global head
  on the same tokens at --steps.
  temperatures: when given, each run is also sampled at each of these temperatures and its
  reported samples are drawn at the best one (temperature_search).
  num_samples: samples scored per run; 0 = the study's --num_samples.
  """
  name: str
  head: str
  fields: tuple[tuple[str, Any], ...] = ()
  steps: float | str = 1.0
  tokenizer: str = 'vq'
  groups: tuple[str, ...] = ()
  note: str = ''
  temperatures: tuple[float, ...] = ()
  num_samples: int = 0

  def describe(self) -> str:
    parts = [f'head={self.head}'] + [f'{k}={v}' for k, v in self.fields]
    if self.tokenizer != 'vq':
      parts.append(f'tokens={self.tokenizer}')
    if self.steps != 1.0:
      parts.append('equal FLOPs' if self.steps == 'flops' else f'{self.steps:g}x steps')
    if self.temperatures:
      parts.append('best temperature of ' + '/'.join(f'{t:g}' for t in self.temperatures))
    if self.num_samples:
      parts.append(f'{self.num_samples} samples')
    return ', '.join(parts)


def grid(groups: Sequence[str] = GROUPS, quick: bool = False) -> list[Setting]:
  """The settings of `groups`, each once (its groups merged), in a stable order."""
  unknown = sorted(set(groups) - set(GROUPS))
  if unknown:
    raise ValueError(f'groups {unknown} are not among {list(GROUPS)}.')
  s = Setting
  # A setting sampled at its best temperature, with SEARCH_SAMPLES samples per run.
  t = lambda name, head, *args, **kw: s(name + BEST_T, head, *args, temperatures=TEMPERATURES,
                                        num_samples=SEARCH_SAMPLES, **kw)
  table: dict[str, list[Setting]] = {
      'heads': [s('global', 'global', note='the demo default'), s('local', 'local'),
                s('next_token', 'next_token'),
                s('local@flops', 'local', steps='flops'),
                s('next_token@flops', 'next_token', steps='flops')],
      'density': [s('global', 'global')] + [
          s(f'global/tps{k}', 'global', (('targets_per_step', k),)) for k in (1, 4, 16)] + [
          s('local', 'local')] + [
          s(f'local/tps{k}', 'local', (('targets_per_step', k),)) for k in (1, 4)],
      'window': [s(f'local/w{w}', 'local', (('window', w),)) for w in (4, 16, 32)] + [
          s('local', 'local')],
      'visible': [s('global', 'global'),
                  s('global/no_visible', 'global', (('visible_context', False),))],
      'weighting': [s('global', 'global'),
                    s('global/steps', 'global', (('loss_weighting', 'steps'),)),
                    s('global/next1', 'global', (('next_weight', 1.0),)),
                    s('global/steps+next1', 'global',
                      (('loss_weighting', 'steps'), ('next_weight', 1.0)))],
      'tokens': [s('global', 'global'), s(f'global@{LONG}x', 'global', steps=float(LONG)),
                 s('global/kl', 'global', tokenizer='kl'),
                 s(f'global/kl@{LONG}x', 'global', steps=float(LONG), tokenizer='kl')],
      'conditioning': [s('global', 'global'),
                       s('global/add', 'global', (('condition', 'add'),)),
                       s('global/direct', 'global', (('direct_next', True),)),
                       s('global/add+direct', 'global',
                         (('condition', 'add'), ('direct_next', True)))],
      'temperature': [t('global', 'global'), t('local', 'local'), t('next_token', 'next_token'),
                      t('local@flops', 'local', steps='flops'),
                      t('next_token@flops', 'next_token', steps='flops'),
                      t('global/direct', 'global', (('direct_next', True),))],
      'kl_heads': [t(f'{head}/kl{at}', head, steps=steps, tokenizer='kl')
                   for at, steps in (('', 1.0), (f'@{LONG}x', float(LONG)))
                   for head in ('global', 'local', 'next_token')] + [
                   t(f'{head}/kl@flops', head, steps='flops', tokenizer='kl')
                   for head in ('local', 'next_token')],
  }
  if quick:  # A smoke run of the machinery: the 2D head, the 1D baseline, and direct_next.
    keep = {'heads': ('global', 'next_token'), 'conditioning': ('global/direct',)}
    table = {g: [x for x in rows if x.name in keep.get(g, ())] for g, rows in table.items()}
  merged: dict[str, Setting] = {}
  for group in GROUPS:
    if group not in groups:
      continue
    for setting in table[group]:
      old = merged.get(setting.name)
      merged[setting.name] = dataclasses.replace(
          setting, groups=(old.groups if old else ()) + (group,), note=setting.note or (
              old.note if old else ''))
  return list(merged.values())


# --------------------------------------------------------------------------- one run


def _set(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  path = dotted if '.' in dotted else f'model.head.{dotted}'
  node = config
  *parents, leaf = path.split('.')
  for name in parents:
    node = node[name]
  if leaf not in node:
    raise ValueError(f'objective_study: config field {path} does not exist.')
  node[leaf] = value


def run_config(setting: Setting, *, steps: int, seed: int, num_samples: int, workdir: str,
               configure: Configure | None = None, resolve_tokenizer: bool = True
               ) -> ml_collections.ConfigDict:
  """The experiment config of one run of `setting` (demo.py + its fields), `steps` steps
  (resolve_tokenizer=False: the tokenizer need not exist, for a config that describes a run)."""
  def edit(c: ml_collections.ConfigDict) -> None:
    c.tokenizer.checkpoint = tokenizer_checkpoint(workdir, setting.tokenizer)
    for key, value in setting.fields:
      _set(c, key, value)
    if configure is not None:
      configure(c)
    c.train.checkpoint_every = max(c.train.num_steps // 3, 1)
  num_samples = setting.num_samples or num_samples
  return ablation.head_config(setting.head, steps=steps, seed=seed, num_samples=num_samples,
                              feature_net_dir=os.path.join(workdir, 'feature_net'),
                              options=f'tokenizer={setting.tokenizer}', configure=edit,
                              resolve_tokenizer=resolve_tokenizer)


def tokenizer_checkpoint(workdir: str, kind: str) -> str:
  return '' if kind == 'pixel' else os.path.join(workdir, 'tokenizers', kind, 'tokenizer')


def ensure_tokenizer(workdir: str, kind: str, configure_tokenizer: Configure | None = None,
                     log=print) -> None:
  """Trains configs/vq_demo.py (kind=vq or kl) into <workdir>/tokenizers/<kind> once.

  Two study commands on one workdir (one per core) may both need it: the first trains it
  holding <workdir>/tokenizers/<kind>.lock, the second waits for it and uses its tokenizer.
  """
  if kind == 'pixel':
    return
  with _exclusive(os.path.join(workdir, 'tokenizers', f'{kind}.lock')):
    if not os.path.exists(os.path.join(workdir, 'tokenizers', kind, 'tokenizer')):
      _train_tokenizer(workdir, kind, configure_tokenizer, log)


def ensure_feature_net(config: ml_collections.ConfigDict) -> None:
  """Trains the feature network the runs score samples with, once, under the same kind of
  lock as the tokenizers (the first run would otherwise train it in every command at once)."""
  from heptapod_jax.evaluators import feature_net
  directory = config.evaluator.feature_net_dir
  with _exclusive(directory.rstrip('/') + '.lock'):  # As the evaluator would train it.
    feature_net.load_or_train(config.data, directory, steps=config.evaluator.feature_net_steps,
                              seed=config.seed)


@contextlib.contextmanager
def _exclusive(path: str):
  """An exclusive lock on `path` (fcntl.flock: released when the holder exits or dies)."""
  import fcntl
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _train_tokenizer(workdir: str, kind: str, configure_tokenizer: Configure | None,
                     log) -> None:
  from heptapod_jax.training import train_tokenizer
  spec = importlib.util.spec_from_file_location('vq_demo',
                                                os.path.join(ROOT, 'configs', 'vq_demo.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(f'kind={kind}')
  if configure_tokenizer is not None:
    configure_tokenizer(config)
  log(f'training the {kind} tokenizer (configs/vq_demo.py:kind={kind}) once for every run ...')
  t0 = time.time()
  train_tokenizer.train_and_evaluate(config, os.path.join(workdir, 'tokenizers', kind))
  log(f'{kind} tokenizer trained in {time.time() - t0:.0f} s')


def heldout_by_distance(config: ml_collections.ConfigDict, workdir: str,
                        batch_size: int = 32) -> dict[str, float]:
  """Held-out NLL (discrete tokens; diffusion MSE for continuous ones) of every (step, target)
  pair the head predicts, every step of every held-out image, by distance ahead."""
  import jax
  import jax.numpy as jnp
  from heptapod_jax.evaluators import probe
  from heptapod_jax.models import heptapod, objective

  model, params = probe.load_model(config, workdir)
  cfg = model.config
  tokens, labels = probe.tokenize_split(config, config.data.eval_split)
  n = cfg.num_positions

  @jax.jit
  def measure(params, tokens, labels):
    b = tokens.shape[0]
    steps = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    targets, valid = objective.candidate_targets(cfg, steps)
    out = model.apply({'params': params}, tokens, labels, steps, targets)
    if cfg.continuous:
      _, metrics = heptapod.continuous_pair_loss(model, params, out, tokens, steps, targets, valid,
                                                 jax.random.key(0))
    else:
      _, metrics = objective.pair_loss_and_metrics(cfg, out, tokens, steps, targets, valid)
    return {k: v for k, v in metrics.items() if k != 'loss'}

  sums: dict[str, list[float]] = {}
  for start in range(0, len(tokens), batch_size):
    stop = min(start + batch_size, len(tokens))
    metrics = jax.device_get(measure(params, jnp.asarray(tokens[start:stop]),
                                     jnp.asarray(labels[start:stop])))
    for k, (s, c) in metrics.items():
      acc = sums.setdefault(k, [0.0, 0.0])
      acc[0] += float(s)
      acc[1] += float(c)
  return {k: (s / c if c else float('nan')) for k, (s, c) in sums.items()}


# --------------------------------------------------------------------------- temperature search
# Peers sample each model at its own best setting (LlamaGen's temperature and top-k, MAR's
# diffusion temperature); a head compared at temperature 1 may lose on FID only for that. The
# search samples a trained run at each temperature of a small grid and picks the one of the
# lowest FID on the pick side: samples drawn with their own seed (sample.seed +
# PICK_SEED_OFFSET) scored against the held-out split (data.eval_split). The reported FID is
# then measured on the other side: samples drawn with sample.seed at the picked temperature,
# scored against the reference split the rest of the study uses (evaluator.reference_split).
# Neither the images nor the draws of the reported number took part in the pick.

CURVE_METRICS = ('fid', 'inception_score', 'precision', 'recall', 'class_accuracy')


def temperature_field(config: ml_collections.ConfigDict) -> str:
  """The config field a temperature search sets: the diffusion sampler's temperature for
  continuous tokens, the categorical sampler's for discrete ones."""
  return 'model.diffusion.temperature' if config.model.tokens == 'kl' else 'sampling.temperature'


def pick_temperature(curve: Sequence[Mapping[str, Any]]) -> float:
  """The temperature of the lowest FID in `curve` ([{temperature, fid, ...}]); the first of
  equal ones. Refused when no point has a finite FID."""
  usable = [p for p in curve if p.get('fid') is not None and math.isfinite(p['fid'])]
  if not usable:
    raise ValueError(f'temperature search: no finite FID among {len(curve)} temperatures.')
  return float(min(usable, key=lambda p: p['fid'])['temperature'])


def _sampling_variant(config: ml_collections.ConfigDict, field: str, temperature: float, *,
                      seed: int, reference_split: str, out_dir: str
                      ) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  _set(c, field, float(temperature))
  c.sample.seed = seed
  c.evaluator.reference_split = reference_split
  c.sample.out_dir = out_dir
  return c


def temperature_search(config: ml_collections.ConfigDict, workdir: str,
                       temperatures: Sequence[float], *,
                       default_metrics: Mapping[str, float] | None = None) -> dict[str, Any]:
  """Samples the run in `workdir` at each of `temperatures` and reports it at the best one.

  Pick side: config.sample.num_samples class-balanced samples per temperature, drawn with seed
  config.sample.seed + PICK_SEED_OFFSET, scored against data.eval_split; the pick is the
  lowest FID (pick_temperature). Report side: the same number of samples at the picked
  temperature, drawn with config.sample.seed and scored against evaluator.reference_split.
  default_metrics: the report side's metrics at the config's own temperature when already
  measured (sample_mode.sample_and_evaluate(config, workdir)); reused when that temperature
  is the pick, since they are the same samples.

  Returns dict(field, temperatures, curve=[{temperature, fid, ...}] of the pick side, pick,
  pick_split, pick_seed, report_split, report_seed, num_samples, report={metrics}).
  Samples live in <workdir>/temperature_search/ (an interrupted search resumes from them).
  """
  from heptapod_jax.sampling import sample_mode
  if not temperatures:
    raise ValueError('temperature search: no temperatures given.')
  field = temperature_field(config)
  pick_split, report_split = config.data.eval_split, config.evaluator.reference_split
  if pick_split == report_split:
    raise ValueError(f'temperature search: data.eval_split and evaluator.reference_split are '
                     f'both {pick_split!r}; the pick needs a split the reported FID does not use.')
  report_seed = int(config.sample.seed)
  pick_seed = report_seed + PICK_SEED_OFFSET
  root = os.path.join(workdir, 'temperature_search')
  curve = []
  for t in temperatures:
    variant = _sampling_variant(config, field, t, seed=pick_seed, reference_split=pick_split,
                                out_dir=os.path.join(root, f'pick_t{t:g}'))
    metrics = sample_mode.sample_and_evaluate(variant, workdir)['metrics']
    curve.append(dict(temperature=float(t),
                      **{k: float(metrics[k]) for k in CURVE_METRICS if k in metrics}))
  pick = pick_temperature(curve)
  own = float(_get_field(config, field))
  if default_metrics is not None and pick == own:
    report = {k: float(v) for k, v in default_metrics.items()}
  else:
    variant = _sampling_variant(config, field, pick, seed=report_seed,
                                reference_split=report_split,
                                out_dir=os.path.join(root, f'report_t{pick:g}'))
    report = {k: float(v) for k, v in
              sample_mode.sample_and_evaluate(variant, workdir)['metrics'].items()}
  return dict(field=field, temperatures=[float(t) for t in temperatures], curve=curve, pick=pick,
              pick_split=pick_split, pick_seed=pick_seed, report_split=report_split,
              report_seed=report_seed, num_samples=int(config.sample.num_samples), report=report)


def _get_field(config: ml_collections.ConfigDict, dotted: str) -> Any:
  """The value of config field `dotted` (a full path, e.g. sampling.temperature)."""
  node = config
  for name in dotted.split('.'):
    node = node[name]
  return node


def run_directory(workdir: str, setting: str, seed: int) -> str:
  """Where run `seed` of `setting` trains: <workdir>/runs/<setting>/seed<k> ('/' -> '_')."""
  return os.path.join(workdir, 'runs', setting.replace('/', '_'), f'seed{seed}')


def run_one(setting: Setting, seed: int, *, steps: int, num_samples: int, workdir: str,
            probe_steps: int, configure: Configure | None = None, log=print,
            train: bool = True, record_dir: str | None = None) -> dict[str, Any] | None:
  """Trains, samples, scores and measures one seed of `setting`; its result (also saved).

  A run finished in `workdir`, or recorded in `record_dir`, is read back, not run again; a
  finished run without a record gets one. train=False: None when the run is not finished.
  """
  run_dir = run_directory(workdir, setting.name, seed)
  result_path = os.path.join(run_dir, RESULT_FILE)
  # The tokenizer is looked up only if the run trains (records need none on disk).
  config = run_config(setting, steps=steps, seed=seed, num_samples=num_samples, workdir=workdir,
                      configure=configure, resolve_tokenizer=False)
  depth = config.model.backbone.depth
  settings = dict(setting=setting.name, head=setting.head, fields=[list(f) for f in setting.fields],
                  tokenizer=setting.tokenizer, steps=steps, seed=seed,
                  num_samples=config.sample.num_samples, batch=config.train.global_batch_size,
                  train_flops_per_image=ablation.train_flops(config),
                  probe_layers=[str(depth)], probe_steps=probe_steps)
  if setting.temperatures:  # Only then: the records made before searches existed still match.
    settings['temperatures'] = list(setting.temperatures)
  record = read_record(record_dir, setting.name, seed, settings) if record_dir else None
  if os.path.exists(result_path):
    ablation._check_settings(run_dir, settings)  # Refuses a changed setting.
    result = ablation._read_json(result_path)
  elif record is not None:
    return record  # Finished before, perhaps on another machine: its committed record.
  elif not train:
    return None
  else:
    label = f'{setting.name} seed {seed}'
    ablation._resolve_tokenizer(config)
    made = provenance()  # The code as the run starts (the tree may change while it runs).
    result = ablation.run_head(label, config, run_dir, settings, probe_layers=[str(depth)],
                               probe_steps=probe_steps, log=log)
    t0 = time.time()
    result['heldout_by_distance'] = heldout_by_distance(config, run_dir)
    result['heldout_seconds'] = time.time() - t0
    if setting.temperatures:
      t0 = time.time()
      search = temperature_search(config, run_dir, setting.temperatures,
                                  default_metrics=result['generative'])
      result['search_seconds'] = time.time() - t0
      # The tables report the samples at the picked temperature; those at the config's own
      # temperature stay in the record.
      result['generative_default'] = result['generative']
      result['generative'] = search.pop('report')
      result['temperature_search'] = search
      log(f'[{label}] best temperature {search["pick"]:g} (FID on the {search["pick_split"]} '
          f'split: ' + ', '.join(f'{p["temperature"]:g}: {p["fid"]:.2f}' for p in search['curve'])
          + f'); reported FID {result["generative"]["fid"]:.2f}')
    result['setting'] = setting.name
    result['seed'] = seed
    result['provenance'] = made
    ablation._write_json(result_path, result)
  if record_dir and record is None:
    write_record(record_dir, result)
  return result


# --------------------------------------------------------------------------- records
# A finished run's numbers outlive its workdir (checkpoints and samples are large and stay on
# the machine that made them): <record_dir>/<setting>/seed<k>.json holds its result, committed
# with the code, so a study can be finished, reported and checked across sessions and machines.


def record_path(record_dir: str, setting: str, seed: int) -> str:
  return os.path.join(record_dir, setting.replace('/', '_'), f'seed{seed}.json')


def read_record(record_dir: str, setting: str, seed: int,
                settings: Mapping[str, Any]) -> dict[str, Any] | None:
  """The record of `setting`'s run `seed`, or None; refused (naming the file and the fields)
  when it was made with other settings than `settings`."""
  path = record_path(record_dir, setting, seed)
  if not os.path.exists(path):
    return None
  record = ablation._read_json(path)
  diff = ablation.settings_diff(record.get('settings') or {}, settings)
  if diff:
    raise ValueError(f'{path} records a run with other settings (recorded, asked): {diff}; '
                     'delete it to run the setting again, or pass --record_dir= (empty) to '
                     'study without records.')
  return record


def write_record(record_dir: str, result: Mapping[str, Any]) -> str:
  """Writes a finished run's result as its record (machine-specific paths left out)."""
  record = {k: v for k, v in result.items() if k not in ('samples_npz', 'samples_grid')}
  record.setdefault('provenance', provenance(recorded_later=True))
  path = record_path(record_dir, result['setting'], result['seed'])
  os.makedirs(os.path.dirname(path), exist_ok=True)
  ablation._write_json(path, record)
  return path


def provenance(recorded_later: bool = False) -> dict[str, Any]:
  """Where a run was made: the code's commit, the processor, the JAX version, the UTC time.

  recorded_later: the run finished before records were written (its numbers are from its
  workdir); the commit and time are then the recording's, not the run's."""
  import platform
  import subprocess
  import jax
  try:
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, text=True,
                            capture_output=True, check=True).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=ROOT,
                           text=True, capture_output=True, check=True).stdout.strip()
    commit += '+changes' if dirty else ''
  except (OSError, subprocess.CalledProcessError):
    commit = 'unknown'
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')),
                 cpu)
  except OSError:
    pass
  out = dict(commit=commit, cpu=cpu, cores=os.cpu_count(), jax=jax.__version__,
             utc=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))
  if recorded_later:
    out['recorded_later'] = True
  return out


def grid_status(settings: Sequence[Setting], seeds: Sequence[int], steps_of: Mapping[str, int],
                *, workdir: str, record_dir: str | None) -> list[dict[str, Any]]:
  """Where each run of the grid stands, for planning the rest across sessions (--list).

  Per setting: the seeds with a record in `record_dir`, the seeds finished in `workdir` without
  one, the seeds still to run, and `minutes`, an estimate of those runs' time on one core at
  the pace of the recorded runs: training seconds per step (the median over the records of the
  same head and tokens, else of the same tokens) times the setting's steps, plus the median
  time of sampling, probe and held-out pass. None when no record can give a pace.
  """
  records = []
  if record_dir and os.path.isdir(record_dir):
    for name in sorted(os.listdir(record_dir)):
      folder = os.path.join(record_dir, name)
      for file in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
        if file.startswith('seed') and file.endswith('.json'):
          records.append(ablation._read_json(os.path.join(folder, file)))

  def pace(head: str, tokenizer: str) -> tuple[float, float] | None:
    def of(r):
      return r['settings'].get('tokenizer', 'vq'), r['settings'].get('head')
    for same in ((lambda r: of(r) == (tokenizer, head)), (lambda r: of(r)[0] == tokenizer)):
      chosen = [r for r in records if same(r) and r.get('train_seconds') and r.get('steps')]
      if chosen:
        per_step = float(np.median([r['train_seconds'] / r['steps'] for r in chosen]))
        rest = float(np.median([after_training_seconds(r) for r in chosen]))
        return per_step, rest
    return None

  out = []
  for s in settings:
    recorded = [k for k in seeds if record_dir
                and os.path.exists(record_path(record_dir, s.name, k))]
    finished = [k for k in seeds if k not in recorded and os.path.exists(
        os.path.join(run_directory(workdir, s.name, k), RESULT_FILE))]
    missing = [k for k in seeds if k not in recorded and k not in finished]
    p = pace(s.head, s.tokenizer) if missing else (0.0, 0.0)
    minutes = None if p is None else len(missing) * (p[0] * steps_of[s.name] + p[1]) / 60
    out.append(dict(setting=s.name, steps=steps_of[s.name], recorded=recorded,
                    finished=finished, missing=missing, minutes=minutes))
  return out


def format_status(rows: Sequence[Mapping[str, Any]], describe: Mapping[str, str]) -> str:
  """--list's table: each setting, its steps, its runs' state and what is left to run."""
  def seeds(ks):
    return ','.join(map(str, ks)) or '-'
  lines = [f'{"setting":22s} {"steps":>5s} {"recorded":>9s} {"finished":>9s} {"to run":>7s} '
           f'{"~min":>5s}  what']
  for r in rows:
    est = '' if not r['missing'] else ('?' if r['minutes'] is None else f'{r["minutes"]:.0f}')
    lines.append(f'{r["setting"]:22s} {r["steps"]:5d} {seeds(r["recorded"]):>9s} '
                 f'{seeds(r["finished"]):>9s} {seeds(r["missing"]):>7s} {est:>5s}  '
                 f'{describe[r["setting"]]}')
  total = sum(len(r['recorded']) + len(r['finished']) + len(r['missing']) for r in rows)
  done = sum(len(r['recorded']) + len(r['finished']) for r in rows)
  left = [r['minutes'] for r in rows if r['missing']]
  known = sum(m for m in left if m is not None)
  unknown = sum(1 for m in left if m is None)
  pace = []
  if len(left) > unknown:
    pace.append(f'about {known / 60:.1f} hours on one core at the recorded pace')
  if unknown:
    pace.append(f'{unknown} settings with no pace on record')
  lines.append(f'{done} of {total} runs done ({sum(len(r["recorded"]) for r in rows)} recorded); '
               f'{total - done} to run' + (f': {"; ".join(pace)}' if pace else '') + '.')
  return '\n'.join(lines)


# --------------------------------------------------------------------------- the study


# (key, label, format, where in a run's result): the columns of the tables, in order.
METRICS = (
    ('nll', 'NLL', '.3f', ('eval', 'nll')),
    ('accuracy', 'acc', '.3f', ('eval', 'accuracy')),
    ('mse', 'MSE', '.4f', ('eval', 'mse')),  # Continuous tokens: held-out diffusion loss.
    ('nll_ahead_1', 'NLL d=1', '.3f', ('heldout_by_distance', 'nll_ahead_1')),
    ('nll_ahead_2_4', 'NLL d=2-4', '.3f', ('heldout_by_distance', 'nll_ahead_2_4')),
    ('nll_ahead_5_16', 'NLL d=5-16', '.3f', ('heldout_by_distance', 'nll_ahead_5_16')),
    ('nll_ahead_17_plus', 'NLL d=17+', '.3f', ('heldout_by_distance', 'nll_ahead_17_plus')),
    ('mse_ahead_1', 'MSE d=1', '.4f', ('heldout_by_distance', 'mse_ahead_1')),
    ('temperature', 'T*', '.2f', ('temperature_search', 'pick')),  # The FID's temperature.
    ('fid', 'FID', '.2f', ('generative', 'fid')),
    ('precision', 'prec', '.3f', ('generative', 'precision')),
    ('recall', 'recall', '.3f', ('generative', 'recall')),
    ('class_accuracy', 'cls acc', '.3f', ('generative', 'class_accuracy')),
    ('probe', 'probe', '.3f', ('probe_final_top1',)),
)


def _get(result: Mapping[str, Any], where: Sequence[str]) -> float | None:
  node: Any = result
  for key in where:
    if not isinstance(node, Mapping) or key not in node:
      return None
    node = node[key]
  return None if node is None or not math.isfinite(float(node)) else float(node)


def aggregate(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float | None]]:
  """{metric: {mean, std, n}} over a setting's seeds (std: sample standard deviation, ddof=1)."""
  out = {}
  for key, _, _, where in METRICS:
    values = [v for v in (_get(r, where) for r in runs) if v is not None]
    out[key] = dict(mean=float(np.mean(values)) if values else None,
                    std=float(np.std(values, ddof=1)) if len(values) > 1 else None,
                    n=len(values))
  return out


def _cell(stat: Mapping[str, Any], spec: str) -> str:
  if stat['mean'] is None:
    return '-'
  if stat['std'] is None:
    return f'{stat["mean"]:{spec}}'
  return f'{stat["mean"]:{spec}} ± {stat["std"]:{spec}}'


def markdown_tables(settings: Sequence[Setting], summary: Mapping[str, Any],
                    steps_of: Mapping[str, int]) -> str:
  """One markdown table per group: a row per setting, mean ± std over seeds per metric
  (metrics no row of the group has are left out)."""
  blocks = []
  for group in GROUPS:
    rows = [s for s in settings if group in s.groups]
    if not rows:
      continue
    columns = [m for m in METRICS if any(summary[s.name][m[0]]['mean'] is not None for s in rows)]
    header = ['setting', 'steps', 'seeds'] + [label for _, label, _, _ in columns]
    lines = [f'**{group}**', '', '| ' + ' | '.join(header) + ' |',
             '|' + '---|' + '---:|' * (len(header) - 1)]
    for s in rows:
      stats = summary[s.name]
      seeds = max(stats[m[0]]['n'] for m in columns) if columns else 0
      cells = [f'{s.name} ({s.describe()})', str(steps_of[s.name]), str(seeds)]
      cells += [_cell(stats[key], spec) for key, _, spec, _ in columns]
      lines.append('| ' + ' | '.join(cells) + ' |')
    blocks.append('\n'.join(lines))
  return '\n\n'.join(blocks) + '\n'


@dataclasses.dataclass(frozen=True)
class Gap:
  """A contrast of two contrasts: the pair `better` is less far apart on `metric` than the pair
  `worse` (each pair: (setting, its reference)). Gap(('global/kl', 'next_token/kl'),
  ('global', 'next_token'), 'fid') says the global head trails next_token by less on KL tokens
  than on VQ tokens."""
  better: tuple[str, str]
  worse: tuple[str, str]
  metric: str


# The paper's claims, as contrasts of the grid: (claim, [(better, worse, metric) or Gap], how
# the contrasts combine). A contrast says `better` beats `worse` on `metric` (lower is better for
# NLL, MSE and FID).
CLAIMS = (
    ('the global head beats the local one',
     [('global', 'local', 'nll'), ('global', 'local', 'fid'),
      ('global', 'local@flops', 'nll'), ('global', 'local@flops', 'fid')], 'all'),
    ('a larger local window is better',
     [('local/w32', 'local/w4', 'nll'), ('local/w32', 'local/w4', 'fid')], 'all'),
    ('denser supervision helps the global head',
     [('global', 'global/tps1', 'nll'), ('global', 'global/tps1', 'fid')], 'all'),
    ('... but little the local one (no clear gain from all 8 targets over 1)',
     [('local', 'local/tps1', 'nll'), ('local', 'local/tps1', 'fid')], 'none'),
    ('VQ tokens learn faster early',
     [('global', 'global/kl', 'fid')], 'all'),
    ('KL tokens win late',
     [(f'global/kl@{LONG}x', f'global@{LONG}x', 'fid')], 'all'),
    ('on KL tokens the global head beats next_token (diffusion loss; FID at the best temperature)',
     [(f'global/kl{BEST_T}', f'next_token/kl{BEST_T}', 'mse'),
      (f'global/kl{BEST_T}', f'next_token/kl{BEST_T}', 'fid'),
      (f'global/kl@{LONG}x{BEST_T}', f'next_token/kl@{LONG}x{BEST_T}', 'mse'),
      (f'global/kl@{LONG}x{BEST_T}', f'next_token/kl@{LONG}x{BEST_T}', 'fid'),
      (f'global/kl{BEST_T}', f'next_token/kl@flops{BEST_T}', 'mse'),
      (f'global/kl{BEST_T}', f'next_token/kl@flops{BEST_T}', 'fid')], 'all'),
    ('at the best temperature the global head beats next_token on VQ tokens (FID)',
     [(f'global{BEST_T}', f'next_token{BEST_T}', 'fid'),
      (f'global{BEST_T}', f'next_token@flops{BEST_T}', 'fid')], 'all'),
    ("at the best temperature direct_next's NLL gain is also an FID gain",
     [(f'global/direct{BEST_T}', f'global{BEST_T}', 'nll'),
      (f'global/direct{BEST_T}', f'global{BEST_T}', 'fid')], 'all'),
    ("the global head's FID deficit to next_token is smaller on KL tokens than on VQ tokens "
     '(best temperature)',
     [Gap((f'global/kl{BEST_T}', f'next_token/kl{BEST_T}'),
          (f'global{BEST_T}', f'next_token{BEST_T}'), 'fid')], 'all'),
)


def _verdict(diff: float, spread: float) -> str:
  """The study's rule: 'yes' (ahead) or 'no' (behind) beyond two spreads, else 'inconclusive'."""
  return 'yes' if diff > 2 * spread else 'no' if -diff > 2 * spread else 'inconclusive'


def compare(summary: Mapping[str, Any], better: str, worse: str, metric: str
            ) -> dict[str, Any]:
  """Whether `better` beats `worse` on `metric` by more than two standard deviations over seeds.

  The spread is the pooled sample standard deviation of the two settings' seeds,
  sqrt((s_a^2 + s_b^2) / 2); a difference of means smaller than twice it is 'inconclusive'.
  Returns dict(better, worse, metric, diff = how much `better` is ahead (positive: ahead),
  spread, verdict: 'yes' | 'no' (ahead the other way) | 'inconclusive' | 'not run').
  """
  out = dict(better=better, worse=worse, metric=metric, diff=None, spread=None)
  a, b = summary.get(better, {}).get(metric), summary.get(worse, {}).get(metric)
  if not a or not b or a['mean'] is None or b['mean'] is None:
    return dict(out, verdict='not run')
  if a['std'] is None or b['std'] is None:
    return dict(out, verdict='inconclusive')  # One seed: no spread to judge by.
  lower_is_better = metric in ('nll', 'mse', 'fid') or metric.startswith(('nll_', 'mse_'))
  diff = (b['mean'] - a['mean']) if lower_is_better else (a['mean'] - b['mean'])
  spread = math.sqrt((a['std'] ** 2 + b['std'] ** 2) / 2)
  return dict(out, diff=diff, spread=spread, verdict=_verdict(diff, spread))


def compare_gap(summary: Mapping[str, Any], gap: Gap) -> dict[str, Any]:
  """Whether the pair gap.better is less far apart than gap.worse, by the rule of compare().

  Each pair's lead d_i (how far its first setting is ahead of its second, as compare() says)
  has the per-seed standard deviation of a difference, sqrt(s_a^2 + s_b^2); the two leads are
  compared as compare() compares two settings: diff = d_better - d_worse (positive: the first
  pair's setting is less behind, or further ahead), spread = the two leads' pooled standard
  deviation, 'inconclusive' under twice it.
  """
  leads = [compare(summary, a, b, gap.metric) for a, b in (gap.better, gap.worse)]
  out = dict(better=' vs '.join(gap.better), worse=' vs '.join(gap.worse), metric=gap.metric,
             diff=None, spread=None, gap=True)
  said = [lead['verdict'] for lead in leads]
  if 'not run' in said:
    return dict(out, verdict='not run')
  if any(lead['spread'] is None for lead in leads):
    return dict(out, verdict='inconclusive')
  diff = leads[0]['diff'] - leads[1]['diff']
  # compare()'s spread is sqrt((s_a^2 + s_b^2) / 2): a lead's own sd is sqrt(2) times it.
  spread = math.sqrt(leads[0]['spread'] ** 2 + leads[1]['spread'] ** 2)
  return dict(out, diff=diff, spread=spread, verdict=_verdict(diff, spread))


def verdicts(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Each claim of CLAIMS: its contrasts and 'reproduced' / 'not reproduced' / 'inconclusive'
  / 'not run'. 'all': reproduced when every contrast says yes, not reproduced when one says no.
  'none' (a claim of no effect): reproduced when no contrast says yes or no, not reproduced
  when one does."""
  rows = []
  for claim, contrasts, rule in CLAIMS:
    found = [compare_gap(summary, c) if isinstance(c, Gap) else compare(summary, *c)
             for c in contrasts]
    said = [f['verdict'] for f in found]
    if 'not run' in said:
      verdict = 'not run'
    elif rule == 'all':
      verdict = ('reproduced' if all(v == 'yes' for v in said) else
                 'not reproduced' if 'no' in said else 'inconclusive')
    else:
      verdict = 'not reproduced' if any(v in ('yes', 'no') for v in said) else 'reproduced'
    rows.append(dict(claim=claim, verdict=verdict, contrasts=found))
  return rows


def markdown_verdicts(rows: Sequence[Mapping[str, Any]]) -> str:
  """The claims' table: each contrast as 'A vs B on metric: ahead by d (2 sd = s)'."""
  lines = ['**the paper\'s claims** (a difference under two pooled standard deviations over '
           'seeds is inconclusive)', '', '| claim | evidence | verdict |', '|---|---|---|']
  for row in rows:
    evidence = []
    for c in row['contrasts']:
      what = (f'({c["better"]}) vs ({c["worse"]})' if c.get('gap') else
              f'{c["better"]} vs {c["worse"]}')
      if c['diff'] is None:
        evidence.append(f'{what}, {c["metric"]}: {c["verdict"]}')
      else:
        evidence.append(f'{what}, {c["metric"]}: ahead by '
                        f'{c["diff"]:.3f} (2 sd = {2 * c["spread"]:.3f})')
    lines.append(f'| {row["claim"]} | {"; ".join(evidence)} | {row["verdict"]} |')
  return '\n'.join(lines) + '\n'


def distance_plot(settings: Sequence[Setting], summary_runs: Mapping[str, Sequence[Mapping]],
                  title: str = 'Held-out NLL by distance ahead (mean over seeds)') -> str | None:
  """SVG: held-out NLL by distance ahead (mean over seeds), one line per discrete setting."""
  from heptapod_jax import report
  buckets = (('nll_ahead_1', 1.0, '1'), ('nll_ahead_2_4', 2.0, '2-4'),
             ('nll_ahead_5_16', 3.0, '5-16'), ('nll_ahead_17_plus', 4.0, '17+'))
  series = {}
  for s in settings:
    points = []
    for key, x, _ in buckets:
      values = [v for v in (_get(r, ('heldout_by_distance', key)) for r in summary_runs[s.name])
                if v is not None]
      if values:
        points.append((x, float(np.mean(values))))
    if len(points) > 1:
      series[s.name] = points
  if not series:
    return None
  return report.svg_line_plot(series, title=title,
                              xlabel='distance ahead (1 = the next position, the one sampling uses)',
                              ylabel='NLL (nats/token)', markers=True,
                              x_labels={x: label for _, x, label in buckets})


def select(settings: Sequence[Setting], names: Sequence[str] | None) -> list[Setting]:
  """The settings named in `names` (all when None), in the grid's order; unknown names refused."""
  if names is None:
    return list(settings)
  unknown = sorted(set(names) - {s.name for s in settings})
  if unknown:
    raise ValueError(f'--settings {unknown} are not in the grid of these groups '
                     f'({[s.name for s in settings]}).')
  return [s for s in settings if s.name in set(names)]


def plan(settings: Sequence[Setting], steps: int, *, seed: int, num_samples: int, workdir: str,
         configure: Configure | None = None) -> dict[str, int]:
  """Training steps of each setting: steps x its multiple, or the FLOPs of the global head
  on the same tokens at `steps`."""
  out = {}
  reference: dict[str, float] = {}
  for s in settings:
    if s.steps == 'flops':
      if s.tokenizer not in reference:
        reference[s.tokenizer] = ablation.train_flops(run_config(
            Setting('global', 'global', tokenizer=s.tokenizer), steps=1, seed=seed,
            num_samples=num_samples, workdir=workdir, configure=configure,
            resolve_tokenizer=False))
      own = ablation.train_flops(run_config(s, steps=1, seed=seed, num_samples=num_samples,
                                            workdir=workdir, configure=configure,
                                            resolve_tokenizer=False))
      out[s.name] = max(1, round(steps * reference[s.tokenizer] / own))
    else:
      out[s.name] = max(1, round(steps * float(s.steps)))
  return out


def run_study(settings: Sequence[Setting], *, seeds: Sequence[int] = (0, 1, 2), steps: int,
              num_samples: int, workdir: str, probe_steps: int = 2000,
              configure: Configure | None = None, configure_tokenizer: Configure | None = None,
              log=print, train: bool = True, record_dir: str | None = None) -> dict[str, Any]:
  """Runs every seed of every setting (skipping finished runs); writes and returns the results.

  record_dir: where finished runs are recorded (see read_record); a recorded run is not run
  again, even when `workdir` is new.

  train=False (--report_only) trains nothing: the tables, plots and verdicts of the runs that
  are finished, a setting with no finished seed left out (its contrasts 'not run').
  """
  if not settings or not seeds:
    raise ValueError('objective_study: nothing to run (no settings or no seeds).')
  workdir = os.path.abspath(workdir)

  def recorded(s: Setting) -> bool:  # Needs no tokenizer or feature net trained here.
    return bool(record_dir) and all(
        os.path.exists(record_path(record_dir, s.name, seed)) for seed in seeds)

  for kind in sorted({s.tokenizer for s in settings if not recorded(s)}) if train else ():
    ensure_tokenizer(workdir, kind, configure_tokenizer, log=log)
  if train and not all(recorded(s) for s in settings):
    ensure_feature_net(run_config(settings[0], steps=steps, seed=seeds[0],
                                  num_samples=num_samples, workdir=workdir, configure=configure,
                                  resolve_tokenizer=False))
  steps_of = plan(settings, steps, seed=seeds[0], num_samples=num_samples, workdir=workdir,
                  configure=configure)
  t0 = time.time()
  runs: dict[str, list[dict[str, Any]]] = {}
  total, done = len(settings) * len(seeds), 0
  for s in settings:
    for seed in seeds:
      result = run_one(s, seed, steps=steps_of[s.name], num_samples=num_samples, workdir=workdir,
                       probe_steps=probe_steps, configure=configure, log=log, train=train,
                       record_dir=record_dir)
      done += 1
      if result is None:
        log(f'[{done}/{total}] {s.name} seed {seed}: not run')
        continue
      runs.setdefault(s.name, []).append(result)
      nll, mse = _get(result, ('eval', 'nll')), _get(result, ('eval', 'mse'))
      likelihood = (f'NLL {nll:.3f}' if nll is not None else f'MSE {mse:.4f}' if mse is not None
                    else 'NLL -')
      fid = _get(result, ('generative', 'fid'))
      log(f'[{done}/{total}] {s.name} seed {seed}: {likelihood}, FID '
          f'{"-" if fid is None else f"{fid:.2f}"} ({(time.time() - t0) / 60:.1f} min so far)')
  settings = [s for s in settings if s.name in runs]
  if not settings:
    raise ValueError(f'objective_study: no finished run in {workdir}/runs'
                     + (f' or {record_dir}' if record_dir else '') + ' to report on.')
  summary = {s.name: aggregate(runs[s.name]) for s in settings}
  claims = verdicts(summary)
  table = (markdown_tables(settings, summary, steps_of) + '\n' + markdown_verdicts(claims)
           + '\n' + provenance_note(runs))
  out = dict(settings=[dict(dataclasses.asdict(s), steps=steps_of[s.name], describe=s.describe())
                       for s in settings],
             seeds=list(seeds), steps=steps, num_samples=num_samples, probe_steps=probe_steps,
             summary=summary, runs=runs, verdicts=claims, table=table,
             run_seconds=run_seconds(runs))
  ablation._write_json(os.path.join(workdir, 'results.json'), out)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(table)
  for name, svg in {**distance_plots(settings, runs), **temperature_plots(settings, runs)}.items():
    with open(os.path.join(workdir, name), 'w') as f:
      f.write(svg)
  return out


def after_training_seconds(result: Mapping[str, Any]) -> float:
  """A run's seconds after training: sampling and scoring, the probe, the held-out pass."""
  return sum(result.get(k) or 0.0 for k in ('sample_seconds', 'probe_seconds',
                                            'heldout_seconds', 'search_seconds'))


def _duration(seconds: float) -> str:
  return f'{seconds / 3600:.1f} h' if seconds >= 3600 else f'{seconds / 60:.1f} min'


def run_seconds(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, float]:
  """What the reported runs took one after another (the wall time of the grid on one machine
  running one at a time; the tokenizers and the feature network, trained once, are not in
  it): {'train': s, 'after': s (sampling, probe, held-out pass), 'total': s}."""
  train = sum(r.get('train_seconds') or 0.0 for results in runs.values() for r in results)
  after = sum(after_training_seconds(r) for results in runs.values() for r in results)
  return dict(train=train, after=after, total=train + after)


def format_run_seconds(seconds: Mapping[str, float]) -> str:
  return (f'Run time: {_duration(seconds["total"])} run after run ({_duration(seconds["train"])} '
          f'training, {_duration(seconds["after"])} sampling, probe and held-out pass).')


def provenance_note(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
  """One line: how many runs each processor made, and the commits of their code."""
  machines: dict[str, int] = {}
  commits: set[str] = set()
  for results in runs.values():
    for r in results:
      p = r.get('provenance') or {}
      cpu = p.get('cpu', 'an unrecorded machine')
      if p.get('cores'):
        cpu += f' ({p["cores"]} cores)'
      machines[cpu] = machines.get(cpu, 0) + 1
      commits.add(p.get('commit', 'unrecorded'))
  made = '; '.join(f'{n} on {cpu}' for cpu, n in sorted(machines.items(), key=lambda kv: -kv[1]))
  return f'Runs: {made}; code at {", ".join(sorted(commits))}.\n'


def distance_plots(settings: Sequence[Setting], runs: Mapping[str, Sequence[Mapping]]
                   ) -> dict[str, str]:
  """{file name: SVG}: every setting in nll_by_distance.svg, and one plot per group with two or
  more settings that have likelihoods in nll_by_distance_<group>.svg (readable where the
  whole grid is not)."""
  out = {}
  svg = distance_plot(settings, runs)
  if svg:
    out['nll_by_distance.svg'] = svg
  for group in GROUPS:
    members = [s for s in settings if group in s.groups and s.tokenizer != 'kl']
    if len(members) < 2:  # KL-token runs have no likelihood to plot.
      continue
    svg = distance_plot(members, runs, title=f'Held-out NLL by distance ahead: {group} '
                        f'(mean over {max(len(runs[s.name]) for s in members)} seeds)')
    if svg:
      out[f'nll_by_distance_{group}.svg'] = svg
  return out


def temperature_curves(settings: Sequence[Setting], runs: Mapping[str, Sequence[Mapping]]
                       ) -> dict[str, list[tuple[float, float]]]:
  """{setting: [(temperature, FID of the pick side, mean over the seeds searched)]} of the
  settings whose runs have a temperature search."""
  out = {}
  for s in settings:
    by_t: dict[float, list[float]] = {}
    for r in runs.get(s.name, ()):
      for point in (r.get('temperature_search') or {}).get('curve', ()):
        if point.get('fid') is not None and math.isfinite(point['fid']):
          by_t.setdefault(float(point['temperature']), []).append(float(point['fid']))
    if by_t:
      out[s.name] = [(t, float(np.mean(v))) for t, v in sorted(by_t.items())]
  return out


def temperature_plots(settings: Sequence[Setting], runs: Mapping[str, Sequence[Mapping]]
                      ) -> dict[str, str]:
  """{file name: SVG}: FID against the sampling temperature (the search's pick side, mean over
  seeds), one line per setting, one plot per group with searched settings:
  fid_by_temperature_<group>.svg."""
  from heptapod_jax import report
  out = {}
  for group in GROUPS:
    members = [s for s in settings if group in s.groups]
    curves = temperature_curves(members, runs)
    if not curves:
      continue
    seeds = max(len(runs[name]) for name in curves)
    out[f'fid_by_temperature_{group}.svg'] = report.svg_line_plot(
        curves, title=f'FID by sampling temperature: {group} (held-out split, mean over '
        f'{seeds} seeds)', xlabel='temperature', ylabel='FID', markers=True)
  return out


# --------------------------------------------------------------------------- command line

_FLAGS: dict[str, Any] = {}


def _define_flags() -> dict[str, Any]:
  from absl import flags
  return dict(
      groups=flags.DEFINE_list('groups', list(GROUPS), f'Groups of the grid, of {list(GROUPS)}.'),
      settings=flags.DEFINE_list('settings', None, 'Only these settings of --groups (names as '
                                 '--list prints them), in the grid\'s order; default all.'),
      seeds=flags.DEFINE_list('seeds', None, 'Seeds (training, sampling, probe); default 0,1,2 '
                              '(0,1 with --quick).'),
      steps=flags.DEFINE_integer('steps', None, f'Training steps of a 1x setting (default '
                                 f'{DEFAULT_STEPS}, {QUICK_STEPS} with --quick).'),
      num_samples=flags.DEFINE_integer('num_samples', None, 'Class-balanced samples scored per '
                                       f'run (default {DEFAULT_SAMPLES}, {QUICK_SAMPLES} with '
                                       '--quick).'),
      probe_steps=flags.DEFINE_integer('probe_steps', 2000, 'Linear-probe updates.'),
      workdir=flags.DEFINE_string('workdir', None, 'Root of the runs; default '
                                  'workdirs/objective_study (_quick with --quick).'),
      record_dir=flags.DEFINE_string('record_dir', None, 'Where finished runs are recorded '
                                     '(<dir>/<setting>/seed<k>.json, committed with the code) '
                                     'and read back instead of run again; default '
                                     f'{DEFAULT_RECORDS} at the default budget, none otherwise; '
                                     'empty: none.'),
      report_only=flags.DEFINE_bool('report_only', False, 'Train nothing: tables, plots and '
                                    'verdicts of the finished runs only.'),
      quick=flags.DEFINE_bool('quick', False, 'A smoke run: global, next_token and global/direct, '
                             '2 seeds, fewer steps and samples.'),
      list=flags.DEFINE_bool('list', False, 'Print the grid and exit.'),
      compilation_cache=flags.DEFINE_string(
          'compilation_cache', None, "JAX's persistent compilation cache: the seeds of a "
          'setting (and a rerun) reuse its compiled programs instead of compiling them again '
          '(the command says at the end how much compiling it saved). Default '
          '<workdir>/jax_cache/<a hash of the host CPU> (an entry compiled on another '
          'processor can crash the reader), or $JAX_COMPILATION_CACHE_DIR when set; empty: '
          'off.'),
  )


def use_compilation_cache(flag: str | None, workdir: str) -> str:
  """Points JAX's persistent compilation cache at `flag` (None: $JAX_COMPILATION_CACHE_DIR,
  else <workdir>/jax_cache/<console.host_cpu_fingerprint()>; '': off) and returns the
  directory ('' when off). A cached program is the one the compiler would build (JAX keys
  entries by the program, the JAX version, the backend and its flags), so the numbers do not
  change. JAX's key leaves out the processor, and a CPU executable compiled for another one
  can crash the process that loads it: a workdir that moves between machines keeps one folder
  per CPU."""
  import jax
  from heptapod_jax import console
  path = os.environ.get('JAX_COMPILATION_CACHE_DIR') if flag is None else flag
  if path is None:
    path = os.path.join(workdir, 'jax_cache', console.host_cpu_fingerprint())
  if path:
    jax.config.update('jax_compilation_cache_dir', path)
    if 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in os.environ:  # The user's, if set.
      # Every program of a run, not only the slow ones (the default skips those under 1 s).
      jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  return path


class CacheTally:
  """Counts the programs JAX reads back from its persistent compilation cache in this process,
  and the compile time they saved (JAX's own monitoring events)."""

  def __init__(self):
    import jax
    self.hits, self.saved = 0, 0.0

    def on_event(name, **_):
      if name == '/jax/compilation_cache/cache_hits':
        self.hits += 1

    def on_duration(name, seconds, **_):
      if name == '/jax/compilation_cache/compile_time_saved_sec':
        self.saved += seconds

    jax.monitoring.register_event_listener(on_event)
    jax.monitoring.register_event_duration_secs_listener(on_duration)

  def line(self, path: str) -> str:
    return (f'Compilation cache {path}: {self.hits} programs read back instead of compiled, '
            f'{self.saved:.0f} s of compiling saved.')


def main(argv: Sequence[str]) -> None:
  from absl import app, logging
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = _FLAGS
  quick = f['quick'].value
  try:
    settings = select(grid(f['groups'].value, quick=quick), f['settings'].value)
    seeds = [int(s) for s in (f['seeds'].value or (['0', '1'] if quick else ['0', '1', '2']))]
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  steps = f['steps'].value or (QUICK_STEPS if quick else DEFAULT_STEPS)
  num_samples = f['num_samples'].value or (QUICK_SAMPLES if quick else DEFAULT_SAMPLES)
  workdir = f['workdir'].value or ('workdirs/objective_study_quick' if quick
                                   else 'workdirs/objective_study')
  record_dir = f['record_dir'].value
  if record_dir is None:  # The committed records hold the default budget's runs only.
    default_budget = (not quick and steps == DEFAULT_STEPS and num_samples == DEFAULT_SAMPLES
                      and f['probe_steps'].value == 2000)
    record_dir = os.path.join(ROOT, DEFAULT_RECORDS) if default_budget else ''
  if f['list'].value:
    steps_of = plan(settings, steps, seed=seeds[0], num_samples=num_samples, workdir=workdir)
    rows = grid_status(settings, seeds, steps_of, workdir=workdir, record_dir=record_dir or None)
    print(format_status(rows, {s.name: f'{",".join(s.groups)}: {s.describe()}'
                               for s in settings}))
    print(f'{len(settings)} settings x {len(seeds)} seeds, {steps} steps per 1x setting; '
          f'records: {record_dir or "none"}; workdir: {workdir}')
    return
  from heptapod_jax import console
  console.setup(workdir)
  logging.get_absl_handler().addFilter(ablation._quiet_orbax_read_only)
  # --report_only compiles nothing worth keeping.
  cache = ('' if f['report_only'].value
           else use_compilation_cache(f['compilation_cache'].value, workdir))
  tally = CacheTally()
  tf = console.import_tensorflow()
  tf.config.set_visible_devices([], 'GPU')
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  t0 = time.time()
  out = run_study(settings, seeds=seeds, steps=steps, num_samples=num_samples, workdir=workdir,
                  probe_steps=f['probe_steps'].value, log=lambda m: print(m, flush=True),
                  train=not f['report_only'].value, record_dir=record_dir or None)
  print(f'\nObjective study: {len(out["settings"])} settings x {len(seeds)} seeds, {steps} steps per 1x '
        f'setting, batch 32, {num_samples} samples per run; {(time.time() - t0) / 60:.1f} min.\n'
        'mean ± standard deviation over seeds. NLL / acc: held-out nats per token / next-token '
        'accuracy (raster order, what sampling uses); NLL d=k: held-out NLL of the targets k '
        'ahead; MSE: held-out diffusion loss (continuous tokens); T*: the temperature picked on the '
        'held-out split; FID..cls acc: samples in the feature-net space vs the train split; '
        'probe: linear '
        'probe top-1 on the final backbone layer.\n', flush=True)
  print(out['table'], flush=True)
  print(format_run_seconds(out['run_seconds']) + '\n', flush=True)
  if cache:
    print(tally.line(cache) + '\n', flush=True)
  print(f'Results: {os.path.join(os.path.abspath(workdir), "results.json")} (and results.md, '
        'nll_by_distance*.svg, fid_by_temperature_*.svg)', flush=True)


if __name__ == '__main__':
  from heptapod_jax import console as _console
  _console.quiet_dependencies()  # Before TensorFlow or JAX load: their start-up notices.
  from absl import app as _app
  _FLAGS.update(_define_flags())
  _app.run(main)
