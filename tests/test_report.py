"""The run's summary page and the README figures (report.py, tools/readme_figures.py)."""
from __future__ import annotations

import base64
import io
import os
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from clu import metric_writers
from PIL import Image

from heptapod_jax import images, report
from heptapod_jax.tools import readme_figures


def _write_events(workdir: str, points: dict[str, list[tuple[int, float]]]) -> None:
  """One clu writer session (as the trainer writes them): one events file."""
  writer = metric_writers.create_default_writer(workdir, asynchronous=False)
  steps = sorted({s for pts in points.values() for s, _ in pts})
  for step in steps:
    writer.write_scalars(step, {tag: v for tag, pts in points.items() for s, v in pts if s == step})
  writer.flush()
  writer.close()


def test_read_scalars_merges_resumed_segments(tmp_path):
  workdir = str(tmp_path)
  _write_events(workdir, {'train/loss': [(10, 3.0), (20, 2.5), (30, 9.0)]})
  # A resumed run repeats step 30 (after the step-20 checkpoint) with another value.
  import time
  time.sleep(1.1)  # The events file name carries the second it was created.
  _write_events(workdir, {'train/loss': [(30, 2.0), (40, 1.5)], 'eval/nll': [(40, 1.75)]})
  scalars = report.read_scalars(workdir)
  assert [s for s, _ in scalars['train/loss']] == [10, 20, 30, 40]
  np.testing.assert_allclose([v for _, v in scalars['train/loss']], [3.0, 2.5, 2.0, 1.5])
  assert scalars['eval/nll'] == [(40, pytest.approx(1.75))]


def _polyline_points(svg: str) -> list[np.ndarray]:
  root = ET.fromstring(svg)
  lines = [el for el in root.iter() if el.tag.endswith('polyline')]
  return [np.array([[float(v) for v in p.split(',')] for p in el.get('points').split()])
          for el in lines]


def test_svg_line_plot_maps_values_monotonically():
  series = {'a': [(0, 1.0), (5, 3.0), (10, 2.0)], 'b': [(0, 0.5), (10, 4.0)]}
  svg = report.svg_line_plot(series, title='t <&>', xlabel='x', ylabel='y')
  lines = _polyline_points(svg)  # Also: well-formed XML, the title escaped.
  assert len(lines) == 2
  a, b = lines
  # x grows to the right; a larger value is drawn higher (smaller SVG y).
  assert a[0, 0] < a[1, 0] < a[2, 0]
  assert a[1, 1] < a[2, 1] < a[0, 1]
  assert b[1, 1] < a[1, 1] and b[0, 1] > a[0, 1]  # 4.0 is the top, 0.5 the bottom.
  assert a[0, 0] == pytest.approx(b[0, 0]) and a[2, 0] == pytest.approx(b[1, 0])
  with pytest.raises(ValueError, match='no finite points'):
    report.svg_line_plot({'a': [(0, float('nan'))]}, title='empty', xlabel='x', ylabel='y')


def _embedded_images(page: str) -> list[np.ndarray]:
  data = re.findall(r'data:image/png;base64,([A-Za-z0-9+/=]+)', page)
  return [np.asarray(Image.open(io.BytesIO(base64.b64decode(d)))) for d in data]


def test_run_page_embeds_the_runs_pictures_and_metrics(tmp_path):
  workdir, tok = str(tmp_path / 'run'), str(tmp_path / 'tok')
  rng = np.random.default_rng(0)
  samples = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
  recon = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
  images.save_png(samples, os.path.join(workdir, 'samples', 'step_0000100.png'))
  images.save_png(recon, os.path.join(tok, 'reconstructions', 'step_0000050.png'))
  _write_events(workdir, {'train/loss': [(50, 2.0), (100, 1.0)], 'eval/nll': [(100, 1.25)],
                          'generative/fid': [(50, 40.0), (100, 20.0)]})
  summary = {'step': 100, 'eval': {'nll': 1.25, 'accuracy': 0.5, 'bits_per_token': 1.8},
             'generative': {'fid': 20.0, 'class_accuracy': 0.9},
             'generative_real': {'real': {'fid': 30.0, 'class_accuracy': 0.95}},
             'train': {'loss': 1.0, 'steps_per_sec': 3.0}, 'samples': []}
  path = report.write_run_page(workdir, summary, title='a run', tokenizer_workdir=tok)
  assert path == os.path.join(workdir, 'summary.html')
  page = open(path, encoding='utf-8').read()
  pictures = _embedded_images(page)
  assert len(pictures) == 2  # The samples and the reconstructions (no reference grid here).
  np.testing.assert_array_equal(pictures[0], samples)
  np.testing.assert_array_equal(pictures[1], recon)
  assert page.count('<svg') == 2  # Loss curve, FID over steps.
  for value in ('1.25', '20', '30', '0.95', 'a run', 'held-out real images'):
    assert f'>{value}<' in page
  assert 'http' not in page.replace('http://www.w3.org/2000/svg', '')  # Nothing fetched.


def test_readme_figures_from_runs(tmp_path):
  demo, ablation, out = str(tmp_path / 'demo'), str(tmp_path / 'abl'), str(tmp_path / 'fig')
  grid = np.full((10, 12, 3), 7, np.uint8)
  images.save_png(grid, os.path.join(demo, 'samples', 'step_0000200.png'))
  images.save_png(grid + 1, os.path.join(demo, 'samples', 'step_0000100.png'))
  _write_events(demo, {'train/loss': [(100, 2.0), (200, 1.5)]})
  _write_events(os.path.join(ablation, 'global'),
                {'train/nll_ahead_1': [(10, 9.0), (20, 1.5)], 'train/nll_ahead_2_4': [(20, 2.0)],
                 'train/nll_ahead_5_16': [(20, 2.5)], 'train/nll_ahead_17_plus': [(20, 3.0)]})
  _write_events(os.path.join(ablation, 'next_token'), {'train/nll': [(30, 1.2)]})
  import json
  with open(os.path.join(ablation, 'results.json'), 'w') as f:
    json.dump({'settings': {'budget': 'flops'},
               'runs': [{'head': 'next_token', 'steps': 30}, {'head': 'global', 'steps': 20}]}, f)
  written = readme_figures.write_figures(demo, None, ablation, out)
  names = sorted(os.path.basename(p) for p in written)
  assert names == ['ablation_nll_by_distance.svg', 'demo_loss.svg', 'demo_samples.png']
  np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(out, 'demo_samples.png'))),
                                grid)  # The latest step's grid, pixel for pixel.
  svg = open(os.path.join(out, 'ablation_nll_by_distance.svg')).read()
  lines = _polyline_points(svg)
  assert len(lines) == 1 and len(lines[0]) == 4  # global: 4 buckets; next_token: one marker.
  assert np.all(np.diff(lines[0][:, 1]) < 0)  # NLL grows with the distance: drawn higher.
  series = readme_figures.distance_series(
      [{'head': 'global', 'steps': 20}],
      lambda run: report.read_scalars(os.path.join(ablation, run['head'])))
  assert series == {'global (20 steps)': [(0, 1.5), (1, 2.0), (2, 2.5), (3, 3.0)]}

  # The objective study's per-group plots are copied as they are; its other files are not.
  study = tmp_path / 'study'
  study.mkdir()
  (study / 'nll_by_distance_heads.svg').write_text('<svg>heads</svg>\n')
  (study / 'fid_by_temperature_kl_heads.svg').write_text('<svg>kl</svg>\n')
  (study / 'nll_by_distance.svg').write_text('<svg>all</svg>\n')
  (study / 'results.md').write_text('| table |\n')
  written = readme_figures.write_figures(demo, None, ablation, out, str(study))
  assert sorted(os.path.basename(p) for p in written) == [
      'ablation_nll_by_distance.svg', 'demo_loss.svg', 'demo_samples.png',
      'study_fid_by_temperature_kl_heads.svg', 'study_nll_by_distance_heads.svg']
  assert open(os.path.join(out, 'study_nll_by_distance_heads.svg')).read() == '<svg>heads</svg>\n'
