"""The documentation site builds with `mkdocs build --strict` (what `make docs` runs): every
page in the nav, every link between pages and every anchor resolves. A second build of a
copy with one broken anchor must fail, so the strictness itself is checked."""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytest.importorskip('mkdocs', reason='requirements-dev.txt installs mkdocs (make test does)')


def build(root: pathlib.Path, site: pathlib.Path) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, '-m', 'mkdocs', 'build', '--strict', '--site-dir', str(site)],
      cwd=root, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, NO_MKDOCS_2_WARNING='1'))


def test_the_site_builds_strictly_with_every_page(tmp_path):
  out = build(ROOT, tmp_path / 'site')
  assert out.returncode == 0, out.stdout + out.stderr
  assert 'WARNING' not in out.stdout + out.stderr, out.stdout + out.stderr
  pages = sorted(p.stem for p in (ROOT / 'docs').glob('*.md'))
  site = tmp_path / 'site'
  built = [p for p in pages if (site / ('' if p == 'index' else p) / 'index.html').exists()]
  assert built == pages, f'pages not built: {sorted(set(pages) - set(built))}'


def test_a_broken_anchor_fails_the_build(tmp_path):
  shutil.copytree(ROOT / 'docs', tmp_path / 'docs')
  shutil.copy(ROOT / 'mkdocs.yml', tmp_path / 'mkdocs.yml')
  page = tmp_path / 'docs' / 'index.md'
  page.write_text(page.read_text() + '\nSee [nowhere](getting-started.md#no-such-heading).\n')
  out = build(tmp_path, tmp_path / 'site')
  assert out.returncode != 0
  assert 'no-such-heading' in out.stdout + out.stderr
