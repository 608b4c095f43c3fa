"""Per-token diffusion head ("diffusion loss"; Li et al. 2024, MAR).

For continuous tokens (VAE latents, C channels each) the 2D head does not emit
logits: for every supervised grid position j it emits a condition vector z_j,
and a small MLP denoiser models p(x_j | z_j) as a DDPM (Ho et al. 2020) over
the C channels of the one token, independently of every other token.

Forward process, with T = `num_train_steps` and abar_t = prod_{s<=t} (1 - beta_s)
(t = 0..T-1 is the 0-indexed training timestep):

  q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).

Training (`training_loss`) is the simple epsilon-prediction objective: draw t
uniformly, eps ~ N(0, I), x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, and
regress eps_theta(x_t, t, z) onto eps with an MSE averaged over channels. Each
target is noised `batch_mul` times per training step (MAR's
`diffusion_batch_mul`: the denoiser is cheap next to the Transformer that
produced z, so several noise draws per z lower the gradient variance nearly for
free).

Sampling (`sample`) is DDPM ancestral sampling on a respaced chain
(Nichol & Dhariwal 2021, sec. 4): S = `num_sampling_steps` evenly spaced
timesteps tau_0 < ... < tau_{S-1} of the T training steps are kept and the
chain over them is the Markov chain with the same marginals abar_{tau_i}, i.e.
betas recomputed as beta'_i = 1 - abar_{tau_i} / abar_{tau_{i-1}}. From x_{S-1}
~ N(0, I), for i = S-1..0:

  x0_hat = (x_i - sqrt(1 - abar'_i) eps_theta(x_i, tau_i, z)) / sqrt(abar'_i)
  mean   = c1_i x0_hat + c2_i x_i          (posterior mean of q(x_{i-1} | x_i, x0_hat))
  x_{i-1} = mean + [i > 0] temperature sigma_i noise

with c1_i = beta'_i sqrt(abar'_{i-1}) / (1 - abar'_i),
c2_i = (1 - abar'_{i-1}) sqrt(1 - beta'_i) / (1 - abar'_i), and sigma_i^2 the
posterior variance beta'_i (1 - abar'_{i-1}) / (1 - abar'_i) (the "fixed small"
variance; see `sample` for why). The denoiser is always called with the
ORIGINAL timestep index tau_i, which is what it was trained on.

Everything schedule-related is computed in float64 numpy at trace time (the
config is static) and enters the traced computation as float32 constants.

Differences from MAR (`models/diffloss.py`, `diffusion/gaussian_diffusion.py`,
`diffusion/respace.py` of github.com/LTH14/mar):
  * MAR's denoiser outputs 2C channels and learns the variance
    (learn_sigma=True: ModelVarType.LEARNED_RANGE plus a VLB loss term on the
    variance channels). Here the denoiser outputs C channels (eps only), the
    loss is the plain MSE, and sampling uses the fixed posterior ("small")
    variance with improved-diffusion's clipped log (the lower end of MAR's
    learned range; MAR's learn_sigma=False default would be the upper end,
    beta'_i, "fixed large"). See `sample` for what this does to the spread.
  * The residual blocks' LayerNorm has no affine parameters (MAR's `in_ln`
    has them; they are redundant with the adaLN shift/scale, whose biases
    already give per-channel constants).
  * Classifier-free guidance is not part of this module (MAR's
    `forward_with_cfg`); a caller can build a guided `denoise_fn` itself.
Matched: the cosine schedule and its 0.999 clip, 1000 training steps,
`space_timesteps(1000, '100')` respacing with the timestep map, the network
(input projection, 256-frequency sinusoidal timestep embedding with a 2-layer
SiLU MLP, condition projection, c = t_emb + z_emb, adaLN residual MLP blocks
with shift/scale/gate, adaLN final layer; LayerNorm eps 1e-6), its
initialisation (xavier-uniform Linears with zero biases, N(0, 0.02) timestep
MLP, zeroed adaLN modulations and output layer, so the initial prediction is
exactly 0), no clipping of x0_hat, and temperature scaling only the per-step
noise (not the initial x_{S-1}).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from heptapod_jax.models import layers

Array = jax.Array
Dtype = Any
# denoise_fn(x_t: float[M, C], t: int32[M] (training timestep index), z: float[M, Z]) -> eps [M, C].
DenoiseFn = Callable[[Array, Array, Array], Array]

SCHEDULES = ('cosine', 'linear')
MAX_BETA = 0.999  # Nichol & Dhariwal's clip of the cosine schedule's last betas.
COSINE_OFFSET = 0.008  # The small offset s of the cosine schedule.
FREQUENCY_EMBEDDING_SIZE = 256  # Sinusoidal timestep features (DiT / MAR).
LN_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
  """The per-token diffusion head (model.diffusion; used when model.tokens='kl').

  width: hidden width of the denoiser MLP.
  depth: number of adaLN residual blocks.
  batch_mul: noise draws (t, eps) per target and training step.
  num_train_steps: T, the length of the training diffusion chain.
  num_sampling_steps: S <= T, steps of the respaced sampling chain.
  temperature: default scale of the per-step sampling noise (1 = plain DDPM;
    0 = the deterministic chain of posterior means).
  schedule: 'cosine' (Nichol & Dhariwal; MAR's choice) or 'linear' (Ho et al.,
    betas 1e-4..0.02 rescaled by 1000 / T).
  """
  width: int = 1024
  depth: int = 3
  batch_mul: int = 4
  num_train_steps: int = 1000
  num_sampling_steps: int = 100
  temperature: float = 1.0
  schedule: str = 'cosine'

  def validate(self) -> None:
    """Raises ValueError naming the first field that is out of range."""
    for name in ('width', 'depth', 'batch_mul', 'num_sampling_steps'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'model.diffusion.{name}={value!r}: must be an int >= 1.')
    t = self.num_train_steps
    if isinstance(t, bool) or not isinstance(t, int) or t < 2:
      raise ValueError(f'model.diffusion.num_train_steps={t!r}: must be an int >= 2.')
    if self.num_sampling_steps > t:
      raise ValueError(f'model.diffusion.num_sampling_steps={self.num_sampling_steps}: must be '
                       f'<= num_train_steps={t} (the sampling chain is a subset of its steps).')
    if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) or \
        not math.isfinite(self.temperature) or self.temperature < 0:
      raise ValueError(f'model.diffusion.temperature={self.temperature!r}: must be a finite '
                       'number >= 0.')
    if self.schedule not in SCHEDULES:
      raise ValueError(f'model.diffusion.schedule={self.schedule!r} is not one of '
                       f'{list(SCHEDULES)}.')


# --------------------------------------------------------------------------- schedules


def cosine_alpha_bar(s: np.ndarray | float) -> np.ndarray:
  """Continuous-time abar(s), s in [0, 1], of the cosine schedule (unnormalised):
  cos^2((s + 0.008) / 1.008 * pi / 2)."""
  return np.cos((np.asarray(s, np.float64) + COSINE_OFFSET) / (1 + COSINE_OFFSET) * np.pi / 2) ** 2


def make_betas(schedule: str, num_steps: int) -> np.ndarray:
  """float64[num_steps] betas of a named schedule.

  cosine: beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999), so that
    prod_{k<=i} (1 - beta_k) = abar((i+1)/T) / abar(0) until the clip (which
    only bites at the last step or two, where abar -> 0).
  linear: Ho et al.'s 1e-4..0.02 over 1000 steps, rescaled by 1000 / T.
  """
  if schedule == 'cosine':
    s = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    ab = cosine_alpha_bar(s)
    return np.minimum(1.0 - ab[1:] / ab[:-1], MAX_BETA)
  if schedule == 'linear':
    scale = 1000.0 / num_steps
    return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)
  raise ValueError(f'model.diffusion.schedule={schedule!r} is not one of {list(SCHEDULES)}.')


def schedule_from_betas(betas: np.ndarray, timesteps: np.ndarray | None = None
                        ) -> dict[str, np.ndarray]:
  """All per-step constants of the chain with these betas (see `schedule_from_alphas_cumprod`)."""
  betas = np.asarray(betas, np.float64)
  if betas.ndim != 1 or betas.shape[0] < 1 or not np.all((betas > 0) & (betas <= 1)):
    raise ValueError(f'betas must be 1-D, non-empty, in (0, 1]; got {betas}.')
  return schedule_from_alphas_cumprod(np.cumprod(1.0 - betas), timesteps, betas=betas)


def schedule_from_alphas_cumprod(alphas_cumprod: np.ndarray, timesteps: np.ndarray | None = None,
                                 *, betas: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """All per-step constants of the chain with these marginals abar_i (float64 numpy, length S).

  Args:
    alphas_cumprod: float64[S], strictly decreasing in (0, 1].
    timesteps: int[S], the training-timestep index the denoiser is called with
      at each step of this chain (default: 0..S-1, the training chain itself).
    betas: the chain's betas if known (the training chain); default
      1 - abar_i / abar_{i-1}, so that a respaced chain keeps abar exactly.
  Returns:
    dict with 'betas', 'alphas_cumprod' (abar_i), 'alphas_cumprod_prev'
    (abar_{i-1}, 1 at i = 0), 'sqrt_alphas_cumprod', 'sqrt_one_minus_alphas_cumprod',
    'sqrt_recip_alphas_cumprod', 'sqrt_recipm1_alphas_cumprod' (for x0 from eps),
    'posterior_variance' (beta_i (1 - abar_{i-1}) / (1 - abar_i), 0 at i = 0),
    'posterior_log_variance_clipped' (its log with the i = 0 entry replaced by
    the i = 1 one, as improved-diffusion does, since log 0 = -inf),
    'posterior_mean_coef1' / 'posterior_mean_coef2' (of x0 and x_i in the
    posterior mean), 'timesteps' (int32).
  """
  ac = np.asarray(alphas_cumprod, np.float64)
  n = ac.shape[0]
  if ac.ndim != 1 or n < 1 or not (np.all(ac > 0) and ac[0] <= 1 and np.all(np.diff(ac) < 0)):
    raise ValueError(f'alphas_cumprod must be 1-D, non-empty, decreasing in (0, 1]; got {ac}.')
  timesteps = np.arange(n) if timesteps is None else np.asarray(timesteps)
  ac_prev = np.append(1.0, ac[:-1])
  # alpha_i = abar_i / abar_{i-1} directly rather than 1 - beta_i: exact where beta_i ~ 1.
  alphas = ac / ac_prev if betas is None else 1.0 - betas
  betas = 1.0 - ac / ac_prev if betas is None else np.asarray(betas, np.float64)
  post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
  # i = 0 has posterior variance 0 (x_0 is then deterministic given x0_hat); its
  # noise is never added, the clipped log only keeps the table finite.
  post_log_var = np.log(np.append(post_var[1], post_var[1:]) if n > 1 else betas)
  return {
      'betas': betas,
      'alphas_cumprod': ac,
      'alphas_cumprod_prev': ac_prev,
      'sqrt_alphas_cumprod': np.sqrt(ac),
      'sqrt_one_minus_alphas_cumprod': np.sqrt(1.0 - ac),
      'sqrt_recip_alphas_cumprod': np.sqrt(1.0 / ac),
      'sqrt_recipm1_alphas_cumprod': np.sqrt(1.0 / ac - 1.0),
      'posterior_variance': post_var,
      'posterior_log_variance_clipped': post_log_var,
      'posterior_mean_coef1': betas * np.sqrt(ac_prev) / (1.0 - ac),
      'posterior_mean_coef2': (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
      'timesteps': timesteps.astype(np.int32),
  }


def make_schedule(config: DiffusionConfig) -> dict[str, np.ndarray]:
  """The training chain: T = num_train_steps steps of `config.schedule` (float64 tables)."""
  return schedule_from_betas(make_betas(config.schedule, config.num_train_steps))


def space_timesteps(num_train_steps: int, num_steps: int) -> np.ndarray:
  """Sorted int[num_steps]: evenly spaced training timesteps, first 0 and last T-1.

  improved-diffusion's `space_timesteps(T, str(num_steps))` with one section
  (MAR passes `timestep_respacing=num_sampling_steps`): round(k * (T-1)/(S-1)),
  with the same accumulated float stride and Python (half-to-even) rounding,
  so the kept steps are identical.
  """
  if not 1 <= num_steps <= num_train_steps:
    raise ValueError(f'cannot respace {num_train_steps} steps to {num_steps}.')
  stride = 1 if num_steps <= 1 else (num_train_steps - 1) / (num_steps - 1)
  cur, kept = 0.0, []
  for _ in range(num_steps):
    kept.append(round(cur))
    cur += stride
  return np.array(sorted(set(kept)), np.int64)


def respace(schedule: dict[str, np.ndarray], timesteps: np.ndarray) -> dict[str, np.ndarray]:
  """The chain over the kept `timesteps` with the same marginals abar.

  beta'_i = 1 - abar[tau_i] / abar[tau_{i-1}] (abar[tau_{-1}] = 1), so that the
  cumulative product of 1 - beta' is abar at the kept steps (improved-diffusion's
  SpacedDiffusion; here abar is kept verbatim rather than re-multiplied).
  """
  return schedule_from_alphas_cumprod(schedule['alphas_cumprod'][timesteps],
                                      schedule['timesteps'][timesteps])


def make_sampling_schedule(config: DiffusionConfig) -> dict[str, np.ndarray]:
  """The respaced chain `sample` runs: num_sampling_steps of the training chain."""
  return respace(make_schedule(config),
                 space_timesteps(config.num_train_steps, config.num_sampling_steps))


def _const(schedule: dict[str, np.ndarray], key: str) -> Array:
  return jnp.asarray(schedule[key], jnp.float32)


# --------------------------------------------------------------------------- training


def q_sample(schedule: dict[str, np.ndarray], x0: Array, t: Array, noise: Array) -> Array:
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; x0, noise: [M, C], t: int[M]."""
  a = _const(schedule, 'sqrt_alphas_cumprod')[t][:, None]
  s = _const(schedule, 'sqrt_one_minus_alphas_cumprod')[t][:, None]
  return a * x0 + s * noise


def training_loss(denoise_fn: DenoiseFn, x0: Array, z: Array, rng: Array,
                  config: DiffusionConfig, *, t: Array | None = None,
                  noise: Array | None = None) -> Array:
  """Epsilon-prediction MSE of targets x0 given conditions z, one value per target.

  Each (x0, z) row is repeated `batch_mul` times (draw-major, like MAR's
  `.repeat(diffusion_batch_mul, 1)`: row k * M + m is draw k of row m), each
  copy gets its own t ~ U{0..T-1} and eps ~ N(0, I), and the squared error
  |eps_theta(x_t, t, z) - eps|^2 is averaged over channels and the draws.

  Args:
    denoise_fn: eps_theta(x_t [R, C], t int32[R], z [R, Z]) -> [R, C], e.g. a
      bound DenoiserMLP or a closure around one.
    x0: float[..., C] targets.
    z: float[..., Z] conditions (same leading shape as x0).
    rng: PRNG key for t and eps.
    config: the diffusion config (T, schedule, batch_mul).
    t: optional int32[batch_mul * M] override of the timesteps (M = rows of x0).
    noise: optional float[batch_mul * M, C] override of eps.
  Returns:
    float32[...]: the loss of each target (the caller masks and averages).
  """
  lead, c = x0.shape[:-1], x0.shape[-1]
  if z.shape[:-1] != lead:
    raise ValueError(f'x0 {x0.shape} and z {z.shape} need the same leading shape.')
  x0 = x0.reshape(-1, c).astype(jnp.float32)
  z = z.reshape(-1, z.shape[-1])
  m, k = x0.shape[0], config.batch_mul
  schedule = make_schedule(config)
  t_rng, noise_rng = jax.random.split(rng)
  if t is None:
    t = jax.random.randint(t_rng, (k * m,), 0, config.num_train_steps, jnp.int32)
  if noise is None:
    noise = jax.random.normal(noise_rng, (k * m, c), jnp.float32)
  x0_rep = jnp.tile(x0, (k, 1))
  z_rep = jnp.tile(z, (k, 1))
  x_t = q_sample(schedule, x0_rep, t, noise)
  eps = denoise_fn(x_t, t, z_rep).astype(jnp.float32)
  mse = jnp.mean(jnp.square(eps - noise), axis=-1)
  return jnp.mean(mse.reshape(k, m), axis=0).reshape(lead)


# --------------------------------------------------------------------------- sampling


def sample(denoise_fn: DenoiseFn, z: Array, rng: Array, config: DiffusionConfig,
           temperature: float | Array | None = None, *, token_dim: int | None = None) -> Array:
  """DDPM ancestral samples x0 ~ p_theta(x0 | z) on the respaced chain (module docstring).

  Variance: MAR learns it (LEARNED_RANGE, an interpolation in log space between
  the posterior variance and beta'_i, trained with a VLB term); this denoiser
  predicts eps only, and the step noise has the fixed posterior ("small")
  variance beta'_i (1 - abar'_{i-1}) / (1 - abar'_i), with improved-diffusion's
  clipped log, the lower end of MAR's learned range. On a short chain this
  under-disperses a little: with the exact eps of the test's 2D mixtures and
  100 of 1000 cosine steps, variances come out ~5-12% low (beta'_i, "fixed
  large", is within ~5% there); `temperature` > 1 can compensate.

  x0_hat is not clipped (latents are unbounded). `temperature` scales the
  noise of every step but not the initial x_{S-1} ~ N(0, I), and the last step
  adds no noise, as in MAR. Jittable; one denoiser call per step inside a
  `lax.fori_loop` (a bound Flax submodule works as denoise_fn there).

  Sensitivity at the start of the chain: the cosine schedule ends at
  abar_{T-1} ~ 2.4e-9 (the 0.999 clip), so the first step's mean is
  ~ sqrt(abar'_{S-2} / abar'_{S-1}) times the eps error at t = T-1 away from
  the right one: x316 for 100 of 1000 steps, x632 for 50, x32 for all 1000.
  A head whose eps at t = T-1 is off by ~1% (a briefly trained one) therefore
  produces exploding samples; MAR's sampler has the same property. The
  linear schedule (abar_{T-1} ~ 4e-5) has no such step.

  Args:
    denoise_fn: as in `training_loss`; called with the ORIGINAL timestep index.
    z: float[..., Z] conditions.
    rng: PRNG key (initial noise and the per-step noise).
    config: the diffusion config.
    temperature: noise scale (float or scalar array); None = config.temperature.
    token_dim: C; default `denoise_fn.token_dim` (a DenoiserMLP has it).
  Returns:
    float32[..., C] samples.
  """
  lead = z.shape[:-1]
  z = z.reshape(-1, z.shape[-1])
  m = z.shape[0]
  if temperature is None:
    temperature = config.temperature
  sched = make_sampling_schedule(config)
  n = int(sched['timesteps'].shape[0])
  timesteps = jnp.asarray(sched['timesteps'], jnp.int32)
  recip = _const(sched, 'sqrt_recip_alphas_cumprod')
  recipm1 = _const(sched, 'sqrt_recipm1_alphas_cumprod')
  coef1, coef2 = _const(sched, 'posterior_mean_coef1'), _const(sched, 'posterior_mean_coef2')
  std = jnp.exp(0.5 * _const(sched, 'posterior_log_variance_clipped'))
  c = token_dim if token_dim is not None else getattr(denoise_fn, 'token_dim', None)
  if not isinstance(c, int):
    raise ValueError('sample: pass token_dim=C for a denoise_fn without an int `token_dim`.')
  init_rng, loop_rng = jax.random.split(rng)
  x = jax.random.normal(init_rng, (m, c), jnp.float32)
  temperature = jnp.asarray(temperature, jnp.float32)

  def step(j, x):
    i = n - 1 - j
    t = jnp.full((m,), timesteps[i], jnp.int32)
    eps = denoise_fn(x, t, z).astype(jnp.float32)
    x0_hat = recip[i] * x - recipm1[i] * eps
    mean = coef1[i] * x0_hat + coef2[i] * x
    noise = jax.random.normal(jax.random.fold_in(loop_rng, i), x.shape, jnp.float32)
    return mean + jnp.where(i > 0, std[i] * temperature, 0.0) * noise

  x = jax.lax.fori_loop(0, n, step, x)
  return x.reshape(*lead, c)


# --------------------------------------------------------------------------- the denoiser


def timestep_embedding(t: Array, dim: int = FREQUENCY_EMBEDDING_SIZE,
                       max_period: float = 10000.0) -> Array:
  """Sinusoidal features of t: [M] -> float32[M, dim] (GLIDE / DiT / MAR).

  [cos(t f_k), sin(t f_k)] for k < dim / 2, f_k = max_period^(-k / (dim / 2)); t is
  the raw training-timestep index (0..T-1), not rescaled.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def _layer_norm(x: Array, eps: float = LN_EPS) -> Array:
  """LayerNorm without affine parameters, computed in float32, output in x's dtype."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
  return x * (1 + scale) + shift


class Linear(nn.Module):
  """Linear with bias (MAR's nn.Linear); kernel and bias carry logical axis names.

  The kernel is [in, features] with logical axes `axes`; the bias takes the
  output axis name.
  """
  features: int
  axes: tuple[str | None, str | None]
  kernel_init: Callable[..., Array] = nn.initializers.xavier_uniform()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param('kernel', nn.with_logical_partitioning(self.kernel_init, self.axes),
                        (x.shape[-1], self.features), self.param_dtype)
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                      (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return jnp.einsum('...d,df->...f', x, kernel) + bias


class ResBlock(nn.Module):
  """x + gate(c) * MLP(LN(x) * (1 + scale(c)) + shift(c)); shift/scale/gate zero at init."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, c: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    mod = Linear(3 * width, ('embed', 'mlp'), nn.initializers.zeros, name='modulation', **kw)(
        nn.silu(c))
    shift, scale, gate = jnp.split(mod, 3, axis=-1)
    h = _modulate(_layer_norm(x), shift, scale)
    h = Linear(width, ('embed', 'mlp'), name='mlp_in', **kw)(h)
    h = layers.constrain(nn.silu(h), ('batch', 'act_mlp'))
    h = Linear(width, ('mlp', 'embed'), name='mlp_out', **kw)(h)
    return layers.constrain(x + gate * h, ('batch', 'act_embed'))


class DenoiserMLP(nn.Module):
  """MAR's SimpleMLPAdaLN: eps_theta(x_t, t, z) for one continuous token per row.

  x_t [M, C] -> Linear(C -> W); t [M] (training timestep index) -> 256
  sinusoidal features -> Linear -> SiLU -> Linear (W); z [M, Z] -> Linear(Z -> W);
  c = t_emb + z_emb conditions `depth` adaLN residual blocks and an adaLN final
  layer (LN without affine, shift/scale from Linear(SiLU(c))), then
  Linear(W -> C). The modulations and the output layer start at zero, so the
  initial prediction is exactly 0. Matmuls in `dtype`; output float32.
  """
  config: DiffusionConfig
  token_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_t: Array, t: Array, z: Array) -> Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    w = cfg.width
    if x_t.shape[-1] != self.token_dim:
      raise ValueError(f'DenoiserMLP: x_t has {x_t.shape[-1]} channels, '
                       f'token_dim={self.token_dim}.')
    t_init = nn.initializers.normal(stddev=0.02)
    x = Linear(w, (None, 'embed'), name='input_proj', **kw)(x_t.astype(self.dtype))
    t_emb = timestep_embedding(t).astype(self.dtype)
    t_emb = Linear(w, (None, 'mlp'), t_init, name='time_mlp_in', **kw)(t_emb)
    t_emb = Linear(w, ('mlp', 'embed'), t_init, name='time_mlp_out', **kw)(nn.silu(t_emb))
    z_emb = Linear(w, (None, 'embed'), name='cond_proj', **kw)(z.astype(self.dtype))
    c = layers.constrain(t_emb + z_emb, ('batch', 'act_embed'))
    x = layers.constrain(x, ('batch', 'act_embed'))
    for i in range(cfg.depth):
      x = ResBlock(name=f'block_{i}', **kw)(x, c)
    mod = Linear(2 * w, ('embed', 'mlp'), nn.initializers.zeros, name='final_modulation', **kw)(
        nn.silu(c))
    shift, scale = jnp.split(mod, 2, axis=-1)
    x = _modulate(_layer_norm(x), shift, scale)
    out = Linear(self.token_dim, ('embed', None), nn.initializers.zeros, name='output', **kw)(x)
    return out.astype(jnp.float32)
