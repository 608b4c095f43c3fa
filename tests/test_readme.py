"""Every command in README.md, launch/README.md and the pages of docs/ (notebooks excluded)
refers to things that exist: make targets, modules and scripts, their flags, config files,
config options and `--config.<field>` overrides. The commands themselves run in tiny form
elsewhere in the suite (make demo's stages in test_train.py, the sampling CLI in test_sample_cli.py, the recipe tool in
test_recipes.py, aot_compile in test_aot_compile.py, the launch scripts' dry runs in
test_launch.py); this test keeps the documentation from drifting away from them. The READMEs'
relative links lead to files and headings that exist (the docs site's own links are checked
by its strict build, tests/test_docs_site.py)."""
import importlib.util
import os
import re
import shlex
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ('README.md', 'launch/README.md')
# The docs site's pages: each starts with the commands of its topic.
PAGES = tuple(sorted(os.path.relpath(os.path.join(ROOT, 'docs', name), ROOT)
                     for name in os.listdir(os.path.join(ROOT, 'docs')) if name.endswith('.md')))
# absl's own flags, accepted by every absl program.
ABSL_FLAGS = {'helpfull', 'help', 'alsologtostderr', 'logtostderr', 'v', 'verbosity'}


def commands(doc: str) -> list[str]:
  """Shell command lines of the fenced bash/sh code blocks (or unlabelled ones), continuation
  lines joined; ```text and other languages are not commands."""
  blocks, current, lang = [], None, None
  for line in open(os.path.join(ROOT, doc)):
    if line.startswith('```'):
      if current is None:
        lang, current = line[3:].strip(), []
      else:
        if lang in ('', 'bash', 'sh', 'shell'):
          blocks.append(''.join(current))
        current = None
    elif current is not None:
      current.append(line)
  out = []
  for block in blocks:
    joined = re.sub(r'\\\n\s*', ' ', block)
    for line in joined.splitlines():
      line = line.split(' #')[0].strip()
      if line and not line.startswith('#'):
        out.append(line)
  return out


def _module_source(module: str) -> str:
  spec = importlib.util.find_spec(module)
  assert spec is not None and spec.origin, f'module {module} does not exist'
  return open(spec.origin).read()


def _defined_flags(source: str) -> set[str]:
  names = set(re.findall(r"DEFINE_\w+\(\s*'([\w.]+)'", source))
  names |= set(re.findall(r"add_argument\(\s*'--([\w-]+)'", source))
  return {n.replace('-', '_') for n in names} | {n for n in names}


def _load_config(path: str, options: str):
  spec = importlib.util.spec_from_file_location('readme_config', os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(options or None)
  if 'model' in config:  # Options reach the model: it must validate (names the bad field).
    from heptapod_jax.models.config import ModelConfig
    ModelConfig.from_dict(config.model.to_dict()).validate()
  return config


def _has_field(config, dotted: str) -> bool:
  node = config
  for part in dotted.split('.'):
    if part not in node:
      return False
    node = node[part]
  return True


def check_python(words: list[str]) -> None:
  if words[0] == '-m':
    module, args = words[1], words[2:]
    source = _module_source(module)
    if module == 'heptapod_jax.main':
      source += _module_source('heptapod_jax.main')
  else:
    path, args = words[0], words[1:]
    assert os.path.exists(os.path.join(ROOT, path)), f'{path} does not exist'
    source = open(os.path.join(ROOT, path)).read()
  defined = _defined_flags(source) | ABSL_FLAGS
  config = None
  for arg in args:
    if not arg.startswith('--'):
      continue
    name, _, value = arg[2:].partition('=')
    if name == 'config':
      path, _, options = value.partition(':')
      if '/' in path and path.endswith('.py'):
        assert os.path.exists(os.path.join(ROOT, path)), f'config file {path} does not exist'
        config = _load_config(path, options)
      continue
    if name.startswith('config.'):
      assert config is not None, f'{arg} without a --config before it'
      assert _has_field(config, name[len('config.'):]), f'{arg}: no such config field'
      continue
    if name not in defined and not (name.startswith('no') and name[2:] in defined):
      raise AssertionError(f'flag --{name} is not defined by {words[:2]}')


def check(line: str) -> None:
  words = shlex.split(line)
  while words and re.fullmatch(r'[A-Z_]+=\S*', words[0]):  # VAR=value prefixes.
    words = words[1:]
  if words[:2] == ['taskset', '-c']:  # `taskset -c CPUS command ...`: the command is checked.
    words = words[3:]
  if not words:
    return
  head = words[0]
  if head == 'make':
    makefile = open(os.path.join(ROOT, 'Makefile')).read()
    for target in (w for w in words[1:] if '=' not in w):
      assert re.search(rf'^{re.escape(target)}:', makefile, re.M), f'make {target}: no target'
  elif head in ('python', 'python3', '.venv/bin/python'):
    check_python(words[1:])
  elif head.startswith('launch/'):
    assert os.path.exists(os.path.join(ROOT, head)), f'{head} does not exist'
    for word in words[1:]:
      if re.fullmatch(r'configs/\w+\.py(:\S*)?', word):
        path, _, options = word.partition(':')
        _load_config(path, options)


def command_failures(lines: list[str]) -> list[str]:
  """Each command line that `check` refuses, with why."""
  out = []
  for line in lines:
    try:
      check(line)
    except Exception as e:  # pylint: disable=broad-except
      out.append(f'{line}\n  -> {type(e).__name__}: {e}')
  return out


@pytest.mark.parametrize('doc', DOCS)
def test_every_documented_command_refers_to_what_exists(doc):
  lines = commands(doc)
  assert len(lines) >= 5, f'{doc}: expected commands in its code blocks'
  failures = command_failures(lines)
  assert not failures, '\n'.join(failures)


def test_the_checker_catches_drift():
  with pytest.raises(AssertionError, match='no such config field'):
    check('python -m heptapod_jax.main --config=configs/demo.py --config.train.no_such_field=1')
  with pytest.raises(AssertionError, match='is not defined'):
    check('python -m heptapod_jax.tools.recipes --no_such_flag=1')
  with pytest.raises(AssertionError, match='no target'):
    check('make no-such-target')
  with pytest.raises(AssertionError, match='does not exist'):
    check('python -m heptapod_jax.no_such_module')
  with pytest.raises(AssertionError):
    check('taskset -c 0 python benchmarks/objective_study.py --no_such_flag=1')
  with pytest.raises(ValueError, match='not one of'):
    check('python -m heptapod_jax.main --config=configs/imagenet256.py:head=diagonal')


@pytest.mark.parametrize('page', PAGES)
def test_every_command_of_the_docs_pages_refers_to_what_exists(page):
  lines = commands(page)
  assert lines, f'{page}: a page starts with the commands of its topic; it has none'
  failures = command_failures(lines)
  assert not failures, '\n'.join(failures)


def github_slug(heading: str) -> str:
  """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to -."""
  text = re.sub(r'[`*_]', '', heading.strip().lower())
  return re.sub(r'[^\w\- ]', '', text).replace(' ', '-')


def relative_links(doc: str) -> list[tuple[str, str]]:
  """(target file, anchor) of every relative Markdown link or image of `doc`, outside code."""
  text = re.sub(r'```.*?```', '', open(os.path.join(ROOT, doc)).read(), flags=re.S)
  text = re.sub(r'`[^`]*`', '', text)
  out = []
  for target in re.findall(r'\]\(([^)\s]+)\)', text):
    if re.match(r'[a-z]+:', target):
      continue
    path, _, anchor = target.partition('#')
    target_file = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
    out.append((target_file, anchor))
  return out


@pytest.mark.parametrize('doc', DOCS)
def test_the_readmes_links_lead_somewhere(doc):
  links = relative_links(doc)
  assert links, f'{doc}: expected links to the docs'
  broken = []
  for path, anchor in links:
    if not os.path.exists(os.path.join(ROOT, path)):
      broken.append(f'{path}: no such file')
    elif anchor:
      text = re.sub(r'```.*?```', '', open(os.path.join(ROOT, path)).read(), flags=re.S)
      headings = re.findall(r'^#+ (.+)$', text, re.M)
      if anchor not in {github_slug(h) for h in headings}:
        broken.append(f'{path}#{anchor}: no such heading')
  assert not broken, f'{doc}: ' + '; '.join(broken)


def test_the_link_checker_catches_drift(tmp_path, monkeypatch):
  assert github_slug("The paper's claims at this scale") == 'the-papers-claims-at-this-scale'
  assert github_slug('Everything in a bucket (`gs://`)') == 'everything-in-a-bucket-gs'
  doc = tmp_path / 'docs' / 'a.md'
  doc.parent.mkdir()
  doc.write_text('# A\n\n[x](b.md#two) [y](missing.md) ![z](fig.png) [w](https://x.org) '
                 '`[v](not.md)`\n')
  (tmp_path / 'docs' / 'b.md').write_text('# One\n\n## Two\n')
  (tmp_path / 'docs' / 'fig.png').write_bytes(b'')
  monkeypatch.setattr(sys.modules[__name__], 'ROOT', str(tmp_path))
  assert relative_links('docs/a.md') == [('docs/b.md', 'two'), ('docs/missing.md', ''),
                                         ('docs/fig.png', '')]
