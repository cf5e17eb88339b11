"""DDPM and DDIM(η) schedulers with diffusers' numerics, as pure JAX functions over per-step coefficient tables.

A diffusers scheduler config (``scheduler/scheduler_config.json``) fixes the training schedule
β_1..β_T (``linear``, ``scaled_linear`` or ``squaredcos_cap_v2``; Ho et al. 2020, Nichol & Dhariwal 2021) and
ᾱ_t = Π_{i≤t}(1 − β_i), indexed like diffusers by the timestep t ∈ 0..T−1. ``set_timesteps(S)`` picks S of the T
timesteps t_0 > … > t_{S−1} (``leading``, ``trailing`` or ``linspace`` spacing, Lin et al. 2024 table 2) and
tabulates, for each sampling step k, the coefficients of its Gaussian reverse kernel

    x_prev ~ N( a_k x̂₀ + b_k x_t + c_k ε̂ ,  σ_k² I ),

with x̂₀, ε̂ read from the network output by the prediction type (ε: x̂₀ = (x − √(1−ᾱ) ε̂)/√ᾱ; v: x̂₀ =
√ᾱ x − √(1−ᾱ) v̂, ε̂ = √ᾱ v̂ + √(1−ᾱ) x; sample: ε̂ = (x − √ᾱ x̂₀)/√(1−ᾱ)) and x̂₀ clipped to ±clip_sample_range
when ``clip_sample``. The two kernels, as diffusers writes them (with t' the previous timestep, ᾱ_{t'<0} = 1
for DDPM and ``final_alpha_cumprod`` for DDIM):

* DDPM (Ho et al. 2020, eqs. 6–7): t' = t_{k+1} (−1 after the last), β = 1 − ᾱ_t/ᾱ_{t'},
  a = √ᾱ_{t'} β/(1−ᾱ_t), b = √(1−β)(1−ᾱ_{t'})/(1−ᾱ_t), c = 0, σ² = max((1−ᾱ_{t'})/(1−ᾱ_t)·β, 1e−20)
  (``fixed_small``) or β (``fixed_large``), and no noise when t = 0.
* DDIM (Song et al. 2021, eq. 12): t' = t − T//S, σ = η √((1−ᾱ_{t'})/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_{t'})),
  a = √ᾱ_{t'}, b = 0, c = √(1−ᾱ_{t'}−σ²) with ε̂ the *unclipped* prediction (diffusers' default
  ``use_clipped_model_output=False``; with True, ε̂ is recomputed from the clipped x̂₀).

:func:`step` is diffusers' ``step`` with the variance noise passed in; :func:`moments` gives the kernel's mean
and σ, so that the step is the numpyro ``Normal`` of :mod:`models.diffusers.program`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["SchedulerConfig", "Schedule", "scheduler_from_config", "set_timesteps", "convert", "predict", "moments", "step",
           "BETA_SCHEDULES", "PREDICTION_TYPES", "VARIANCE_TYPES", "SPACINGS"]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
VARIANCE_TYPES = ("fixed_small", "fixed_large")
SPACINGS = ("leading", "trailing", "linspace")
_KINDS = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim"}
_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "variance_type",
           "clip_sample", "clip_sample_range", "prediction_type", "timestep_spacing", "steps_offset",
           "set_alpha_to_one", "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
           "rescale_betas_zero_snr")
_IGNORED = ("_class_name", "_diffusers_version")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The training schedule and sampling rules of a DDPM or DDIM scheduler (diffusers' defaults)."""

    kind: str = "ddpm"  # "ddpm" | "ddim"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Optional[tuple] = None
    variance_type: str = "fixed_small"  # DDPM only
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True  # DDIM only

    def __post_init__(self):
        for name, value, allowed in (("kind", self.kind, ("ddpm", "ddim")),
                                     ("beta_schedule", self.beta_schedule, BETA_SCHEDULES),
                                     ("prediction_type", self.prediction_type, PREDICTION_TYPES),
                                     ("variance_type", self.variance_type, VARIANCE_TYPES),
                                     ("timestep_spacing", self.timestep_spacing, SPACINGS)):
            if value not in allowed:
                raise ValueError(f"unsupported scheduler setting {name}={value!r}; supported: {', '.join(allowed)}")
        if not (isinstance(self.num_train_timesteps, int) and self.num_train_timesteps >= 1):
            raise ValueError(f"num_train_timesteps must be an int >= 1; got {self.num_train_timesteps!r}")
        if self.clip_sample and not self.clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be > 0; got {self.clip_sample_range}")
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise ValueError(f"trained_betas has {len(self.trained_betas)} entries; num_train_timesteps is "
                             f"{self.num_train_timesteps}")

    def betas(self) -> np.ndarray:
        """β_t [T] float32, as diffusers builds them."""
        T = self.num_train_timesteps
        if self.trained_betas is not None:
            return np.asarray(self.trained_betas, np.float32)
        if self.beta_schedule == "linear":
            return np.linspace(self.beta_start, self.beta_end, T, dtype=np.float64).astype(np.float32)
        if self.beta_schedule == "scaled_linear":
            return (np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, T, dtype=np.float64)
                    .astype(np.float32) ** 2)
        # squaredcos_cap_v2: ᾱ(τ) = cos²((τ + 0.008)/1.008 · π/2), β_i = min(1 − ᾱ((i+1)/T)/ᾱ(i/T), 0.999)
        abar = lambda tau: math.cos((tau + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.asarray([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], np.float32)

    def alphas_cumprod(self) -> np.ndarray:
        """ᾱ_t [T] float32 (cumulative product in float32, as torch does)."""
        return np.cumprod((1.0 - self.betas()).astype(np.float32), dtype=np.float32)

    def timesteps(self, num_inference_steps: int) -> np.ndarray:
        """diffusers' ``set_timesteps``: S timesteps in decreasing order (int64)."""
        T, S = self.num_train_timesteps, num_inference_steps
        if isinstance(S, bool) or not isinstance(S, (int, np.integer)) or not 1 <= S <= T:
            raise ValueError(f"num_inference_steps must be an int in [1, {T}] (the trained steps); got {S!r}")
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, T - 1, S).round()[::-1].astype(np.int64)
        elif self.timestep_spacing == "leading":
            ts = (np.arange(0, S) * (T // S)).round()[::-1].astype(np.int64) + self.steps_offset
        else:
            ts = np.round(np.arange(T, 0, -T / S)).astype(np.int64) - 1
        if ts.min() < 0 or ts.max() >= T:
            raise ValueError(f"timesteps {ts.tolist()} leave [0, {T}) (steps_offset={self.steps_offset})")
        return ts.copy()


def scheduler_from_config(config: dict, kind: Optional[str] = None) -> SchedulerConfig:
    """A :class:`SchedulerConfig` from a diffusers ``scheduler_config.json`` dict. ``kind`` ("ddpm" or "ddim")
    overrides ``_class_name`` (e.g. DDIM sampling of a DDPM checkpoint). Unknown fields and unsupported
    settings (``thresholding``, ``rescale_betas_zero_snr``, other variance types) raise ``ValueError``."""
    if not isinstance(config, dict):
        raise ValueError(f"scheduler config must be a dict; got {type(config).__name__}")
    unknown = sorted(set(config) - set(_FIELDS) - set(_IGNORED))
    if unknown:
        raise ValueError(f"unsupported scheduler config field(s) {unknown}; supported: {', '.join(_FIELDS)}")
    if kind is None:
        name = config.get("_class_name", "DDPMScheduler")
        if name not in _KINDS:
            raise ValueError(f"unsupported scheduler class {name!r}; supported: {', '.join(_KINDS)} (or pass kind=)")
        kind = _KINDS[name]
    for flag in ("thresholding", "rescale_betas_zero_snr"):
        if config.get(flag):
            raise ValueError(f"unsupported scheduler setting {flag}=True (only False is supported)")
    fields = {k: v for k, v in config.items() if k in {f.name for f in dataclasses.fields(SchedulerConfig)}}
    if fields.get("trained_betas") is not None:
        fields["trained_betas"] = tuple(float(b) for b in fields["trained_betas"])
    return SchedulerConfig(kind=kind, **fields)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
    """A scheduler set to S sampling steps: per-step tables [S] and the rules that read the network output.

    ``timesteps`` (int32, the network's t), ``alpha_bar`` ᾱ_{t_k}, the kernel coefficients ``coef_x0`` (a),
    ``coef_sample`` (b), ``coef_eps`` (c), ``std`` (σ); ``alphas_cumprod`` [T]. Static: ``prediction_type``,
    ``clip_range`` (None: no clipping), ``kind``, ``eta``, ``use_clipped_model_output``; ``stochastic`` says
    whether any step has noise.
    """

    timesteps: jax.Array
    alpha_bar: jax.Array
    coef_x0: jax.Array
    coef_sample: jax.Array
    coef_eps: jax.Array
    std: jax.Array
    alphas_cumprod: jax.Array
    prediction_type: str = dataclasses.field(metadata=dict(static=True))
    clip_range: Optional[float] = dataclasses.field(metadata=dict(static=True))
    kind: str = dataclasses.field(metadata=dict(static=True))
    eta: float = dataclasses.field(metadata=dict(static=True))
    use_clipped_model_output: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def stochastic(self) -> bool:
        return bool(np.any(np.asarray(self.std) > 0))


def set_timesteps(config: SchedulerConfig, num_inference_steps: int, eta: float = 0.0,
                  use_clipped_model_output: bool = False) -> Schedule:
    """The :class:`Schedule` of ``config`` at S = ``num_inference_steps`` steps; ``eta`` (DDIM only, diffusers'
    default 0: deterministic) and ``use_clipped_model_output`` are the DDIM ``step`` arguments."""
    ts = config.timesteps(num_inference_steps)
    # float32 throughout, in diffusers' order of operations: near ᾱ → 0 the DDIM direction coefficient
    # √(1 − ᾱ_{t'} − σ²) is a cancellation whose float32 rounding is part of diffusers' numerics
    acp = config.alphas_cumprod()
    one, T, S = np.float32(1.0), config.num_train_timesteps, len(ts)
    eta = float(eta)
    if config.kind == "ddpm":
        if eta != 0.0 or use_clipped_model_output:
            raise ValueError("eta and use_clipped_model_output are DDIM settings; DDPM's noise is fixed")
        prev = np.append(ts[1:], -1)
        ab_prev = np.where(prev >= 0, acp[np.maximum(prev, 0)], one).astype(np.float32)
    else:
        if not (np.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta must be finite and >= 0; got {eta}")
        prev = ts - T // S
        final = one if config.set_alpha_to_one else acp[0]
        ab_prev = np.where(prev >= 0, acp[np.maximum(prev, 0)], final).astype(np.float32)
    ab = acp[ts]
    zeros = np.zeros(S, np.float32)
    if config.kind == "ddpm":
        cur_alpha = ab / ab_prev
        beta = one - cur_alpha
        a = ab_prev ** 0.5 * beta / (one - ab)
        b = cur_alpha ** 0.5 * (one - ab_prev) / (one - ab)
        c = zeros
        var = (np.maximum((one - ab_prev) / (one - ab) * beta, np.float32(1e-20))
               if config.variance_type == "fixed_small" else beta)
        std = np.where(ts > 0, var ** 0.5, zeros)
    else:
        std = np.float32(eta) * ((one - ab_prev) / (one - ab) * (one - ab / ab_prev)) ** 0.5
        a, b = ab_prev ** 0.5, zeros
        c = (one - ab_prev - std ** 2) ** 0.5
    f32 = lambda v: jnp.asarray(np.asarray(v, np.float32))
    return Schedule(jnp.asarray(ts, jnp.int32), f32(ab), f32(a), f32(b), f32(c), f32(std), f32(acp),
                    config.prediction_type, float(config.clip_sample_range) if config.clip_sample else None,
                    config.kind, eta, bool(use_clipped_model_output))


def convert(schedule: Schedule, alpha_bar, model_output: jax.Array, sample: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x̂₀ clipped as configured, ε̂ unclipped unless ``use_clipped_model_output``) from the network output at
    a point whose ᾱ is ``alpha_bar``."""
    sa, sb = jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)
    if schedule.prediction_type == "epsilon":
        x0, eps = (sample - sb * model_output) / sa, model_output
    elif schedule.prediction_type == "v_prediction":
        x0, eps = sa * sample - sb * model_output, sa * model_output + sb * sample
    else:
        x0 = model_output
        eps = (sample - sa * x0) / sb
    if schedule.clip_range is not None:
        x0 = jnp.clip(x0, -schedule.clip_range, schedule.clip_range)
    if schedule.use_clipped_model_output:  # DDIM's option: ε̂ recomputed from the clipped x̂₀
        eps = (sample - sa * x0) / sb
    return x0, eps


def predict(schedule: Schedule, k, model_output: jax.Array, sample: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x̂₀, ε̂) at sampling step k (see :func:`convert`)."""
    return convert(schedule, schedule.alpha_bar[k], model_output, sample)


def moments(schedule: Schedule, k, x0: jax.Array, eps: jax.Array, sample: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean a_k x̂₀ + b_k x_t + c_k ε̂ and std σ_k [] of the reverse kernel at sampling step k."""
    mean = schedule.coef_x0[k] * x0 + schedule.coef_sample[k] * sample + schedule.coef_eps[k] * eps
    return mean, schedule.std[k]


def step(schedule: Schedule, k, model_output: jax.Array, sample: jax.Array,
         noise: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """diffusers' ``scheduler.step(model_output, timesteps[k], sample)`` with variance noise ``noise`` (standard
    normal, the sample's shape; None: no noise) → (prev_sample, pred_original_sample x̂₀)."""
    x0, eps = predict(schedule, k, model_output, sample)
    mean, std = moments(schedule, k, x0, eps, sample)
    return (mean if noise is None else mean + std * noise), x0

