"""benchmarks/objective_study.py end to end on a tiny grid (2 settings x 2 seeds, a few steps):
a study interrupted after its first run and rerun gives the same results as an uninterrupted
one, every number of the markdown table is the JSON's, and the grid is what the docstring says.

The loss-weighting options the study compares are checked against a brute-force computation in
tests/test_loss_weighting.py."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

# The tiny model and data of the small ablation (the study runs through its run_head).
from test_ablation_small import _tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script():
  spec = importlib.util.spec_from_file_location(
      'objective_study', os.path.join(ROOT, 'benchmarks', 'objective_study.py'))
  module = importlib.util.module_from_spec(spec)
  sys.modules['objective_study'] = module  # Its dataclasses look their module up.
  spec.loader.exec_module(module)
  return module


class Interrupt(Exception):
  pass


def test_grid_merges_shared_settings_and_checks_groups():
  study = _load_script()
  settings = study.grid()
  names = [s.name for s in settings]
  assert len(names) == len(set(names))
  by_name = {s.name: s for s in settings}
  assert set(by_name['global'].groups) == {'heads', 'density', 'visible', 'weighting', 'tokens',
                                           'conditioning'}
  assert by_name['next_token@flops'].steps == 'flops'
  assert dict(by_name['global/steps+next1'].fields) == {'loss_weighting': 'steps',
                                                        'next_weight': 1.0}
  # Every group of the issue has its contrast, with 3 seeds by default.
  assert {w for s in settings for k, w in s.fields if k == 'window'} == {4, 16, 32}
  assert {k for s in settings for k, _ in s.fields} >= {
      'targets_per_step', 'window', 'visible_context', 'loss_weighting', 'next_weight',
      'condition', 'direct_next'}
  assert len(study.grid(quick=True)) < len(settings)
  with pytest.raises(ValueError, match='not among'):
    study.grid(['heads', 'colour'])


def test_settings_are_selected_by_name_in_the_grids_order():
  study = _load_script()
  density = study.grid(['density'])
  assert [s.name for s in study.select(density, ['local/tps1', 'global/tps1'])] == [
      'global/tps1', 'local/tps1']
  assert study.select(density, None) == density
  with pytest.raises(ValueError, match=r"\['local/w4'\] are not in the grid"):
    study.select(density, ['global/tps1', 'local/w4'])


def test_list_says_which_runs_are_recorded_finished_or_left_with_their_time(tmp_path):
  """--list's status: a record counts as done, a finished run in the workdir too, the rest is
  left, and its time comes from the records' pace (same head and tokens, else same tokens)."""
  study = _load_script()
  settings = study.select(study.grid(['heads', 'tokens']),
                          ['global', 'local', 'global@3x', 'global/kl'])
  records, workdir = str(tmp_path / 'records'), str(tmp_path / 'work')

  def record(name, seed, head, tokenizer, steps, train_seconds):
    path = study.record_path(records, name, seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
      json.dump(dict(settings=dict(setting=name, head=head, tokenizer=tokenizer), steps=steps,
                     train_seconds=train_seconds, sample_seconds=10.0, probe_seconds=20.0,
                     heldout_seconds=30.0), f)

  record('global', 0, 'global', 'vq', 600, 300.0)   # 0.5 s per step
  record('global', 1, 'global', 'vq', 600, 420.0)   # 0.7
  record('global', 2, 'global', 'vq', 600, 360.0)   # 0.6: the median
  record('local', 0, 'local', 'vq', 600, 120.0)     # 0.2
  finished = os.path.join(workdir, 'runs', 'local', 'seed1', study.RESULT_FILE)
  os.makedirs(os.path.dirname(finished))
  open(finished, 'w').close()
  steps_of = {'global': 600, 'local': 600, 'global@3x': 1800, 'global/kl': 600}
  rows = {r['setting']: r for r in study.grid_status(settings, (0, 1, 2), steps_of,
                                                     workdir=workdir, record_dir=records)}
  assert (rows['global']['recorded'], rows['global']['missing']) == ([0, 1, 2], [])
  assert rows['global']['minutes'] == 0
  assert (rows['local']['recorded'], rows['local']['finished'], rows['local']['missing']) == (
      [0], [1], [2])
  assert rows['local']['minutes'] == pytest.approx((0.2 * 600 + 60) / 60)
  # No record of global@3x: the global head's pace, its own steps.
  assert rows['global@3x']['missing'] == [0, 1, 2]
  assert rows['global@3x']['minutes'] == pytest.approx(3 * (0.6 * 1800 + 60) / 60)
  assert rows['global/kl']['minutes'] is None  # No KL-token record gives a pace.
  text = study.format_status(list(rows.values()), {s.name: s.describe() for s in settings})
  assert text.splitlines()[-1] == ('5 of 12 runs done (4 recorded); 7 to run: about 1.0 hours '
                                   'on one core at the recorded pace; 1 settings with no pace '
                                   'on record.')
  assert re.search(r'^local\s+600\s+0\s+1\s+2\s+3\s', text, re.M)
  # Without records, everything not finished in the workdir is left.
  rows = study.grid_status(settings, (0,), steps_of, workdir=workdir, record_dir=None)
  assert [r['missing'] for r in rows] == [[0], [0], [0], [0]]


@pytest.mark.slow
def test_tiny_study_resumes_after_an_interruption_with_the_same_results(tmp_path):
  study = _load_script()
  configure = _tiny(str(tmp_path / 'tfds'))
  settings = [study.Setting('global', 'global', tokenizer='pixel', groups=('weighting',)),
              study.Setting('global/next1', 'global', (('next_weight', 1.0),), tokenizer='pixel',
                            groups=('weighting',))]
  kwargs = dict(seeds=(0, 1), steps=3, num_samples=10, probe_steps=10, configure=configure)

  # The reference: the first setting (the one interrupted between its seeds) run straight
  # through; the second setting's runs are all made after the interruption.
  uninterrupted = study.run_study(settings[:1], workdir=str(tmp_path / 'a'), log=lambda m: None,
                                  **kwargs)

  def die_after_first(message):
    if message.startswith('[1/4]'):
      raise Interrupt(message)

  workdir, records = str(tmp_path / 'b'), str(tmp_path / 'records')
  with pytest.raises(Interrupt):
    study.run_study(settings, workdir=workdir, log=die_after_first, record_dir=records, **kwargs)
  first = os.path.join(workdir, 'runs', 'global', 'seed0', study.RESULT_FILE)
  assert os.path.exists(first)
  assert not os.path.exists(os.path.join(workdir, 'runs', 'global', 'seed1', study.RESULT_FILE))
  stamp = os.stat(first).st_mtime_ns
  lines = []
  resumed = study.run_study(settings, workdir=workdir, log=lines.append, record_dir=records,
                            **kwargs)
  assert os.stat(first).st_mtime_ns == stamp  # Read back, not run again.
  assert sum('training' in line for line in lines) == 3

  row = next(line for line in uninterrupted['table'].splitlines() if line.startswith('| global '))
  assert row in resumed['table'].splitlines()
  assert json.loads(json.dumps(resumed['summary']['global'])) == json.loads(
      json.dumps(uninterrupted['summary']['global']))
  for a, b in zip(resumed['runs']['global'], uninterrupted['runs']['global'], strict=True):
    assert a['eval'] == b['eval'] and a['generative'] == b['generative']
    assert a['heldout_by_distance'] == b['heldout_by_distance']

  # The numbers: each run has them, and the next_weight run differs from the plain one.
  for name, runs in resumed['runs'].items():
    assert [r['seed'] for r in runs] == [0, 1]
    for r in runs:
      d = r['heldout_by_distance']
      assert d['nll_ahead_1'] > 0 and d['nll_ahead_17_plus'] > 0
      assert r['steps'] == 3 and 0 <= r['probe_final_top1'] <= 1
  assert resumed['runs']['global'][0]['eval'] != resumed['runs']['global/next1'][0]['eval']

  # The markdown table's numbers are the JSON's: mean ± std over the two seeds.
  table = open(os.path.join(workdir, 'results.md')).read()
  assert table == resumed['table']
  header = next(line for line in table.splitlines() if line.startswith('| setting'))
  labels = [c.strip() for c in header.strip('|').split('|')]
  rows = [line for line in table.splitlines() if line.startswith('| global')]
  assert len(rows) == 2
  label_to_key = {label: (key, spec) for key, label, spec, _ in study.METRICS}
  for row in rows:
    cells = [c.strip() for c in row.strip('|').split('|')]
    name = cells[0].split(' (')[0]
    assert cells[2] == '2'
    for label, cell in zip(labels[3:], cells[3:]):
      key, spec = label_to_key[label]
      stat = resumed['summary'][name][key]
      mean, std = re.fullmatch(r'(\S+) ± (\S+)', cell).groups()
      assert mean == f'{stat["mean"]:{spec}}' and std == f'{stat["std"]:{spec}}'
      values = [study._get(r, dict((m[0], m[3]) for m in study.METRICS)[key])
                for r in resumed['runs'][name]]
      assert stat['mean'] == pytest.approx(sum(values) / 2)
  assert os.path.exists(os.path.join(workdir, 'nll_by_distance.svg'))
  weighting = open(os.path.join(workdir, 'nll_by_distance_weighting.svg')).read()
  assert weighting.count('<polyline') == 2 and 'global/next1' in weighting

  # --report_only trains nothing: the finished runs' tables; a setting never run is left out.
  never = study.Setting('global/steps', 'global', (('loss_weighting', 'steps'),),
                        tokenizer='pixel', groups=('weighting',))
  lines = []
  reported = study.run_study(settings + [never], workdir=workdir, log=lines.append, train=False,
                             **kwargs)
  assert not any('training' in line for line in lines)
  assert '[5/6] global/steps seed 0: not run' in lines
  assert reported['table'] == resumed['table']
  assert [s['name'] for s in reported['settings']] == ['global', 'global/next1']

  # The records: every finished run, with where it was made; a new workdir (another machine)
  # trains nothing and reports the same tables from them alone, and with --report_only too.
  record = json.load(open(os.path.join(records, 'global_next1', 'seed1.json')))
  assert record['eval'] == resumed['runs']['global/next1'][1]['eval']
  assert record['settings']['seed'] == 1 and 'samples_npz' not in record
  assert set(record['provenance']) >= {'commit', 'cpu', 'jax', 'utc'}
  assert resumed['table'].endswith(f'Runs: 4 on {record["provenance"]["cpu"]} '
                                   f'({record["provenance"]["cores"]} cores); code at '
                                   f'{record["provenance"]["commit"]}.\n')
  # What the runs took, summed from their own timings.
  finished = [r for results in resumed['runs'].values() for r in results]
  train = sum(r['train_seconds'] for r in finished)
  after = sum(r['sample_seconds'] + r['probe_seconds'] + r['heldout_seconds'] for r in finished)
  assert resumed['run_seconds'] == pytest.approx(dict(train=train, after=after,
                                                      total=train + after))
  assert study.format_run_seconds(resumed['run_seconds']) == (
      f'Run time: {(train + after) / 60:.1f} min run after run ({train / 60:.1f} min training, '
      f'{after / 60:.1f} min sampling, probe and held-out pass).')
  for train in (True, False):
    lines = []
    elsewhere = study.run_study(settings, workdir=str(tmp_path / f'c{train}'), log=lines.append,
                                record_dir=records, train=train, **kwargs)
    assert not any('training' in line for line in lines)
    assert elsewhere['table'] == resumed['table']
  # A record made with other settings is refused, naming its file.
  with pytest.raises(ValueError, match=r'global.seed0\.json records a run with other'):
    study.run_study(settings, workdir=str(tmp_path / 'd'), log=lambda m: None, record_dir=records,
                    **dict(kwargs, steps=4))

  # A setting whose fields changed is refused, naming the difference.
  changed = [study.Setting('global', 'global', (('next_weight', 2.0),), tokenizer='pixel',
                           groups=('weighting',))]
  with pytest.raises(ValueError, match='other settings'):
    study.run_study(changed, workdir=workdir, log=lambda m: None, **kwargs)


def _stat(values):
  import numpy as np
  return dict(mean=float(np.mean(values)), std=float(np.std(values, ddof=1)), n=len(values))


def test_a_difference_under_two_pooled_standard_deviations_is_inconclusive():
  study = _load_script()
  summary = {'a': {'nll': _stat([1.0, 1.1, 1.2])},       # mean 1.1, sd 0.1
             'b': {'nll': _stat([1.25, 1.35, 1.45])},    # mean 1.35, sd 0.1: 0.25 > 2 x 0.1
             'c': {'nll': _stat([1.15, 1.25, 1.35])},    # mean 1.25: 0.15 < 0.2
             'one': {'nll': dict(mean=1.0, std=None, n=1)}}
  ahead = study.compare(summary, 'a', 'b', 'nll')
  assert ahead['verdict'] == 'yes' and ahead['diff'] == pytest.approx(0.25)
  assert ahead['spread'] == pytest.approx(0.1)
  assert study.compare(summary, 'b', 'a', 'nll')['verdict'] == 'no'
  assert study.compare(summary, 'a', 'c', 'nll')['verdict'] == 'inconclusive'
  assert study.compare(summary, 'a', 'one', 'nll')['verdict'] == 'inconclusive'
  assert study.compare(summary, 'a', 'missing', 'nll')['verdict'] == 'not run'
  # Higher is better for accuracies.
  acc = {'a': {'probe': _stat([0.9, 0.91, 0.92])}, 'b': {'probe': _stat([0.8, 0.81, 0.82])}}
  assert study.compare(acc, 'a', 'b', 'probe')['verdict'] == 'yes'


def test_a_gap_compares_two_leads_by_the_same_rule():
  """Gap: a's deficit to b against c's to d, each lead's sd that of a difference."""
  study = _load_script()
  sd1 = _stat([1.0, 1.1, 1.2])  # sd 0.1 (every setting here: a lead's sd is sqrt(2) x 0.1)
  shifted = lambda x: _stat([1.0 + x, 1.1 + x, 1.2 + x])
  summary = {'a': {'fid': shifted(1.0)}, 'b': {'fid': sd1},   # a trails b by 1.0
             'c': {'fid': shifted(1.5)}, 'd': {'fid': sd1},   # c trails d by 1.5
             'e': {'fid': shifted(1.2)}, 'one': {'fid': dict(mean=1.0, std=None, n=1)}}
  found = study.compare_gap(summary, study.Gap(('a', 'b'), ('c', 'd'), 'fid'))
  # Independently: diff of the leads 0.5; each lead's sd sqrt(0.1^2 + 0.1^2), the two pooled:
  # sqrt((0.02 + 0.02) / 2) = 0.1414.
  assert found['diff'] == pytest.approx(0.5) and found['spread'] == pytest.approx(0.02 ** 0.5)
  assert found['verdict'] == 'yes'
  assert study.compare_gap(summary, study.Gap(('c', 'd'), ('a', 'b'), 'fid'))['verdict'] == 'no'
  assert study.compare_gap(summary, study.Gap(('a', 'b'), ('e', 'd'), 'fid'))['verdict'] == (
      'inconclusive')  # 0.2 < 2 x 0.1414
  assert study.compare_gap(summary, study.Gap(('a', 'one'), ('c', 'd'), 'fid'))['verdict'] == (
      'inconclusive')
  assert study.compare_gap(summary, study.Gap(('a', 'b'), ('c', 'x'), 'fid'))['verdict'] == (
      'not run')
  # The study's claim, on the searched settings, and its line in the table.
  names = dict(a='global/kl/best_t', b='next_token/kl/best_t', c='global/best_t',
               d='next_token/best_t')
  rows = study.verdicts({names[k]: v for k, v in summary.items() if k in names})
  row = next(r for r in rows if r['claim'].startswith("the global head's FID deficit"))
  assert row['verdict'] == 'reproduced'
  table = study.markdown_verdicts([row])
  assert ('(global/kl/best_t vs next_token/kl/best_t) vs (global/best_t vs next_token/best_t), '
          'fid: ahead by 0.500 (2 sd = 0.283)') in table


def test_claims_combine_their_contrasts():
  study = _load_script()
  good, bad, same = _stat([1.0, 1.01, 1.02]), _stat([2.0, 2.01, 2.02]), _stat([1.0, 1.02, 1.01])
  summary = {name: {'nll': good, 'fid': good} for name in ('global', 'local/w32')}
  summary.update({name: {'nll': bad, 'fid': bad} for name in ('local', 'local@flops',
                                                              'local/w4', 'global/tps1')})
  summary['local/tps1'] = {'nll': same, 'fid': same}
  rows = {r['claim']: r['verdict'] for r in study.verdicts(summary)}
  assert rows['the global head beats the local one'] == 'reproduced'
  assert rows['a larger local window is better'] == 'reproduced'
  assert rows['denser supervision helps the global head'] == 'reproduced'
  # 'local' (bad) vs 'local/tps1' (same as good): a clear difference, so "little" is refuted.
  assert rows['... but little the local one (no clear gain from all 8 targets over 1)'] == (
      'not reproduced')
  assert rows['VQ tokens learn faster early'] == 'not run'
  summary['local/tps1'] = {'nll': bad, 'fid': bad}
  rows = {r['claim']: r['verdict'] for r in study.verdicts(summary)}
  assert rows['... but little the local one (no clear gain from all 8 targets over 1)'] == (
      'reproduced')
  summary['local/w32'] = {'nll': bad, 'fid': good}
  rows = {r['claim']: r['verdict'] for r in study.verdicts(summary)}
  assert rows['a larger local window is better'] == 'inconclusive'
  table = study.markdown_verdicts(study.verdicts(summary))
  assert '| a larger local window is better |' in table and 'ahead by 0.000' in table


def test_two_commands_train_a_shared_tokenizer_once(tmp_path, monkeypatch):
  """Two study commands on one workdir (one per core) both need the tokenizer: the first
  trains it under the lock, the second waits and uses it instead of training it beside."""
  import threading
  import time
  from heptapod_jax.training import train_tokenizer
  study = _load_script()
  calls, inside = [], []

  def fake_train(config, workdir):
    inside.append(1)
    assert len(inside) == 1, 'two trainings at once'
    calls.append(workdir)
    time.sleep(0.5)
    os.makedirs(os.path.join(workdir, 'tokenizer'))
    inside.pop()

  monkeypatch.setattr(train_tokenizer, 'train_and_evaluate', fake_train)
  threads = [threading.Thread(target=study.ensure_tokenizer, args=(str(tmp_path), 'vq'),
                              kwargs=dict(log=lambda m: None)) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert calls == [os.path.join(str(tmp_path), 'tokenizers', 'vq')]
  study.ensure_tokenizer(str(tmp_path), 'vq', log=lambda m: None)
  assert len(calls) == 1


def test_compilation_cache_holds_the_programs_and_is_off_when_asked(tmp_path):
  # In fresh processes (JAX sets its cache up once per process): by default the programs go to
  # <workdir>/jax_cache/<cpu>, and the next process reads them back (cache hits) with the same
  # numbers; '' turns it off.
  code = f"""
import importlib.util, sys, jax, jax.numpy as jnp, numpy as np
spec = importlib.util.spec_from_file_location(
    'objective_study', {os.path.join(ROOT, 'benchmarks', 'objective_study.py')!r})
study = importlib.util.module_from_spec(spec)
sys.modules['objective_study'] = study
spec.loader.exec_module(study)
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name == '/jax/compilation_cache/cache_hits' else None)
tally = study.CacheTally()
flag = None if sys.argv[1] == 'default' else sys.argv[1]
print('DIR', study.use_compilation_cache(flag, sys.argv[2]))
x = jnp.arange(12.0).reshape(3, 4)
print('OUT', np.asarray(jax.jit(lambda a: jnp.tanh(a @ a.T / 100).sum())(x)).tolist())
assert tally.hits == len(hits), (tally.hits, hits)
print('HITS', len(hits))
"""
  # The study's own settings, not the suite's (conftest sets both for the tests).
  env = {k: v for k, v in os.environ.items() if k not in (
      'JAX_COMPILATION_CACHE_DIR', 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS')}
  env['JAX_PLATFORMS'] = 'cpu'

  def run(flag, workdir):
    out = subprocess.run([sys.executable, '-c', code, flag, str(workdir)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split(' ', 1) for line in out.stdout.splitlines() if ' ' in line)
    return lines['DIR'], lines['OUT'], int(lines['HITS'])

  where, first, hits = run('default', tmp_path / 'w')
  from heptapod_jax import console
  # One folder per processor: JAX's key leaves the CPU out.
  assert where == str(tmp_path / 'w' / 'jax_cache' / console.host_cpu_fingerprint())
  assert hits == 0
  assert os.listdir(where)  # The programs were written.
  again, second, hits = run('default', tmp_path / 'w')
  assert (again, second) == (where, first) and hits >= 1  # Read back, same numbers.
  off, third, hits = run('', tmp_path / 'off')
  assert (off, third, hits) == ('', first, 0)
  assert not os.path.exists(tmp_path / 'off')


def test_the_temperature_pick_is_the_argmin_of_the_curve():
  study = _load_script()
  curve = [dict(temperature=0.8, fid=12.0), dict(temperature=0.9, fid=9.5),
           dict(temperature=1.0, fid=float('nan')), dict(temperature=1.1, fid=9.5)]
  assert study.pick_temperature(curve) == 0.9  # The lowest finite FID; the first of equals.
  assert study.pick_temperature([dict(temperature=1.1, fid=3.0)] + curve) == 1.1
  with pytest.raises(ValueError, match='no finite FID'):
    study.pick_temperature([dict(temperature=1.0, fid=float('nan')), dict(temperature=0.9)])


def test_searched_groups_sample_at_their_best_temperature_and_kl_flops_follow_kl_global():
  study = _load_script()
  settings = study.grid(['temperature', 'kl_heads'])
  assert all(s.temperatures == study.TEMPERATURES == (0.8, 0.9, 1.0, 1.1) for s in settings)
  assert all(s.num_samples >= 1000 and s.name.endswith('/best_t') for s in settings)
  kl = [s for s in settings if 'kl_heads' in s.groups]
  assert {s.head for s in kl} == {'global', 'local', 'next_token'}
  assert all(s.tokenizer == 'kl' for s in kl)
  assert sorted(str(s.steps) for s in kl if s.head == 'next_token') == ['1.0', '3.0', 'flops']
  # Equal FLOPs on KL tokens: the KL global head's FLOPs (its diffusion MLP included).
  steps_of = study.plan(settings, 600, seed=0, num_samples=10, workdir='unused')
  flops = lambda s: study.ablation.train_flops(study.run_config(
      s, steps=1, seed=0, num_samples=10, workdir='unused', resolve_tokenizer=False))
  by_name = {s.name: s for s in settings}
  for name, reference in (('next_token/kl@flops/best_t', study.Setting('g', 'global', tokenizer='kl')),
                          ('local@flops/best_t', study.Setting('g', 'global'))):
    assert steps_of[name] == round(600 * flops(reference) / flops(by_name[name]))
  assert flops(study.Setting('g', 'global', tokenizer='kl')) != flops(study.Setting('g', 'global'))
  # The search's samples count, as the records' settings say.
  config = study.run_config(by_name['global/kl/best_t'], steps=1, seed=0, num_samples=10,
                            workdir='unused', resolve_tokenizer=False)
  assert config.sample.num_samples == 1000
  assert study.temperature_field(config) == 'model.diffusion.temperature'
  config = study.run_config(by_name['global/best_t'], steps=1, seed=0, num_samples=10,
                            workdir='unused', resolve_tokenizer=False)
  assert study.temperature_field(config) == 'sampling.temperature'


def test_temperature_search_picks_on_one_split_and_reports_on_the_other(tmp_path):
  """A tiny searched run: the curve is measured on the held-out split with its own draws, the
  pick is its argmin, and the reported metrics equal a fresh sampling of the checkpoint at the
  picked temperature against the train split with the run's own seed; records round-trip."""
  from heptapod_jax.sampling import sample_mode
  study = _load_script()
  configure = _tiny(str(tmp_path / 'tfds'))
  setting = study.Setting('global/best_t', 'global', tokenizer='pixel', groups=('temperature',),
                          temperatures=(0.25, 1.0), num_samples=20)
  workdir, records = str(tmp_path / 'w'), str(tmp_path / 'records')
  kwargs = dict(seeds=(0,), steps=3, num_samples=10, probe_steps=10, configure=configure)
  lines = []
  out = study.run_study([setting], workdir=workdir, log=lines.append, record_dir=records,
                        **kwargs)
  run = out['runs']['global/best_t'][0]
  search = run['temperature_search']
  assert [p['temperature'] for p in search['curve']] == [0.25, 1.0]
  fids = [p['fid'] for p in search['curve']]
  assert fids[0] != fids[1]
  assert search['pick'] == [0.25, 1.0][int(np.argmin(fids))]
  assert search['pick_split'] != search['report_split'] == 'train'
  assert search['pick_seed'] != search['report_seed'] == 0
  assert search['field'] == 'sampling.temperature' and search['num_samples'] == 20
  assert any(line.startswith('[global/best_t seed 0] best temperature') for line in lines)

  # Independent recomputation from the checkpoint: one point of the curve, and the report.
  run_dir = study.run_directory(workdir, 'global/best_t', 0)

  def sampled(temperature, seed, split, name):
    c = study.run_config(setting, steps=3, seed=0, num_samples=10, workdir=workdir,
                         configure=configure)
    c.sampling.temperature = temperature
    c.sample.seed, c.evaluator.reference_split = seed, split
    c.sample.out_dir = str(tmp_path / name)
    return sample_mode.sample_and_evaluate(c, run_dir)['metrics']

  again = sampled(0.25, search['pick_seed'], search['pick_split'], 'pick')
  assert again['fid'] == pytest.approx(search['curve'][0]['fid'], rel=1e-6)
  report = sampled(search['pick'], 0, 'train', 'report')
  for key in ('fid', 'precision', 'recall', 'class_accuracy'):
    assert run['generative'][key] == pytest.approx(report[key], rel=1e-6), key
  # At temperature 1 the run's own samples (the config's default) are the report side's.
  default = sampled(1.0, 0, 'train', 'default')
  assert run['generative_default']['fid'] == pytest.approx(default['fid'], rel=1e-6)

  # The table reports the picked temperature and the FID measured at it; the plot is written.
  row = next(line for line in out['table'].splitlines() if line.startswith('| global/best_t'))
  assert f'| {search["pick"]:.2f} | {run["generative"]["fid"]:.2f} |' in row
  svg = open(os.path.join(workdir, 'fid_by_temperature_temperature.svg')).read()
  assert '<polyline' in svg and 'global/best_t' in svg
  # Records round-trip: another workdir reads the search back, trains and samples nothing.
  lines = []
  elsewhere = study.run_study([setting], workdir=str(tmp_path / 'other'), log=lines.append,
                              record_dir=records, **kwargs)
  assert not any('training' in line for line in lines)
  assert elsewhere['table'] == out['table']
  assert elsewhere['runs']['global/best_t'][0]['temperature_search'] == search
