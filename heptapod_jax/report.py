"""One page per training run that a person can open: `<workdir>/summary.html`.

    from heptapod_jax import report
    report.write_run_page('workdirs/demo', summary, title='...')   # after train_and_evaluate

The page is one self-contained file (images embedded as PNG data, plots as inline SVG, no
script, no network), so it still works when downloaded from Colab or copied off a pod. It is
built from what the run left in its workdir -- every scalar in the TensorBoard event files
(all resumed segments), the sample grids, the tokenizer's reconstructions -- plus the summary
dict the trainer returned (evaluation and generative metrics). `svg_line_plot` is also what
`tools/readme_figures.py` draws the documentation's plots with, so neither needs matplotlib.
"""
from __future__ import annotations

import base64
import html
import math
from typing import Any, Mapping, Sequence

import numpy as np

from heptapod_jax.storage import paths

Series = Sequence[tuple[float, float]]
PALETTE = ('#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#17becf')
PAGE_NAME = 'summary.html'


# ----------------------------------------------------------------------------- scalars


def read_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """Every scalar of the event files directly in `workdir`: {tag: [(step, value), ...]} by
  step. A step logged twice (a resumed run repeats the steps after its checkpoint) keeps the
  value of the newest file."""
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top

  by_tag: dict[str, dict[int, float]] = {}
  for path in paths.glob(paths.join(workdir, 'events.out.tfevents.*')):
    for event in event_file_loader.EventFileLoader(path).Load():
      for value in event.summary.value:
        kind = value.WhichOneof('value')
        if kind == 'simple_value':
          number = float(value.simple_value)
        elif kind == 'tensor' and value.metadata.plugin_data.plugin_name in ('scalars', ''):
          array = tensor_util.make_ndarray(value.tensor)
          if array.size != 1 or not np.issubdtype(array.dtype, np.number):
            continue
          number = float(array.reshape(()))
        else:
          continue
        by_tag.setdefault(value.tag, {})[int(event.step)] = number
  return {tag: sorted(points.items()) for tag, points in by_tag.items()}


# ----------------------------------------------------------------------------- plots


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
  """About `count` round tick values covering [lo, hi]."""
  if not hi > lo:
    return [lo]
  raw = (hi - lo) / max(count - 1, 1)
  magnitude = 10 ** math.floor(math.log10(raw))
  step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
  first = math.ceil(lo / step - 1e-9) * step
  ticks, t = [], first
  while t <= hi + 1e-9 * step:
    ticks.append(round(t, 12))
    t += step
  return ticks


def _tick_label(value: float) -> str:
  if value == 0:
    return '0'
  if abs(value) >= 1e4 or abs(value) < 1e-3:
    return f'{value:.0e}'
  return f'{value:g}'


def svg_line_plot(series: Mapping[str, Series], *, title: str, xlabel: str, ylabel: str,
                  width: int = 560, height: int = 300, markers: bool = False,
                  x_labels: Mapping[float, str] | None = None) -> str:
  """An SVG line plot (one line per entry of `series`, in order, with a legend).

  `x_labels` replaces the numeric x ticks by named ones ({x: label}), for categorical axes.
  Points are marked when `markers` is set or a series has at most 12 of them.
  """
  points = [(x, y) for s in series.values() for x, y in s if math.isfinite(y)]
  if not points:
    raise ValueError(f'svg_line_plot({title!r}): no finite points to draw.')
  # The legend has a band of its own above the plot (one row per series), so no line hides it.
  legend_h = 16 * len(series)
  left, right, top, bottom = 62, 16, 30 + legend_h, 44
  height += legend_h
  plot_w, plot_h = width - left - right, height - top - bottom
  xs, ys = [p[0] for p in points], [p[1] for p in points]
  x_lo, x_hi = min(xs), max(xs)
  if x_labels:
    x_lo, x_hi = min(x_lo, min(x_labels)), max(x_hi, max(x_labels))
  if x_hi == x_lo:
    x_lo, x_hi = x_lo - 1, x_hi + 1
  y_lo, y_hi = min(ys), max(ys)
  pad = 0.05 * (y_hi - y_lo) if y_hi > y_lo else max(abs(y_hi) * 0.1, 1.0)
  y_lo, y_hi = y_lo - pad, y_hi + pad
  px = lambda x: left + (x - x_lo) / (x_hi - x_lo) * plot_w
  py = lambda y: top + (1 - (y - y_lo) / (y_hi - y_lo)) * plot_h
  esc = html.escape
  out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
         f'<rect width="{width}" height="{height}" fill="white"/>',
         f'<text x="{width / 2:.1f}" y="18" text-anchor="middle" font-size="13">{esc(title)}</text>']
  for t in _nice_ticks(y_lo, y_hi):
    y = py(t)
    out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>')
    out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_tick_label(t)}</text>')
  x_ticks = x_labels or {t: _tick_label(t) for t in _nice_ticks(x_lo, x_hi)}
  for t, label in x_ticks.items():
    x = px(t)
    out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}" '
               'stroke="#333"/>')
    out.append(f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{esc(label)}</text>')
  out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
             'stroke="#333"/>')
  out.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 8}" text-anchor="middle">'
             f'{esc(xlabel)}</text>')
  out.append(f'<text transform="translate(14,{top + plot_h / 2:.1f}) rotate(-90)" '
             f'text-anchor="middle">{esc(ylabel)}</text>')
  for i, (name, s) in enumerate(series.items()):
    color = PALETTE[i % len(PALETTE)]
    pts = [(px(x), py(y)) for x, y in s if math.isfinite(y)]
    if len(pts) > 1:
      path = ' '.join(f'{x:.1f},{y:.1f}' for x, y in pts)
      out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.6"/>')
    if markers or len(pts) <= 12:
      out.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>' for x, y in pts)
    ly = 30 + 12 + 16 * i - 4
    lx = left + plot_w - 30 - 6 * max(len(n) for n in series)
    out.append(f'<line x1="{lx}" x2="{lx + 18}" y1="{ly - 4}" y2="{ly - 4}" stroke="{color}" '
               'stroke-width="2"/>')
    out.append(f'<text x="{lx + 24}" y="{ly}">{esc(name)}</text>')
  out.append('</svg>')
  return '\n'.join(out)


# ----------------------------------------------------------------------------- the page


def _png_data(path: str) -> str:
  return 'data:image/png;base64,' + base64.b64encode(paths.read_bytes(path)).decode('ascii')


def latest_file(pattern: str) -> str | None:
  """The last match of a glob in name order (step_0001000.png after step_0000500.png), or None."""
  found = paths.glob(pattern)
  return found[-1] if found else None


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    return f'{value:.4g}' if abs(value) < 1e5 else f'{value:.3e}'
  return html.escape(str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  head = ''.join(f'<th>{html.escape(h)}</th>' for h in header)
  body = ''.join('<tr>' + ''.join(f'<td>{_fmt(v)}</td>' for v in row) + '</tr>' for row in rows)
  return f'<table><tr>{head}</tr>{body}</table>'


_GENERATIVE = (('fid', 'FID'), ('precision', 'precision'), ('recall', 'recall'),
               ('class_accuracy', 'class accuracy'), ('inception_score', 'IS'), ('sfid', 'sFID'))


def _generative_table(summary: Mapping[str, Any]) -> str | None:
  gen = summary.get('generative') or {}
  real = summary.get('generative_real') or {}
  names = {'real': 'held-out real images', 'real_tokenized': 'the same through the tokenizer'}
  rows_in = [('samples', gen)] + [(names.get(name, name), m) for name, m in real.items()]
  keys = [(k, label) for k, label in _GENERATIVE if any(k in m for _, m in rows_in)]
  if not keys:
    return None
  rows = [[name] + [m.get(k, '-') for k, _ in keys] for name, m in rows_in if m]
  return _table(['images'] + [label for _, label in keys], rows)


def _eval_table(summary: Mapping[str, Any]) -> str | None:
  ev = summary.get('eval') or {}
  if not ev:
    return None
  names = {'nll': 'NLL (nats/token)', 'bits_per_token': 'bits/token',
           'accuracy': 'next-token accuracy', 'mse': 'diffusion loss'}
  rows = [[names[k], ev[k]] for k in names if k in ev]
  rows += [[f'NLL, {k[len("nll_"):].replace("_", " ")}', v] for k, v in sorted(ev.items())
           if k.startswith('nll_ahead_')]
  return _table(['held-out split', 'value'], rows)


def loss_plot(scalars: Mapping[str, Sequence[tuple[int, float]]], title: str = 'Loss') -> str | None:
  """The training loss with the next position's NLL (train and held-out) as SVG; None when
  no train/loss was logged."""
  loss = scalars.get('train/loss')
  if not loss:
    return None
  # The 2D heads' loss averages every (step, target) pair; the next position's NLL is the
  # one sampling uses and the one the held-out NLL measures.
  series = {'train loss': loss}
  for tag, name in (('train/nll_ahead_1', 'train NLL, next position'),
                    ('eval/nll', 'held-out NLL, next position'),
                    ('eval/mse', 'held-out diffusion loss')):
    if scalars.get(tag) and not (tag == 'train/nll_ahead_1' and scalars[tag] == loss):
      series[name] = scalars[tag]
  return svg_line_plot(series, title=title, xlabel='step',
                       ylabel='loss (nats/token)' if 'train/nll' in scalars else 'loss')


def _curves(scalars: Mapping[str, list[tuple[int, float]]]) -> list[str]:
  plots = [loss_plot(scalars)]
  fid = scalars.get('generative/fid')
  if fid and len(fid) > 1:
    plots.append(svg_line_plot({'FID': fid}, title='FID of samples', xlabel='step',
                               ylabel='FID', markers=True))
  return [p for p in plots if p]


def tokenizer_dir(config) -> str | None:
  """The tokenizer's training workdir, when `config.tokenizer.checkpoint` is `<dir>/tokenizer`
  as train_tokenizer exports it (the reconstructions live next to it)."""
  path = str(getattr(getattr(config, 'tokenizer', None), 'checkpoint', '') or '')
  parent = paths.dirname(paths.resolve(path)) if path else ''
  return parent if parent and paths.isdir(paths.join(parent, 'reconstructions')) else None


def write_run_page(workdir: str, summary: Mapping[str, Any], *, title: str = '',
                   tokenizer_workdir: str | None = None) -> str:
  """Writes `<workdir>/summary.html` (metrics, loss curve, samples, reference, reconstructions)
  and returns its path."""
  scalars = read_scalars(workdir)
  esc = html.escape
  parts = [f'<h1>{esc(title or "Heptapod run")}</h1>',
           f'<p class="small">workdir <code>{esc(paths.display(workdir))}</code>, '
           f'step {esc(str(summary.get("step", "?")))}</p>']
  train = summary.get('train') or {}
  if train:
    speed = ', '.join(f'{label} {train[k]:.3g}' for k, label in
                      (('steps_per_sec', 'steps/s'), ('tokens_per_sec', 'tokens/s'), ('mfu', 'MFU'))
                      if k in train)
    parts.append(f'<p>Last training line: loss {train.get("loss", float("nan")):.4f}; {speed}.</p>')
  for heading, table in (('Held-out evaluation', _eval_table(summary)),
                         ('Generative metrics', _generative_table(summary))):
    if table:
      parts += [f'<h2>{heading}</h2>', table]
  info = summary.get('generative_info') or {}
  if info:
    parts.append('<p class="small">' + esc(', '.join(f'{k}: {v}' for k, v in info.items())) + '</p>')
  curves = _curves(scalars)
  if curves:
    parts += ['<h2>Training curves</h2>'] + [f'<div class="plot">{svg}</div>' for svg in curves]
  pictures = []
  samples = list(summary.get('samples') or [])
  final = samples[-1] if samples else latest_file(paths.join(workdir, 'samples', 'step_*.png'))
  if final and paths.exists(final):
    pictures.append(('Samples (one column per class)', final))
  reference = summary.get('reference') or paths.join(workdir, 'samples',
                                                      'reference_real_tokenized.png')
  if reference and paths.exists(reference):
    pictures.append(('Held-out real images through the tokenizer (what perfect samples look like)',
                     reference))
  if tokenizer_workdir:
    recon = latest_file(paths.join(tokenizer_workdir, 'reconstructions', 'step_*.png'))
    if recon:
      pictures.append(('Tokenizer: held-out originals (odd rows) over reconstructions', recon))
  for caption, path in pictures:
    parts += [f'<h2>{esc(caption)}</h2>',
              f'<p class="small"><code>{esc(paths.display(path))}</code></p>',
              f'<img src="{_png_data(path)}" alt="{esc(caption)}">']
  parts.append(f'<p class="small">Every scalar: <code>tensorboard --logdir {esc(workdir)}</code>; '
               f'every log record: <code>{esc(paths.join(workdir, "log.txt"))}</code>.</p>')
  page = ('<!doctype html><html><head><meta charset="utf-8">'
          f'<title>{esc(title or "Heptapod run")}</title><style>'
          'body{font-family:sans-serif;max-width:900px;margin:2em auto;color:#222}'
          'table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;'
          'padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}'
          '.small{color:#666;font-size:.85em}img{image-rendering:pixelated;max-width:100%}'
          '.plot{margin:.5em 0}</style></head><body>\n' + '\n'.join(parts) + '\n</body></html>\n')
  path = paths.join(workdir, PAGE_NAME)
  paths.write_text(path, page)
  return path
