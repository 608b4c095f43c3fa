"""configs/imagenet256.py as a recipe family: every switch reaches its field, bad options name
themselves, and the docstring's table is what heptapod_jax.tools.recipes computes."""
import pytest

from heptapod_jax.models.config import ModelConfig
from heptapod_jax.tools import recipes


def _model(options):
  return ModelConfig.from_dict(recipes.load_recipe(options).model.to_dict())


def test_docstring_table_is_the_computed_one():
  with open(recipes.RECIPE_FILE) as f:
    source = f.read()
  rows = [recipes.compute(r, 0.40) for r in recipes.RECIPES]
  table = recipes.text_table(rows, 0.40)
  assert table in source, ('configs/imagenet256.py docstring is out of date; paste the output '
                           'of `python -m heptapod_jax.tools.recipes`:\n' + table)
  h = next(r for r in rows if r.recipe == 'size=H')
  assert 0.93e9 < h.params < 0.96e9  # The paper's 941M.
  assert h.steps == 800 * (1_281_167 // 2048)
  # days = steps * batch * flops / (chips * peak * mfu), recomputed by hand for v5e-256.
  expected = h.steps * 2048 * h.tflop_per_image * 1e12 / (256 * 197e12 * 0.40) / 86400
  assert h.days['v5e-256'] == pytest.approx(expected)


def test_each_switch_sets_its_field():
  base = _model('size=B')
  assert (base.head.kind, base.head.steps_per_image, base.head.window) == ('global', 4, 32)
  assert base.head.targets_per_step == -1 and base.head.visible_context
  assert _model('size=B,head=local').head.kind == 'local'
  assert _model('size=B,head=next_token').head.steps_per_image == -1
  assert _model('size=B,head=local,window=16').head.window == 16
  assert _model('size=B,targets_per_step=16').head.targets_per_step == 16
  assert not _model('size=B,visible_context=false').head.visible_context
  kl = _model('size=B,tokens=kl')
  assert kl.tokens == 'kl' and kl.token_dim == 16
  assert _model('size=H').backbone.depth == 42
  config = recipes.load_recipe('tokenizer=imported,tokenizer_root=gs://b/tok')
  assert config.tokenizer.checkpoint == 'gs://b/tok/llamagen_vq16'
  config = recipes.load_recipe('tokens=kl,tokenizer=trained')
  assert config.tokenizer.checkpoint == 'tokenizers/kl16/tokenizer'
  assert recipes.load_recipe('size=B').tokenizer.checkpoint == ''


@pytest.mark.parametrize('options,words', [
    ('tokenizer=llamagen', ["tokenizer='llamagen'", 'imported', 'trained']),
    ('tokens=fsq', ["tokens='fsq'", 'vq', 'kl']),
    ('heads=local', ["'heads'", 'head']),
    ('visible_context=maybe', ['visible_context', 'true or false']),
])
def test_bad_options_name_the_problem(options, words):
  with pytest.raises(ValueError) as err:
    recipes.load_recipe(options)
  for word in words:
    assert word in str(err.value)


def test_readme_recipes_table_is_current():
  rows = [recipes.compute(r, 0.40) for r in recipes.RECIPES]
  table = recipes.markdown_table(rows, 0.40).split('\n\n')[0]
  readme = open(recipes.RECIPE_FILE.replace('configs/imagenet256.py', 'docs/reproducing.md')).read()
  assert table in readme, ('docs/reproducing.md recipes table is out of date; paste the output of '
                           '`python -m heptapod_jax.tools.recipes --markdown`:\n' + table)
