"""KL-regularised RL fine-tuning of the story transformer toward a classifier-tilted target, against SMC.

Target: σ_β(x) ∝ p₀(x | prompt)·exp(r(x)/β), p₀ the shipped story LM (``models/checkpoints/lm_stories``),
r(x) = log P(positive | prompt + x) from the shipped story classifier. Fine-tuned family: the frozen LM
plus a logit adapter on its final hidden state, q_θ(x_t | x_{<t}) ∝ exp(logits_t + h_t·W + b) (W, b start at 0,
so q starts at p₀), trained with the KL-regularised objective E_q[r] − β·KL(q‖p₀) and sequence-level
REINFORCE (leave-one-out baseline). For each β we report, by Monte Carlo on fresh samples:

* the fine-tuned q: E_q[r], KL(q‖p₀) = E_q[log q − log p₀], and ELBO = E_q[r/β − log q/p₀];
* SMC on the same target with N particles, twice: bootstrap SMC (proposal p₀), and twisted SMC (Zhao et al.
  2024) with the shipped DPG twist head for this target and β (``models/checkpoints/lm_story_twist_positive_dpg``
  for β = 1, ``..._b<β>`` for the other β of the grid; each trained on T = 16 with
  ``python -m models.lm.train_twist --task positive --loss dpg --beta β``), proposing from the locally
  optimal q_t ∝ p₀ψ_t: the weighted E_σ̂[r], log Ẑ, ESS/N, and KL(σ̂‖p₀) ≈ E_σ̂[r]/β − log Ẑ. Quick mode
  (T = 8) reuses the T = 16 heads: any positive twist leaves SMC consistent, only its efficiency changes;
* KL(q‖σ) ≈ log Ẑ − ELBO with the twisted SMC's log Ẑ (bootstrap's if no head ships for β): an estimate;
  log Ẑ is a lower bound of log Z in expectation, so this is one of KL(q‖σ) too, up to the ELBO's MC error.

    python -m experiments.vi_transformer [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax

import pplalign
from pplalign import vi


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LogitAdapter:
    """q_θ: the base LM program with logits + h·W + b (h the final hidden state kept in the LM state)."""

    base: object
    params: dict

    @property
    def num_steps(self) -> int:
        return self.base.num_steps

    def init(self, key):
        return self.base.init(key)

    def transition(self, state, t):
        return dist.CategoricalLogits(state.logits + state.hidden @ self.params["w"] + self.params["b"])

    def update(self, state, x_t, t):
        return self.base.update(state, x_t, t)

    def output(self, state):
        return self.base.output(state)


def setup(num_steps: int):
    from models.lm.checkpoint import checkpoint_path, load_model
    from models.lm.program import LMProgram
    from models.lm.rewards import ClassifierReward

    lm, tok = load_model(checkpoint_path("lm_stories"))
    clf, _ = load_model(checkpoint_path("lm_story_classifier"))
    program = LMProgram.from_prompt(lm, "Anna went to the", num_steps, tokenizer=tok)
    reward = ClassifierReward.for_program(clf, program, head=(0, 3), label=2)  # positive sentiment
    d, v = lm.cfg.d_model, lm.cfg.vocab_size
    theta0 = {"w": jnp.zeros((d, v), jnp.float32), "b": jnp.zeros((v,), jnp.float32)}
    family = vi.SequentialFamily(lambda p: LogitAdapter(program, p), num_steps, name="lm_adapter")
    return program, reward, family, theta0, tok


def evaluate_q(key, family, params, target, beta, num):
    x = family.sample(params, key, num)
    lq = family.log_prob(params, x)
    lp = vi.sequence_log_prob(target.base, x)
    r = jax.vmap(target.reward)(x)
    return {"reward": float(r.mean()), "kl_q_p0": float((lq - lp).mean()), "elbo": float((r / beta - (lq - lp)).mean())}, x


def twist_for(beta: float, model):
    """(HeadTwist, name) of the shipped DPG head for the positive-sentiment target at this β (None if absent)."""
    from models.lm.checkpoint import CHECKPOINT_ROOT
    from models.lm.train_twist import head_name
    from models.lm.twist_head import HeadTwist, load_head

    name = head_name("positive", "dpg", beta)
    if not (CHECKPOINT_ROOT / name / "head.json").exists():
        return None, None
    head, meta = load_head(name, d_model=model.cfg.d_model, vocab_size=model.cfg.vocab_size)
    if abs(meta["beta"] - beta) > 1e-9:
        raise ValueError(f"twist head {name} was trained for β = {meta['beta']}, not {beta}")
    return HeadTwist(head), name


def evaluate_smc(key, target, beta, num, twist=None):
    p = pplalign.smc(key, target, num, twist=twist)
    w = p.normalized_weights
    r = jax.vmap(target.reward)(p.samples)
    er = float(jnp.sum(w * r))
    return {"reward": er, "log_Z_hat": float(p.log_Z), "kl_sigma_p0": er / beta - float(p.log_Z), "nfe": int(p.nfe),
            "ess": float(jnp.mean(p.ess) / num)}, p


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="results/vi_transformer")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    num_steps = 8 if args.quick else 16
    betas = [1.0] if args.quick else [0.25, 0.5, 1.0, 2.0]
    fit_steps = 30 if args.quick else 300
    n_eval = 64 if args.quick else 512
    program, reward, family, theta0, tok = setup(num_steps)
    rows = []
    key = jax.random.key(0)
    base_eval, _ = evaluate_q(jax.random.fold_in(key, 99), family, theta0, pplalign.tilt(program, reward, 1.0), 1.0, n_eval)
    for i, beta in enumerate(betas):
        target = pplalign.tilt(program, reward, beta)
        obj = vi.kl_regularised_rl(family, target, num_samples=16, estimator="sequence_reinforce")
        res = vi.fit(obj, theta0, key=jax.random.fold_in(key, i), num_steps=fit_steps, optimizer=optax.adam(3e-3),
                     chunk_size=max(fit_steps // 3, 1), checkpoint_dir=os.path.join(args.out, "checkpoints", f"beta_{beta:g}"),
                     desc=f"fine-tune β={beta:g}")
        q_eval, xs = evaluate_q(jax.random.fold_in(key, 100 + i), family, res.params, target, beta, n_eval)
        s_eval, _ = evaluate_smc(jax.random.fold_in(key, 200 + i), target, beta, n_eval)
        twist, head = twist_for(beta, program.model)
        t_eval = None
        if twist is not None:
            t_eval, _ = evaluate_smc(jax.random.fold_in(key, 300 + i), target, beta, n_eval, twist)
            t_eval["head"] = head
        best = t_eval["log_Z_hat"] if t_eval else s_eval["log_Z_hat"]
        rows.append({"beta": beta, "q": q_eval, "smc": s_eval, "twisted_smc": t_eval, "kl_q_sigma_est": best - q_eval["elbo"],
                     "example": tok.decode([int(t) for t in xs[0]]) if hasattr(tok, "decode") else None})
    result = {"num_steps": num_steps, "fit_steps": fit_steps, "base": base_eval, "rows": rows}
    with open(os.path.join(args.out, "result.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    plot(rows, base_eval, os.path.join(args.out, "reward_kl_vs_beta.png"))
    last = rows[-1]
    line = {"beta": last["beta"], "reward_base": base_eval["reward"], "reward_q": last["q"]["reward"],
            "kl_q_p0": last["q"]["kl_q_p0"], "reward_smc": last["smc"]["reward"], "kl_sigma_p0_smc": last["smc"]["kl_sigma_p0"],
            "kl_q_sigma_est": last["kl_q_sigma_est"], "log_Z_smc": last["smc"]["log_Z_hat"], "ess_smc": last["smc"]["ess"]}
    if last["twisted_smc"] is not None:
        t = last["twisted_smc"]
        line.update(reward_twisted_smc=t["reward"], log_Z_twisted_smc=t["log_Z_hat"], ess_twisted_smc=t["ess"],
                    kl_sigma_p0_twisted_smc=t["kl_sigma_p0"])
    for r in rows:
        t = r["twisted_smc"] or {}
        print(f"β={r['beta']:<5g} q: E r={r['q']['reward']:.3f} KL(q‖p0)={r['q']['kl_q_p0']:.3f} ELBO={r['q']['elbo']:.3f} | "
              f"SMC: E r={r['smc']['reward']:.3f} log Ẑ={r['smc']['log_Z_hat']:.3f} ESS/N={r['smc']['ess']:.2f} | "
              f"twisted SMC: E r={t.get('reward', np.nan):.3f} log Ẑ={t.get('log_Z_hat', np.nan):.3f} "
              f"ESS/N={t.get('ess', np.nan):.2f} | KL(q‖σ)≈{r['kl_q_sigma_est']:.3f}")
    print(json.dumps(line))
    return line


def plot(rows, base, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = [r["beta"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    axes[0].plot(b, [r["q"]["reward"] for r in rows], "o-", label="fine-tuned q")
    axes[0].plot(b, [r["smc"]["reward"] for r in rows], "s--", label="bootstrap SMC (weighted)")
    tw = [r for r in rows if r["twisted_smc"]]
    if tw:
        axes[0].plot([r["beta"] for r in tw], [r["twisted_smc"]["reward"] for r in tw], "^:", label="twisted SMC (weighted)")
        axes[1].plot([r["beta"] for r in tw], [r["twisted_smc"]["kl_sigma_p0"] for r in tw], "^:", label="KL(σ̂‖p₀) (twisted SMC)")
    axes[0].axhline(base["reward"], color="g", ls=":", label="p₀")
    axes[0].set(xscale="log", xlabel="β", ylabel="E[log P(positive)]")
    axes[0].legend(fontsize=7)
    axes[1].plot(b, [r["q"]["kl_q_p0"] for r in rows], "o-", label="KL(q‖p₀)")
    axes[1].plot(b, [r["smc"]["kl_sigma_p0"] for r in rows], "s--", label="KL(σ̂‖p₀) (SMC)")
    axes[1].set(xscale="log", xlabel="β", ylabel="nats")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
