"""Core model: causality, the loss's support, cached decoding, sampling, sharding, input checks."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from heptapod_jax import presets, sharding
from heptapod_jax.models import objective
from heptapod_jax.models.config import ModelConfig
from heptapod_jax.sampling import decode as sampling
from heptapod_jax.models.heptapod import (Heptapod, check_inputs, compute_loss, init_params,
                                          split_layers)
from heptapod_jax.models.transformer import init_cache

KINDS = ('global', 'local', 'next_token')
GRID = (3, 4)  # Non-square, so that rows and columns cannot be confused.
N = GRID[0] * GRID[1]
VOCAB = 13
# (model.head.condition, model.head.direct_next) besides the default ('context', False).
HEAD_OPTIONS = [('add', False), ('context', True), ('add', True)]
OPTION_LAYERS = ('condition_proj', 'next_proj')  # Their zero-initialised Dense layers.


def make_config(kind='global', **over) -> ModelConfig:
  backbone = dict(width=32, depth=2, num_heads=4, qk_norm=True)
  backbone.update(over.pop('backbone', {}))
  head = dict(kind=kind, width=32, depth=2, num_heads=4, window=4, steps_per_image=-1)
  head.update(over.pop('head', {}))
  d = dict(vocab_size=VOCAB, grid_size=GRID, num_classes=5, backbone=backbone, head=head)
  d.update(over)
  return ModelConfig.from_dict(d)


def setup_model(kind='global', seed=0, **over):
  cfg = make_config(kind, **over)
  model = Heptapod(cfg)
  params = nn.unbox(init_params(model, jax.random.key(seed)))
  return model, params


def randomize_option_kernels(params, seed=5, names=OPTION_LAYERS):
  """params with the head's option kernels among `names` (zero at init) set to random values,
  so that a test sees the paths they open."""
  head = dict(params['head'])
  for i, name in enumerate(names):
    if name in head:
      kernel = head[name]['kernel']
      head[name] = {'kernel': 0.1 * jax.random.normal(jax.random.key(seed + i), kernel.shape,
                                                       kernel.dtype)}
  return dict(params, head=head)


def random_batch(seed=1, batch=3):
  k1, k2 = jax.random.split(jax.random.key(seed))
  tokens = jax.random.randint(k1, (batch, N), 0, VOCAB)
  labels = jax.random.randint(k2, (batch,), 0, 5)
  return tokens, labels


def all_steps_forward(model, params, tokens, labels):
  """Teacher-forced logits of every step for every candidate target: [B, N, C, V], targets."""
  cfg = model.config
  steps = jnp.broadcast_to(jnp.arange(N), (tokens.shape[0], N))
  targets, valid = objective.candidate_targets(cfg, steps)
  return model.apply({'params': params}, tokens, labels, steps, targets), targets, valid


def test_backbone_causality():
  model, params = setup_model('global')
  tokens, labels = random_batch()
  j = 6
  tokens2 = tokens.at[:, j].set((tokens[:, j] + 1) % VOCAB)
  h1 = model.apply({'params': params}, tokens, labels, method=Heptapod.states)
  h2 = model.apply({'params': params}, tokens2, labels, method=Heptapod.states)
  # h_t has seen x_0..x_{t-1}: states up to t = j are untouched, h_{j+1} moves.
  np.testing.assert_array_equal(h1[:, :j + 1], h2[:, :j + 1])
  assert np.abs(h1[:, j + 1] - h2[:, j + 1]).max() > 1e-4


@pytest.mark.parametrize('kind', ('global', 'local'))
@pytest.mark.parametrize('condition,direct_next', [('context', False), *HEAD_OPTIONS])
def test_head_causality(kind, condition, direct_next):
  model, params = setup_model(kind, head=dict(condition=condition, direct_next=direct_next))
  params = randomize_option_kernels(params)  # (Zero at init: they would hide nothing.)
  tokens, labels = random_batch()
  j = 5
  tokens2 = tokens.at[:, j].set((tokens[:, j] + 3) % VOCAB)
  l1, _, _ = all_steps_forward(model, params, tokens, labels)
  l2, _, _ = all_steps_forward(model, params, tokens2, labels)
  # Step t has seen x_0..x_{t-1}: no output of any step t <= j may change.
  np.testing.assert_array_equal(l1[:, :j + 1], l2[:, :j + 1])
  assert np.abs(l1[:, j + 1] - l2[:, j + 1]).max() > 1e-4


@pytest.mark.parametrize('kind', KINDS)
def test_loss_gradient_ignores_visible_targets(kind):
  model, params = setup_model(kind)
  tokens, labels = random_batch(batch=2)
  cfg = model.config
  t = 5
  steps = jnp.full((2, 1), t)
  targets, valid = objective.candidate_targets(cfg, steps)
  logits = model.apply({'params': params}, tokens, labels, steps, targets)
  onehot = jax.nn.one_hot(tokens, VOCAB)

  def loss_of_targets(dist):
    loss, _ = objective.pair_loss_and_metrics(cfg, logits, dist, steps, targets, valid)
    return loss

  grad = np.asarray(jax.grad(loss_of_targets)(onehot))
  np.testing.assert_array_equal(grad[:, :t], 0.0)  # Visible positions: no gradient at all.
  supervised = np.unique(np.asarray(targets)[np.asarray(valid)])
  assert supervised.min() >= t
  assert (np.abs(grad[:, supervised]).sum(-1) > 0).all()  # Every supervised target matters.


@pytest.mark.parametrize('smoothing,z_loss', [(0.0, 0.0), (0.1, 1e-3)])
def test_loss_from_ids_equals_loss_from_one_hot(smoothing, z_loss):
  """The training loss takes token ids (no one-hot is materialised); it must give the same
  loss, metrics and logit gradients as the explicit one-hot distribution."""
  model, params = setup_model('global', label_smoothing=smoothing, z_loss=z_loss)
  tokens, labels = random_batch(batch=2)
  cfg = model.config
  steps, targets, valid = objective.draw_pairs(jax.random.key(3), cfg, 2)
  logits = model.apply({'params': params}, tokens, labels, steps, targets)
  flat = tokens.reshape(2, -1)

  def run(logits, target):
    return objective.pair_loss_and_metrics(cfg, logits, target, steps, targets, valid)

  (loss_ids, m_ids), g_ids = jax.value_and_grad(run, has_aux=True)(logits, flat)
  (loss_oh, m_oh), g_oh = jax.value_and_grad(run, has_aux=True)(
      logits, jax.nn.one_hot(flat, VOCAB))
  np.testing.assert_allclose(loss_ids, loss_oh, rtol=1e-6)
  np.testing.assert_allclose(g_ids, g_oh, atol=1e-7)
  assert m_ids.keys() == m_oh.keys()
  for name in m_ids:
    np.testing.assert_allclose(np.stack(m_ids[name]), np.stack(m_oh[name]), rtol=1e-5,
                               err_msg=name)


def test_sampled_pairs_are_future_and_distinct():
  cfg = make_config('global', head=dict(steps_per_image=5, targets_per_step=3))
  steps, targets, valid = objective.draw_pairs(jax.random.key(3), cfg, 64)
  steps, targets, valid = map(np.asarray, (steps, targets, valid))
  assert all(len(set(row)) == 5 for row in steps)
  assert (targets[valid] >= np.broadcast_to(steps[..., None], targets.shape)[valid]).all()
  for s, t, v in zip(steps.reshape(-1), targets.reshape(-1, 3), valid.reshape(-1, 3)):
    assert v.sum() == min(3, N - s) and len(set(t[v])) == v.sum()


def cached_step_logits(model, params, tokens, labels, size=1):
  """Head outputs of positions t..t+size-1 at every step t (t + size <= N), by incremental
  decoding: prefill, then one token at a time through the KV cache and the head's state."""
  cfg = model.config
  variables = {'params': params}
  layer_params = split_layers(params)
  head, cache = model.apply(variables, labels, init_cache(cfg, tokens.shape[0]), layer_params,
                            method=Heptapod.prefill)
  # Each piece is jitted once (t is traced) so the Python loop stays cheap.
  predict = jax.jit(lambda head, t: model.apply(variables, head, t, size, layer_params,
                                                method=Heptapod.predict))
  feed = jax.jit(lambda token, t, cache, head: model.apply(
      variables, token[:, None], t, cache, head, layer_params, method=Heptapod.feed))
  out = []
  for t in range(N):
    if t + size <= N:
      out.append(predict(head, jnp.int32(t)))
    if t < N - 1:
      head, cache = feed(tokens[:, t], jnp.int32(t), cache, head)
  return jnp.stack(out, axis=1)  # [B, N - size + 1, size, V]


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('prefix,kv_heads', [(1, 0), (2, 2)])
def test_cached_decode_equals_full_forward(kind, prefix, kv_heads):
  model, params = setup_model(kind, backbone=dict(class_prefix_len=prefix, num_kv_heads=kv_heads))
  tokens, labels = random_batch()
  steps = jnp.broadcast_to(jnp.arange(N), (tokens.shape[0], N))
  full = model.apply({'params': params}, tokens, labels, steps, steps[..., None])[:, :, 0]
  cached = cached_step_logits(model, params, tokens, labels)[:, :, 0]
  np.testing.assert_allclose(cached, full, atol=1e-4, rtol=0)


# The head options' decoding cases: (kind, config overrides, test id).
OPTION_DECODE_CASES = [
    *[(kind, dict(head=dict(condition=c, direct_next=d)), f'{kind}-{c}-{"next" if d else "0"}')
      for kind in ('global', 'local') for c, d in HEAD_OPTIONS],
    ('global', dict(head=dict(condition='add', direct_next=True, depth=1)),
     'global-add-next-depth1'),
    ('global', dict(head=dict(condition='add', visible_context=False)), 'global-add-no-visible')]


@pytest.mark.parametrize('kind, over', [
    ('global', {}), ('global', dict(head=dict(depth=1))),
    ('global', dict(head=dict(visible_context=False))), ('local', {}),
    ('local', dict(head=dict(depth=1))), *[case[:2] for case in OPTION_DECODE_CASES]],
    ids=['global', 'global-depth1', 'global-no-visible', 'local', 'local-depth1',
         *[case[2] for case in OPTION_DECODE_CASES]])
def test_decoded_multi_position_outputs_equal_full_forward(kind, over):
  """The heads' decoding state answers for several positions at once (parallel decoding):
  each equals the full forward's prediction for that target at that step. With the head
  options (condition='add', direct_next) their kernels are randomised first (zero at init,
  where a decoder that ignored them would pass), and row 0 of each answer is the distance-1
  position that direct_next reaches."""
  size = 3
  model, params = setup_model(kind, **over)
  params = randomize_option_kernels(params)
  tokens, labels = random_batch()
  steps = jnp.broadcast_to(jnp.arange(N - size + 1), (tokens.shape[0], N - size + 1))
  targets = steps[..., None] + jnp.arange(size)
  full = model.apply({'params': params}, tokens, labels, steps, targets)
  cached = cached_step_logits(model, params, tokens, labels, size=size)
  np.testing.assert_allclose(cached, full, atol=1e-4, rtol=0)


@pytest.mark.parametrize('kind', ('global', 'local'))
@pytest.mark.parametrize('condition,direct_next', HEAD_OPTIONS)
def test_head_options_start_as_context_and_act_where_claimed(kind, condition, direct_next):
  """condition='add' / direct_next add zero-initialised kernels only: the other parameters
  of a fresh model are those of the default head and the outputs are exactly its outputs.
  Randomised, condition_proj moves every valid target of every step, next_proj exactly the
  distance-1 target (target == step) and nothing else."""
  options = dict(condition=condition, direct_next=direct_next)
  base_model, base = setup_model(kind)
  model, params = setup_model(kind, head=options)
  head = dict(params['head'])
  new = {name: head.pop(name)['kernel'] for name in OPTION_LAYERS if name in head}
  assert set(new) == {n for n, on in zip(OPTION_LAYERS, (condition == 'add', direct_next)) if on}
  for name, kernel in new.items():
    assert kernel.shape == (32, 32), name
    np.testing.assert_array_equal(kernel, 0.0, err_msg=name)
  assert jax.tree.structure(dict(params, head=head)) == jax.tree.structure(base)
  for a, b in zip(jax.tree.leaves(dict(params, head=head)), jax.tree.leaves(base)):
    np.testing.assert_array_equal(a, b)
  tokens, labels = random_batch()
  ref, targets, valid = all_steps_forward(base_model, base, tokens, labels)
  out, _, _ = all_steps_forward(model, params, tokens, labels)
  np.testing.assert_array_equal(out, ref)

  steps = jnp.broadcast_to(jnp.arange(N), (tokens.shape[0], N))
  is_next = np.asarray(targets == steps[..., None])  # [B, N, C]
  valid = np.broadcast_to(np.asarray(valid), is_next.shape)
  for name in new:
    moved, _, _ = all_steps_forward(model, randomize_option_kernels(params, names=(name,)),
                                    tokens, labels)
    changed = np.abs(np.asarray(moved) - np.asarray(ref)).max(-1)  # [B, N, C]
    if name == 'condition_proj':
      assert (changed[valid] > 1e-5).all()
    else:  # Only the next position's output, and exactly nothing else.
      assert (changed[is_next] > 1e-5).all()
      np.testing.assert_array_equal(changed[~is_next], 0.0)


def greedy_by_full_forward(model, params, labels):
  forward = jax.jit(lambda tokens, steps: model.apply({'params': params}, tokens, labels, steps,
                                                     steps[..., None])[:, 0, 0])
  tokens = jnp.zeros((labels.shape[0], N), jnp.int32)
  for t in range(N):
    logits = forward(tokens, jnp.full((labels.shape[0], 1), t))
    tokens = tokens.at[:, t].set(jnp.argmax(logits, -1))
  return tokens


@pytest.mark.parametrize('kind', KINDS)
def test_greedy_sampling_equals_full_forward_greedy(kind):
  model, params = setup_model(kind, seed=4)
  labels = jnp.array([0, 3, 4])
  expected = greedy_by_full_forward(model, params, labels)
  for temperature in (0.0, 1e-5):
    cfg = sampling.SamplingConfig(temperature=temperature)
    got = jax.jit(functools.partial(sampling.sample, model, config=cfg))(params, labels,
                                                                         jax.random.key(9))
    np.testing.assert_array_equal(got, expected)


def test_sampling_follows_the_distribution():
  """With temperature 1 the first token's empirical distribution matches the model's softmax."""
  model, params = setup_model('global', seed=2)
  labels = jnp.full((4000,), 2)
  tokens = jax.jit(functools.partial(sampling.sample, model))(params, labels, jax.random.key(0))
  steps = jnp.zeros((1, 1), jnp.int32)
  logits = model.apply({'params': params}, jnp.zeros((1, N), jnp.int32), labels[:1], steps,
                       steps[..., None])[0, 0, 0]
  expected = np.asarray(jax.nn.softmax(logits))
  counts = np.bincount(np.asarray(tokens[:, 0]), minlength=VOCAB) / labels.shape[0]
  np.testing.assert_allclose(counts, expected, atol=0.03)


def test_top_k_top_p_support():
  probs = np.array([0.05, 0.4, 0.1, 0.25, 0.2])  # Sorted: 1 (.4), 3 (.25), 4 (.2), 2 (.1), 0 (.05).
  logits = jnp.log(jnp.asarray(probs))[None]
  support = lambda x: set(np.flatnonzero(np.isfinite(np.asarray(x[0]))))
  assert support(sampling.filter_logits(logits, top_k=2)) == {1, 3}
  assert support(sampling.filter_logits(logits, top_k=1)) == {1}
  assert support(sampling.filter_logits(logits, top_p=0.35)) == {1}
  assert support(sampling.filter_logits(logits, top_p=0.6)) == {1, 3}
  assert support(sampling.filter_logits(logits, top_p=0.66)) == {1, 3, 4}
  assert support(sampling.filter_logits(logits, top_k=2, top_p=0.99)) == {1, 3}
  # Sampling never leaves the support.
  cfg = sampling.SamplingConfig(temperature=1.0, top_k=3)
  draws = jax.vmap(lambda k: sampling.sample_logits(k, logits, cfg))(
      jax.random.split(jax.random.key(0), 2000))
  assert set(np.unique(np.asarray(draws))) == {1, 3, 4}


def test_cfg_scale_one_is_plain_sampling_and_cfg_runs():
  model, params = setup_model('global', backbone=dict(class_dropout=0.1))
  labels = jnp.array([1, 2])
  plain = sampling.sample(model, params, labels, jax.random.key(0),
                          sampling.SamplingConfig(temperature=0.0))
  guided = sampling.sample(model, params, labels, jax.random.key(0),
                           sampling.SamplingConfig(temperature=0.0, cfg_scale=3.0))
  assert plain.shape == guided.shape == (2, N)
  # Guidance combines two different distributions, so some greedy choice must differ.
  assert not np.array_equal(plain, guided)


def test_every_param_has_logical_axes():
  options = [(kind, {}) for kind in KINDS] + [
      (kind, dict(condition='add', direct_next=True)) for kind in ('global', 'local')]
  for kind, head in options:
    model = Heptapod(make_config(kind, head=head))
    boxed = init_params(model, jax.random.key(0))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    for leaf in leaves:
      assert isinstance(leaf, nn.LogicallyPartitioned), f'{kind}: unannotated leaf {leaf}'
      assert len(leaf.names) == leaf.value.ndim, (kind, leaf.names, leaf.value.shape)


@pytest.mark.parametrize('kind', KINDS)
def test_sharded_matches_unsharded(kind):
  cfg = make_config(kind, head=dict(steps_per_image=4, targets_per_step=1 if kind == 'next_token' else 3),
                    backbone=dict(width=64, num_heads=4))
  model = Heptapod(cfg)
  tokens, labels = random_batch(batch=8)
  rng = jax.random.key(7)

  def loss_fn(params, tokens, labels):
    return compute_loss(model, params, tokens, labels, rng, deterministic=True)[0]

  params = nn.unbox(init_params(model, jax.random.key(0)))
  ref_loss, ref_grad = jax.jit(jax.value_and_grad(loss_fn))(params, tokens, labels)

  mesh = sharding.create_mesh((2, 2, 2))
  rules = sharding.DEFAULT_RULES
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    shardings = sharding.logical_shardings(abstract, mesh, rules)
    init = jax.jit(lambda: nn.unbox(init_params(model, jax.random.key(0))), out_shardings=shardings)
    sharded_params = init()
    # Parameters really are distributed: some leaf is split over the tensor and fsdp axes.
    specs = [s.spec for s in jax.tree.leaves(shardings)]
    assert any('tensor' in jax.tree.leaves(tuple(s)) for s in specs)
    assert any('fsdp' in jax.tree.leaves(tuple(s)) for s in specs)
    batch_sh = sharding.batch_sharding(mesh, rules, 2)
    tokens_s = jax.device_put(tokens, batch_sh)
    labels_s = jax.device_put(labels, sharding.batch_sharding(mesh, rules, 1))
    loss, grad = jax.jit(jax.value_and_grad(loss_fn), out_shardings=(None, shardings))(
        sharded_params, tokens_s, labels_s)
    if kind == 'global':  # The sampler runs with the batch sharded over the data axes.
      sample = jax.jit(functools.partial(sampling.sample, model,
                                         config=sampling.SamplingConfig(temperature=0.0)))
      samples = sample(sharded_params, labels_s, rng)
      assert samples.sharding.spec[0] == ('data', 'fsdp')
      ref_samples = sample(params, labels, rng)  # The same program, unsharded.
      np.testing.assert_array_equal(samples, ref_samples)
  np.testing.assert_allclose(loss, ref_loss, atol=1e-5, rtol=0)
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
  cfg = make_config('global')
  tokens, labels = random_batch()
  with pytest.raises(ValueError, match='grid'):
    check_inputs(cfg, tokens[:, :N - 1], labels)
  with pytest.raises(ValueError, match=r'grid_size'):
    check_inputs(cfg, tokens.reshape(3, 4, 3), labels)
  with pytest.raises(ValueError, match='class labels must be in'):
    check_inputs(cfg, tokens, labels.at[0].set(5))
  with pytest.raises(ValueError, match='class labels must be in'):
    check_inputs(cfg, tokens, labels.at[0].set(-1))
  with pytest.raises(ValueError, match='token values'):
    check_inputs(cfg, tokens.at[0, 0].set(VOCAB), labels)
  with pytest.raises(ValueError, match=r"model.head.kind='diagonal'"):
    make_config('diagonal')
  with pytest.raises(ValueError, match='unknown field'):
    make_config('global', head=dict(depht=3))
  with pytest.raises(ValueError, match='steps_per_image'):
    make_config('global', head=dict(steps_per_image=N + 1))
  model, params = setup_model('global')
  with pytest.raises(ValueError, match='class labels must be in'):
    sampling.sample(model, params, jnp.array([0, 7]), jax.random.key(0))
  with pytest.raises(ValueError, match='tokens have'):
    compute_loss(model, params, tokens[:, :5], labels, jax.random.key(0))


def test_preset_param_counts():
  from heptapod_jax.tools.param_count import preset_config
  counts = {s: presets.param_counts(preset_config(s, vocab_size=16384, grid=16, num_classes=1000,
                                                   head='global'))
            for s in presets.SIZES}
  assert abs(counts['H']['total'] / 941e6 - 1) < 0.03
  totals = [counts[s]['total'] for s in presets.SIZES]
  assert totals == sorted(totals)
  # Independent count for the backbone of B: LlamaGen's closed form.
  d, depth, hidden = 768, 12, 2048
  closed = 16384 * d + 1001 * d + depth * (4 * d * d + 3 * d * hidden + 2 * d) + d
  assert counts['B']['backbone'] == closed


def test_scan_unroll_keeps_params_and_outputs():
  model, params = setup_model('local')
  unrolled = Heptapod(dataclasses.replace(model.config, scan_unroll=4))
  tokens, labels = random_batch()
  assert jax.tree.structure(params) == jax.tree.structure(
      nn.unbox(init_params(unrolled, jax.random.key(0))))
  a, _, _ = all_steps_forward(model, params, tokens, labels)
  b, _, _ = all_steps_forward(unrolled, params, tokens, labels)
  np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('smoothing,z_loss', [(0.0, 0.0), (0.1, 1e-3)])
def test_fused_loss_equals_plain_loss(kind, smoothing, z_loss):
  """model.loss_chunk > 0 (the vocabulary projection fused with the cross-entropy, chunk by
  chunk, with a hand-written backward) gives the plain loss's value, metrics and parameter
  gradients: rtol 1e-5 on the loss and metrics, 1e-4 (relative to the largest entry) on
  every gradient. Chunks of 5 pairs leave a ragged last chunk."""
  model, params = setup_model(kind, seed=3, label_smoothing=smoothing, z_loss=z_loss,
                              head=dict(steps_per_image=4))
  fused = Heptapod(dataclasses.replace(model.config, loss_chunk=5))
  tokens, labels = random_batch(batch=2)

  def run(m):
    fn = lambda p: compute_loss(m, p, tokens, labels, jax.random.key(1), deterministic=True)
    return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)

  (loss, metrics), grads = run(model)
  (f_loss, f_metrics), f_grads = run(fused)
  np.testing.assert_allclose(f_loss, loss, rtol=1e-5)
  for name in metrics:
    np.testing.assert_allclose(np.stack(f_metrics[name]), np.stack(metrics[name]), rtol=1e-5,
                               atol=1e-6, err_msg=name)
  for (path, g), fg in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(f_grads)):
    scale = max(float(np.abs(g).max()), 1e-12)
    np.testing.assert_allclose(fg / scale, g / scale, atol=1e-4, err_msg=jax.tree_util.keystr(path))
