"""The package's import graph: no circles, layers that read top-down, no private helper
called from another module.

Every `import` of a heptapod_jax module counts, at module level or inside a function (a
function-local import is still a dependency: it only hides the circle until run time).
"""
import ast
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'heptapod_jax'

# Who may not import whom: (importer prefix, forbidden prefixes, why).
TRAINING = ('heptapod_jax.training', 'heptapod_jax.main')
# training/ less what the pure step itself builds on (optim).
TRAINERS = ('heptapod_jax.training.train', 'heptapod_jax.training.trainlib',
            'heptapod_jax.training.train_tokenizer', 'heptapod_jax.training.liveness',
            'heptapod_jax.main')
CHECKPOINTS = ('heptapod_jax.storage.checkpoint', 'heptapod_jax.storage.checkpoint_read',
               'heptapod_jax.storage.tokenizer_checkpoint')
SAMPLE_CLI = ('heptapod_jax.sample', 'heptapod_jax.sampling.sample_mode')
LAYERS = (
    ('heptapod_jax.models', TRAINING + CHECKPOINTS + SAMPLE_CLI + (
        'heptapod_jax.sampling', 'heptapod_jax.data', 'heptapod_jax.config_lib',
        'heptapod_jax.storage.runs'),
     'models never import training, sampling, data, configs or checkpoints'),
    ('heptapod_jax.training.steps', TRAINERS + CHECKPOINTS + SAMPLE_CLI + (
        'heptapod_jax.data', 'heptapod_jax.evaluators', 'heptapod_jax.config_lib'),
     'the pure step needs no trainer, data pipeline, configs or checkpoints'),
    ('heptapod_jax.data.schema', ('heptapod_jax.data.input_pipeline', 'heptapod_jax.data.sources',
                                  'heptapod_jax.data.preprocess', 'heptapod_jax.data.record_order',
                                  'heptapod_jax.data.tokenized', 'heptapod_jax.data.codes_format',
                                  'heptapod_jax.data.builtin'),
     'what a data config may say is known without the tf.data pipeline'),
    ('heptapod_jax.config_lib', TRAINING + CHECKPOINTS + SAMPLE_CLI,
     'config validation is pure: no checkpoint is read while validating'),
    ('heptapod_jax.sampling.decode', TRAINING + SAMPLE_CLI + ('heptapod_jax.sampling.generation',),
     'the decode loop never imports training or sample mode'),
    ('heptapod_jax.sampling.generation', TRAINING + SAMPLE_CLI,
     'sample generation needs neither the trainer nor the CLI'),
    ('heptapod_jax.sampling.image_sampler', TRAINING + SAMPLE_CLI,
     'sampling a run needs neither the trainer nor the CLI'),
    ('heptapod_jax.sampling', TRAINING + ('heptapod_jax.sample',),
     'sampling and sample mode never import training or the command line'),
    ('heptapod_jax.storage.runs', TRAINING + SAMPLE_CLI,
     'loading a run for sampling needs neither the trainer nor the CLI'),
    ('heptapod_jax.storage', TRAINING + SAMPLE_CLI,
     'storage never imports training, sample mode or the CLI'),
    *((m, TRAINING + SAMPLE_CLI + ('heptapod_jax.sampling', 'heptapod_jax.storage.runs'),
       'file formats and checkpoints need no sampler, no trainer and no run loader')
      for m in CHECKPOINTS + ('heptapod_jax.storage.artifacts',)),
    ('heptapod_jax.sample', TRAINING, 'the sampling command line does not need the trainer'),
    ('heptapod_jax.training', SAMPLE_CLI, 'training never imports sample mode or its CLI'),
    ('heptapod_jax.evaluators', TRAINING + SAMPLE_CLI,
     'evaluation needs neither the trainer nor the CLI'),
    ('heptapod_jax.data',
     TRAINING + SAMPLE_CLI + ('heptapod_jax.sampling', 'heptapod_jax.evaluators'),
     'the input pipeline needs no trainer, sampler, evaluator or CLI'),
    ('heptapod_jax.storage.paths', ('heptapod_jax',),
     'the path layer is the bottom layer: every module may read and write files through it'),
    ('heptapod_jax.training.liveness', TRAINING + CHECKPOINTS + SAMPLE_CLI + ('heptapod_jax.data',),
     'the watchdog may run while a peer is dead: it lists files, never calls Orbax or JAX '
     'collectives'),
)


def module_names(root: pathlib.Path) -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every .py file of the package at `root`."""
  out = {}
  for path in root.rglob('*.py'):
    parts = list(path.relative_to(root.parent).with_suffix('').parts)
    if parts[-1] == '__init__':
      parts = parts[:-1]
    out['.'.join(parts)] = path
  return out


def import_graph(root: pathlib.Path) -> dict[str, set[str]]:
  """module -> the package's modules it imports (anywhere in the file)."""
  modules = module_names(root)
  graph = {name: set() for name in modules}
  for name, path in modules.items():
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:
          anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
          base = '.'.join(anchor + ([base] if base else []))
        # `from a.b import c`: on the module a.b.c if there is one, else on a.b (c is a name
        # defined there; a package's own __init__ running first does not count).
        targets = [f'{base}.{alias.name}' if f'{base}.{alias.name}' in modules else base
                   for alias in node.names]
      else:
        continue
      graph[name].update(t for t in targets if t in modules and t != name)
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import circle as a path [a, b, ..., a], or None."""
  state = {}  # 1 = on the current path, 2 = done.
  path = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_the_package_has_no_import_circles():
  cycle = find_cycle(import_graph(PACKAGE))
  assert cycle is None, 'import circle: ' + ' -> '.join(cycle)


@pytest.mark.parametrize('importer, forbidden, why', LAYERS, ids=[l[0] for l in LAYERS])
def test_layers_read_top_down(importer, forbidden, why):
  graph = import_graph(PACKAGE)
  bad = sorted(f'{src} -> {dst}' for src, dsts in graph.items()
               if src == importer or src.startswith(importer + '.')
               for dst in dsts if any(dst == f or dst.startswith(f + '.') for f in forbidden))
  assert not bad, f'{why}: ' + '; '.join(bad)


# What a model, its step, its sampler and its configs run with: a machine with JAX, Flax, Optax
# and ml_collections alone (an accelerator image without TensorFlow, a notebook, a benchmark).
LIGHT_MODULES = ('heptapod_jax.storage.paths', 'heptapod_jax.training.steps',
                 'heptapod_jax.sampling.decode', 'heptapod_jax.flops', 'heptapod_jax.config_lib',
                 'heptapod_jax.presets', 'heptapod_jax.models.heptapod', 'heptapod_jax.data.schema')
HEAVY = ('tensorflow', 'tensorflow_datasets', 'clu', 'orbax', 'torch')


def test_model_step_sampler_and_configs_import_without_tensorflow():
  code = textwrap.dedent(f'''
      import sys
      for name in {LIGHT_MODULES!r}:
        __import__(name)
      print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))
  ''')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       cwd=PACKAGE.parent, env=dict(os.environ, PYTHONPATH=str(PACKAGE.parent)))
  assert out.stdout.strip() == '[]', f'{LIGHT_MODULES} pulled in {out.stdout.strip()}'


def private_uses(root: pathlib.Path) -> list[str]:
  """Uses of another module's private names: `from pkg.mod import _name`, or `alias._name`
  where `alias` is a module of the package imported with `from pkg import mod [as alias]`."""
  modules = module_names(root)
  top = root.name
  found = []
  for name, path in sorted(modules.items()):
    tree = ast.parse(path.read_text(), str(path))
    aliases = {}
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or '').split('.')[0] == top:
        for alias in node.names:
          if f'{node.module}.{alias.name}' in modules:
            aliases[alias.asname or alias.name] = f'{node.module}.{alias.name}'
          elif alias.name.startswith('_') and not alias.name.startswith('__'):
            found.append(f'{name}: from {node.module} import {alias.name}')
      elif isinstance(node, ast.Import):
        for alias in node.names:
          if alias.name.split('.')[0] == top and alias.asname:
            aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in aliases and node.attr.startswith('_')
          and not node.attr.startswith('__') and aliases[node.value.id] != name):
        found.append(f'{name}: {aliases[node.value.id]}.{node.attr} (line {node.lineno})')
  return found


def test_private_helpers_are_not_called_across_modules():
  found = private_uses(PACKAGE)
  assert not found, 'private names used from another module: ' + '; '.join(found)


def test_the_private_use_checker(tmp_path):
  pkg = tmp_path / 'toy'
  pkg.mkdir()
  (pkg / '__init__.py').write_text('')
  (pkg / 'a.py').write_text('def _helper():\n  pass\n')
  (pkg / 'b.py').write_text('from toy import a\n\ndef f():\n  return a._helper()\n')
  assert private_uses(pkg) == ['toy.b: toy.a._helper (line 4)']
  (pkg / 'b.py').write_text('from toy.a import _helper\n')
  assert private_uses(pkg) == ['toy.b: from toy.a import _helper']
  (pkg / 'b.py').write_text('from toy import a\n\ndef f():\n  return a.__name__\n')
  assert private_uses(pkg) == []


def test_the_checker_finds_circles_and_function_local_imports(tmp_path):
  pkg = tmp_path / 'toy'
  (pkg / 'sub').mkdir(parents=True)
  (pkg / '__init__.py').write_text('')
  (pkg / 'sub' / '__init__.py').write_text('')
  (pkg / 'a.py').write_text('from toy.sub import b\n')
  (pkg / 'sub' / 'b.py').write_text('def f():\n  from .. import c\n')
  (pkg / 'c.py').write_text('import os\n')
  graph = import_graph(pkg)
  assert graph['toy.a'] == {'toy.sub.b'} and graph['toy.sub.b'] == {'toy.c'}
  (pkg / 'c.py').write_text('from toy.sub import VALUE\n')  # A name of a package.
  assert import_graph(pkg)['toy.c'] == {'toy.sub'}
  (pkg / 'c.py').write_text('import os\n')
  assert find_cycle(graph) is None
  (pkg / 'c.py').write_text('def g():\n  import toy.a\n')
  assert find_cycle(import_graph(pkg)) == ['toy.a', 'toy.sub.b', 'toy.c', 'toy.a']
  assert os.path.isdir(PACKAGE)
