"""The pictures of README.md and docs/ (docs/figures/), regenerated from a demo run and a small-ablation run.

  python -m heptapod_jax.tools.readme_figures --demo=workdirs/demo \\
      --ablation=workdirs/ablation_small --study=workdirs/objective_study --out=docs/figures

Writes into --out (each only when its source exists; the list is printed):
  demo_samples.png          the demo's last sample grid (one column per digit)
  demo_reference.png        held-out real digits through the tokenizer, same layout
  tokenizer_reconstructions.png   the tokenizer's held-out originals over reconstructions
                                  (its workdir: --tokenizer, default <demo>/tokenizer)
  demo_loss.svg             the demo's loss curves (report.svg_line_plot)
  ablation_nll_by_distance.svg   benchmarks/ablation_small.py's results.json: training NLL
                                 by distance ahead for each head (the last logged step)
  study_nll_by_distance_<group>.svg   benchmarks/objective_study.py's per-group plots of
                                 held-out NLL by distance ahead (--study, copied as they are)

PNGs are copied through PIL with optimisation (a few tens of kB each); nothing is
resampled, so the committed pictures are the run's own pixels.
"""
from __future__ import annotations

if __name__ == '__main__':  # Before TensorFlow loads (TensorBoard's reader imports it).
  from heptapod_jax import console as _console
  _console.quiet_dependencies()
  _console.import_tensorflow()

import io  # noqa: E402
from typing import Any, Mapping, Sequence  # noqa: E402

from absl import app, flags  # noqa: E402
from PIL import Image  # noqa: E402

from heptapod_jax import report  # noqa: E402
from heptapod_jax.storage import paths  # noqa: E402

_DEMO = flags.DEFINE_string('demo', 'workdirs/demo', 'Workdir of a finished `make demo` run.')
_TOKENIZER = flags.DEFINE_string('tokenizer', None,
                                 "The tokenizer's workdir (default: <demo>/tokenizer).")
_ABLATION = flags.DEFINE_string('ablation', 'workdirs/ablation_small',
                                'Workdir of benchmarks/ablation_small.py (its results.json).')
_STUDY = flags.DEFINE_string('study', 'workdirs/objective_study',
                             'Workdir of benchmarks/objective_study.py (its per-group plots).')
_OUT = flags.DEFINE_string('out', 'docs/figures', 'Folder to write the figures into.')

# (key of the metric, x position, tick label): objective.DISTANCE_BUCKETS in order.
DISTANCES = (('nll_ahead_1', 0, '1'), ('nll_ahead_2_4', 1, '2-4'), ('nll_ahead_5_16', 2, '5-16'),
             ('nll_ahead_17_plus', 3, '17+'))


def copy_png(src: str, dst: str) -> str:
  """`src` re-saved as an optimised PNG at `dst` (same pixels)."""
  buffer = io.BytesIO()
  with Image.open(io.BytesIO(paths.read_bytes(src))) as im:
    im.save(buffer, format='PNG', optimize=True)
  paths.write_bytes(dst, buffer.getvalue())
  return dst


def last_values(scalars: Mapping[str, Sequence[tuple[int, float]]], prefix: str
                ) -> dict[str, float]:
  """{metric: value at its last logged step} for the tags `<prefix>/<metric>`."""
  return {tag[len(prefix) + 1:]: points[-1][1] for tag, points in scalars.items()
          if tag.startswith(prefix + '/') and points}


def distance_series(runs: Sequence[Mapping[str, Any]], scalars_of) -> dict[str, list]:
  """{head: [(bucket x, NLL)]} from each run's last training NLL by distance ahead.

  `scalars_of(run)` gives that run's scalars (report.read_scalars of its workdir). The
  next_token baseline only predicts distance 1, so it has one point.
  """
  series = {}
  for run in runs:
    last = last_values(scalars_of(run), 'train')
    points = [(x, last[key]) for key, x, _ in DISTANCES if key in last]
    if not points and 'nll' in last:
      points = [(0, last['nll'])]
    if points:
      series[f'{run["head"]} ({run["steps"]} steps)'] = points
  return series


def ablation_plot(ablation_dir: str) -> str | None:
  """The SVG of NLL by distance ahead per head, or None without results.json."""
  path = paths.join(ablation_dir, 'results.json')
  if not paths.exists(path):
    return None
  results = paths.read_json(path)
  series = distance_series(results['runs'],
                           lambda run: report.read_scalars(paths.join(ablation_dir, run['head'])))
  if not series:
    raise ValueError(f'{path}: its runs logged no train/nll_ahead_* scalars (in '
                     f'{ablation_dir}/<head>/events.out.tfevents.*).')
  budget = results['settings']['budget']
  return report.svg_line_plot(
      series, title=f'Training NLL by distance ahead (small ablation, equal {budget})',
      xlabel='distance ahead (1 = the next position, the one sampling uses)',
      ylabel='NLL (nats/token)', x_labels={x: label for _, x, label in DISTANCES}, markers=True)


def study_plots(study_dir: str) -> list[tuple[str, str]]:
  """(name in --out, source) of the objective study's per-group plots (NLL by distance, FID by
  temperature), sorted by group."""
  if not paths.isdir(study_dir):
    return []
  prefixes = ('nll_by_distance_', 'fid_by_temperature_')
  return [(f'study_{name}', paths.join(study_dir, name)) for name in paths.listdir(study_dir)
          if name.startswith(prefixes) and name.endswith('.svg')]


def write_figures(demo: str, tokenizer: str | None, ablation: str, out: str,
                  study: str | None = None) -> list[str]:
  """Writes every figure whose source exists; returns the paths written."""
  written = []
  tokenizer = tokenizer or paths.join(demo, 'tokenizer')
  sources = (('demo_samples.png', report.latest_file(paths.join(demo, 'samples', 'step_*.png'))),
             ('demo_reference.png', paths.join(demo, 'samples', 'reference_real_tokenized.png')),
             ('tokenizer_reconstructions.png',
              report.latest_file(paths.join(tokenizer, 'reconstructions', 'step_*.png'))))
  for name, src in sources:
    if src and paths.exists(src):
      written.append(copy_png(src, paths.join(out, name)))
  svgs = []
  scalars = report.read_scalars(demo) if paths.isdir(demo) else {}
  loss = report.loss_plot(scalars, title='make demo: loss')
  if loss:
    svgs.append(('demo_loss.svg', loss))
  plot = ablation_plot(ablation)
  if plot:
    svgs.append(('ablation_nll_by_distance.svg', plot))
  for name, src in study_plots(study) if study else ():
    svgs.append((name, paths.read_text(src).rstrip('\n')))
  for name, svg in svgs:
    path = paths.join(out, name)
    paths.write_text(path, svg + '\n')
    written.append(path)
  return written


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  written = write_figures(_DEMO.value, _TOKENIZER.value, _ABLATION.value, _OUT.value,
                          _STUDY.value)
  if not written:
    raise SystemExit(f'Nothing to draw: no demo run in {_DEMO.value} and no results.json in '
                     f'{_ABLATION.value} (run `make demo` and benchmarks/ablation_small.py first).')
  for path in written:
    print(path)


if __name__ == '__main__':
  app.run(main)
