"""Static (one-shot) programs as bases: genjax generative functions and numpyro models, tilted by a reward.

A static program draws its random choices z in one call; with optional observed values c (``constraints=``)
its joint density is p(z, c). :func:`tilt_static` builds

    σ(z) = p(z, c) · exp(r(f(z))/β) / Z,     Z = ∫ p(z, c) exp(r(f(z))/β) dz,

where f(z) is the program's return value (``reward_on="retval"``, default) or its choice map
(``reward_on="choices"``: latent choices merged with the constraints). Without constraints Z = E_{p₀}[e^{r/β}],
as for sequential programs; with them Z = p(c)·E_{p(z|c)}[e^{r/β}].

Adapters put both languages behind one small interface (one particle; the samplers vmap):

  ``init(key) -> (z, log_w0, draw)``: z ~ p(z | c) drawn forward through the program (constrained sites held
      at their values), ``log_w0 = log p(c | z)`` (genjax's ``generate`` weight; numpyro's observed-site
      log-likelihood), ``draw`` the :class:`Draw` (choices, retval).
  ``evaluate(z) -> (log p(z, c), draw)``: the joint density in the space where z lives (for numpyro the
      unconstrained space, Jacobian included, so MCMC moves need no boundaries; genjax choices are moved in
      their own space, a proposal outside the support having density 0).

:func:`importance_sampling` weights prior draws (or draws of a user proposal program q) by
w = p(z, c) e^{r/β} / q(z): Ẑ = mean(w) is unbiased for Z. Reward-tempered SMC is in :mod:`pplalign.tempered`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from ._filter_jit import filter_jit
from ._numerics import log_mean_exp_safe as log_mean_exp
from ._numerics import sanitize_log as _sanitize
from ._validation import check_count, check_key
from .distributed import check_mesh, constrain_particles
from .particles import Particles, mark_invalid_beta, raise_on_nonfinite
from .programs import safe_beta, validate_beta

__all__ = [
    "Draw",
    "StaticTilted",
    "GenJAXProgram",
    "NumPyroProgram",
    "tilt_static",
    "importance_sampling",
    "is_genjax",
    "address_paths",
    "nan_sites",
]


class Draw(NamedTuple):
    """One draw of a static program: its choices (latent choices merged with the constraints, in the
    program's own space: a nested dict of addresses for genjax, a site-name dict for numpyro) and its return
    value. ``Particles.samples`` of static targets is a ``Draw`` with a leading particle axis."""

    choices: Any
    retval: Any


# --- addresses ------------------------------------------------------------------------------------


def address_paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    """Every leaf address of a nested dict of choices, as tuples of keys."""
    if isinstance(tree, dict):
        out = []
        for k, v in tree.items():
            out.extend(address_paths(v, prefix + (k,)))
        return out
    return [prefix]


def _fmt(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _remove(tree: dict, constraints: dict) -> dict:
    """``tree`` without the addresses present in ``constraints`` (nested dicts)."""
    out = {}
    for k, v in tree.items():
        if k in constraints:
            if isinstance(v, dict) and isinstance(constraints[k], dict):
                rest = _remove(v, constraints[k])
                if rest:
                    out[k] = rest
            continue
        out[k] = v
    return out


def _select(tree: dict, like: dict) -> dict:
    """The part of ``tree`` at the addresses of ``like`` (nested dicts)."""
    return {k: _select(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in like.items()}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if k in out and isinstance(out[k], dict) and isinstance(v, dict) else v
    return out


def _check_constraints(constraints: dict, choices_shape: Any, program_name: str) -> None:
    have = set(address_paths(choices_shape))
    prefixes = {p[:i] for p in have for i in range(1, len(p) + 1)}
    for path in address_paths(constraints):
        if path not in have:
            hint = " (it names a sub-program, not a choice)" if path in prefixes else ""
            raise ValueError(
                f"constraint address {_fmt(path)!r} is not a random choice of program {program_name!r}{hint}; "
                f"its addresses are {sorted(_fmt(p) for p in have)}"
            )


def _name(obj: Any) -> str:
    src = getattr(obj, "source", None)
    src = getattr(src, "value", src)
    for o in (src, obj):
        n = getattr(o, "__qualname__", None) or getattr(o, "__name__", None)
        if n:
            return n
    return type(obj).__name__


# --- genjax -----------------------------------------------------------------------------------------


def is_genjax(program: Any) -> bool:
    try:
        import genjax
    except ImportError:  # pragma: no cover - genjax is a dependency
        return False
    return isinstance(program, genjax.GFI)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GenJAXProgram:
    """A genjax generative function with its arguments and observed values.

    ``init`` runs ``generate(constraints, *args)``: the unconstrained choices are drawn from their prior
    conditionals (genjax's internal proposal for ``@gen`` functions) and the weight is log p(c | z).
    ``evaluate`` is ``assess`` of the merged choice map: log p(z, c) and the return value.
    """

    gen_fn: Any
    args: tuple
    constraints: dict

    def init(self, key):
        import genjax

        if self.constraints:
            tr, w = genjax.seed(self.gen_fn.generate)(key, self.constraints, *self.args)
        else:
            tr = genjax.seed(self.gen_fn.simulate)(key, *self.args)
            w = jnp.zeros((), jnp.float32)
        choices = tr.get_choices()
        z = _remove(choices, self.constraints) if self.constraints else choices
        # genjax leaves densities of vector-valued choices per element: sum them.
        return z, jnp.sum(jnp.asarray(w, jnp.float32)), Draw(choices, tr.get_retval())

    def evaluate(self, z):
        choices = _merge(z, self.constraints) if self.constraints else z
        log_p, retval = self.gen_fn.assess(choices, *self.args)
        return jnp.sum(jnp.asarray(log_p, jnp.float32)), Draw(choices, retval)

    def propose(self, proposal, key):
        """Draw z from a genjax proposal program called with the same args; returns (z, log q(z))."""
        import genjax

        tr = genjax.seed(proposal.simulate)(key, *self.args)
        return tr.get_choices(), -jnp.sum(jnp.asarray(tr.get_score(), jnp.float32))

    def choice_shapes(self):
        import genjax

        key = jax.random.key(0)
        return jax.eval_shape(lambda k: genjax.seed(self.gen_fn.simulate)(k, *self.args).get_choices(), key)


# --- numpyro ----------------------------------------------------------------------------------------


def _numpyro_run(model, args, kwargs, key, substitute_fn=None, data=None):
    """Run a numpyro model under seed/condition/substitute/trace; returns (trace, retval)."""
    from numpyro import handlers

    m = handlers.seed(model, rng_seed=key)
    if data:
        m = handlers.condition(m, data=data)
    if substitute_fn is not None:
        m = handlers.substitute(m, substitute_fn=substitute_fn)
    tr = handlers.trace(m)
    retval = tr(*args, **kwargs)
    return tr.trace, retval


def _site_log_prob(site) -> jax.Array:
    lp = jnp.sum(site["fn"].log_prob(site["value"]))
    if site.get("scale") is not None:
        lp = lp * site["scale"]
    return lp


def _is_latent(site) -> bool:
    return site["type"] == "sample" and not site["is_observed"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NumPyroProgram:
    """A numpyro model with its arguments and observed values (``numpyro.handlers.condition``).

    z holds every latent sample site in the unconstrained space, u = T⁻¹(value) with T =
    ``biject_to(support)`` (discrete sites stay as they are), so that
    log p(z, c) = Σ_sites log p(value) + Σ_latent log|det ∂T(u)/∂u|. ``init`` runs the model forward:
    its weight log p(c | z) sums the observed sites (``obs=`` and ``constraints``) and ``numpyro.factor``
    terms, so sampling from the model's prior and weighting by them targets the model's joint.
    """

    model: Any
    args: tuple
    kwargs: dict
    constraints: dict

    def init(self, key):
        from numpyro.distributions.transforms import biject_to

        trace, retval = _numpyro_run(self.model, self.args, self.kwargs, key, data=self.constraints)
        z, choices = {}, {}
        log_w = jnp.zeros((), jnp.float32)
        for name, site in trace.items():
            if site["type"] != "sample":
                continue
            if _is_latent(site):
                value = site["value"]
                choices[name] = value
                z[name] = value if site["fn"].support.is_discrete else biject_to(site["fn"].support).inv(value)
            else:
                log_w = log_w + _site_log_prob(site)
                if name in self.constraints:
                    choices[name] = site["value"]
        return z, log_w, Draw(choices, retval)

    def evaluate(self, z):
        from numpyro.distributions.transforms import biject_to

        def constrain(site):
            u = z[site["name"]]
            return u if site["fn"].support.is_discrete else biject_to(site["fn"].support)(u)

        key = jax.random.key(0)  # every latent is substituted, so the seed is never used
        trace, retval = _numpyro_run(self.model, self.args, self.kwargs, key, constrain, self.constraints)
        log_p = jnp.zeros((), jnp.float32)
        choices = {}
        for name, site in trace.items():
            if site["type"] != "sample":
                continue
            log_p = log_p + _site_log_prob(site)
            if _is_latent(site):
                if name not in z:
                    raise ValueError(f"numpyro model {_name(self.model)!r} has a latent site {name!r} not in z")
                choices[name] = site["value"]
                if not site["fn"].support.is_discrete:
                    t = biject_to(site["fn"].support)
                    log_p = log_p + jnp.sum(t.log_abs_det_jacobian(z[name], site["value"]))
            elif name in self.constraints:
                choices[name] = site["value"]
        return log_p, Draw(choices, retval)

    def propose(self, proposal, key):
        """Draw from a numpyro proposal model (a guide) called with the same args; returns (z, log q(z)) with
        z unconstrained. log q is the density of u = T⁻¹(value), so the Jacobians cancel in p/q."""
        from numpyro.distributions.transforms import biject_to

        trace, _ = _numpyro_run(proposal, self.args, self.kwargs, key)
        z = {}
        log_q = jnp.zeros((), jnp.float32)
        for name, site in trace.items():
            if not _is_latent(site):
                continue
            value = site["value"]
            log_q = log_q + _site_log_prob(site)
            if site["fn"].support.is_discrete:
                z[name] = value
            else:
                t = biject_to(site["fn"].support)
                z[name] = t.inv(value)
                log_q = log_q + jnp.sum(t.log_abs_det_jacobian(z[name], value))
        return z, log_q

    def choice_shapes(self):
        def shapes(k):
            trace, _ = _numpyro_run(self.model, self.args, self.kwargs, k)
            return {n: s["value"] for n, s in trace.items() if s["type"] == "sample" and not s["is_observed"]}

        return jax.eval_shape(shapes, jax.random.key(0))


# --- the target ---------------------------------------------------------------------------------------


@jax.tree_util.register_pytree_node_class
class StaticTilted:
    """σ(z) ∝ p(z, c)·exp(reward(f(z))/β) for a static program (see the module docstring).

    A pytree (program arrays, reward and β are children; ``reward_on`` is static), so it passes through jit
    and can be built under ``vmap`` for many β or prompts.
    """

    def __init__(self, program: Any, reward: Callable, beta: Any, reward_on: str = "retval"):
        self.program = program
        self.reward = reward
        self.beta = beta if isinstance(beta, jax.core.Tracer) else jnp.asarray(beta, jnp.float32)
        self.reward_on = reward_on

    def log_potential(self, draw: Draw) -> jax.Array:
        """r(f(z))/β, for one particle."""
        value = jnp.asarray(self.reward(draw.retval if self.reward_on == "retval" else draw.choices))
        if value.shape != ():
            raise ValueError(
                f"reward {_name(self.reward)!r} must return a scalar per sample; got shape {value.shape} "
                f"from the program's {self.reward_on}"
            )
        return value / safe_beta(self.beta)

    def tree_flatten(self):
        return (self.program, self.reward, self.beta), self.reward_on

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = cls.__new__(cls)
        obj.program, obj.reward, obj.beta = children
        obj.reward_on = aux
        return obj

    def __repr__(self) -> str:
        return f"StaticTilted(program={type(self.program).__name__}, reward={_name(self.reward)!r}, beta={self.beta})"


def tilt_static(
    program: Any,
    reward: Callable,
    beta: Any = 1.0,
    *,
    args: tuple = (),
    kwargs: Optional[dict] = None,
    constraints: Optional[dict] = None,
    reward_on: str = "retval",
) -> StaticTilted:
    """σ ∝ p(z, constraints)·exp(reward(·)/β) for a genjax generative function or a numpyro model.

    Args:
      program: a genjax generative function (``@gen``) or a numpyro model (a callable using
        ``numpyro.sample``); an adapter with ``init``/``evaluate`` (see the module docstring) is used as is.
      reward: ``reward(x) -> []`` for one sample x (the return value, or the choice map).
      beta: β > 0.
      args, kwargs: the program's arguments (kwargs: numpyro only).
      constraints: observed values by address (nested dicts for genjax, site names for numpyro).
      reward_on: ``"retval"`` or ``"choices"``.

    Raises ValueError (naming the culprit) for a program without random choices, a constraint address the
    program lacks, or a reward that does not return a scalar per sample.
    """
    validate_beta(beta)
    if reward_on not in ("retval", "choices"):
        raise ValueError(f"reward_on must be 'retval' or 'choices'; got {reward_on!r}")
    if not isinstance(args, tuple):
        raise ValueError(f"args must be a tuple of the program's arguments; got {type(args).__name__}")
    constraints = dict(constraints or {})
    name = _name(program)
    if is_genjax(program):
        if kwargs:
            raise ValueError("kwargs are for numpyro models; pass a genjax program's arguments as args=(...)")
        adapter = GenJAXProgram(program, args, constraints)
    elif hasattr(program, "init") and hasattr(program, "evaluate"):
        adapter = program
    elif callable(program):
        adapter = NumPyroProgram(program, args, dict(kwargs or {}), constraints)
    else:
        raise ValueError(
            f"tilt expects a Sequential program, a genjax generative function or a numpyro model; got {type(program).__name__}"
        )

    if isinstance(adapter, (GenJAXProgram, NumPyroProgram)):
        shapes = adapter.choice_shapes()
        if constraints:
            _check_constraints(constraints, shapes, name)
        latent = _remove(shapes, constraints) if isinstance(shapes, dict) else shapes
        if not jax.tree_util.tree_leaves(latent):
            what = "random choices" if not constraints else "random choices left once the constraints are fixed"
            raise ValueError(f"program {name!r} makes no {what}; there is nothing to sample")
    target = StaticTilted(adapter, reward, beta, reward_on)
    # Check the reward's output shape once, abstractly (no FLOPs).
    _, _, draw = jax.eval_shape(adapter.init, jax.random.key(0))
    jax.eval_shape(target.log_potential, draw)
    return target


# --- importance sampling ------------------------------------------------------------------------------


def nan_sites(program: Any, z: Any) -> list[str]:
    """The sites whose log density is NaN at one particle's choices z (eager; for error messages).

    numpyro: every sample site's log-probability (and the Jacobian of latent sites) is evaluated at z in the
    trace of ``evaluate``; a site is named when that is NaN or its value is. genjax gives one score for the whole choice map, so there the sites named are
    those whose *value* is NaN ([] when the NaN comes from a parameter, not a value)."""
    if isinstance(program, NumPyroProgram):
        from numpyro.distributions.distribution import validation_enabled
        from numpyro.distributions.transforms import biject_to

        def constrain(site):
            u = z[site["name"]]
            return u if site["fn"].support.is_discrete else biject_to(site["fn"].support)(u)

        with validation_enabled(False):  # the bad parameter should be named, not refused by its distribution
            trace, _ = _numpyro_run(program.model, program.args, program.kwargs, jax.random.key(0), constrain,
                                    program.constraints)
        bad = []
        for name, site in trace.items():
            if site["type"] != "sample":
                continue
            lp = _site_log_prob(site)
            if _is_latent(site) and not site["fn"].support.is_discrete:
                lp = lp + jnp.sum(biject_to(site["fn"].support).log_abs_det_jacobian(z[name], site["value"]))
            # a NaN parameter shows as a NaN log-probability, or as a NaN draw (scored −inf by numpyro)
            if bool(jnp.isnan(lp)) or bool(jnp.any(jnp.isnan(site["value"]))):
                bad.append(name)
        return bad
    choices = _merge(z, program.constraints) if program.constraints else z
    flat = jax.tree_util.tree_flatten_with_path(choices)[0]
    return [_fmt(tuple(getattr(k, "key", k) for k in path)) for path, leaf in flat if bool(jnp.any(jnp.isnan(leaf)))]


def check_static_inputs(target: Any, num_particles: Any, mesh=None, *, key: Any = None) -> int:
    """The checks of the static samplers (those of :func:`pplalign._validation.check_inputs`); returns N."""
    if not isinstance(target, StaticTilted):
        raise ValueError(
            f"target must come from pplalign.tilt(program, reward, beta) of a static program; got {type(target).__name__}"
        )
    validate_beta(target.beta)
    if key is not None:
        check_key(key)
    num_particles = check_count(num_particles, "num_particles")
    check_mesh(mesh, num_particles)
    return num_particles


def _check_proposal_covers(target: StaticTilted, proposal: Any) -> None:
    z_shape = jax.eval_shape(lambda k: target.program.init(k)[0], jax.random.key(0))
    q_shape = jax.eval_shape(lambda k: target.program.propose(proposal, k)[0], jax.random.key(0))
    have = set(address_paths(q_shape))
    for path in address_paths(z_shape):
        if path not in have:
            raise ValueError(
                f"proposal {_name(proposal)!r} does not draw the target's latent address {_fmt(path)!r}; "
                f"it draws {sorted(_fmt(p) for p in have)}"
            )


def _run_is(key, target: StaticTilted, num_particles: int, proposal, mesh):
    from .smc import ess_of

    keys = constrain_particles(jax.random.split(key, num_particles), mesh)
    program = target.program

    def one(k):
        if proposal is None:
            z, log_w0, draw = program.init(k)
            nfe = 1
        else:
            z_q, log_q = program.propose(proposal, k)
            z = _select(z_q, jax.eval_shape(lambda kk: program.init(kk)[0], k))
            log_p, draw = program.evaluate(z)
            log_w0 = log_p - log_q
            nfe = 1
        log_w0, bad0 = _sanitize(log_w0)
        pot, bad = _sanitize(target.log_potential(draw))
        return draw, log_w0 + pot, bad | bad0, nfe

    draws, log_w, bad, _ = jax.vmap(one)(keys)
    draws = constrain_particles(draws, mesh)
    log_w = jnp.where(jnp.isnan(log_w), -jnp.inf, log_w)
    all_zero = ~jnp.any(jnp.isfinite(log_w))
    log_Z = jnp.where(all_zero, -jnp.inf, log_mean_exp(log_w))
    ess = ess_of(log_w)[None]
    ancestors = jnp.arange(num_particles, dtype=jnp.int32)[None]
    nfe = jnp.asarray(num_particles, jnp.int32)
    return mark_invalid_beta(Particles(draws, log_w, log_Z, ess, ancestors, nfe, jnp.any(bad), all_zero), target.beta)


_compiled_is = filter_jit(_run_is)


def importance_sampling(key: jax.Array, target: StaticTilted, num_particles: int, *, proposal=None, mesh=None) -> Particles:
    """Self-normalised importance sampling for a static target.

    Draws z ~ q (default: the program itself, z ~ p(z | c)) and weights it by

        log w = log p(z, c) − log q(z) + r(f(z))/β      (= log p(c | z) + r/β for the prior proposal),

    so Ẑ = mean(w) is unbiased for Z and E[log Ẑ] ≤ log Z. ``proposal`` is a program of the same language,
    called with the target's args, drawing (at least) every latent address of the target.

    Returns :class:`Particles` with ``samples`` a :class:`Draw` [N], ``ess`` [1], ``ancestors`` [1, N]
    (identity) and ``nfe`` = N program evaluations. Raises ValueError naming the reward if it returned
    NaN/+inf.
    """
    num_particles = check_static_inputs(target, num_particles, mesh, key=key)
    if proposal is not None:
        _check_proposal_covers(target, proposal)
    result = _compiled_is(key, target, num_particles, proposal, mesh)
    return raise_on_nonfinite(result, target.reward)
