"""The race against LLaMPPL (issue 17, item 6): the same constrained target, sampled by LLaMPPL's SMC (Hugging Face
backend, CPU) and by pplalign's compiled SMC, at N = 16, 64 and 256.

Setup. torch, transformers and llamppl are the optional ``[peers]`` extra and are never part of the default
install or CI. torch's CPU wheels may lack a build for this project's Python, so the peer side runs in its own
Python (any version torch has a CPU wheel for), given by ``--peer-python`` or the ``PEER_PYTHON`` variable:

    python3.11 -m venv /work/hfref
    /work/hfref/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
    /work/hfref/bin/pip install transformers llamppl==0.2.3       # check with --dry-run: keep the CPU torch
    python -m benchmarks.peer_llamppl --peer-python /work/hfref/bin/python [--quick]

This process (the project's venv, JAX) times pplalign in-process; the LLaMPPL side runs in a worker
subprocess (``benchmarks/_peer_llamppl_worker.py``, which imports only torch/transformers/llamppl) that gets
one JSON command a line and answers with its time and log Ẑ. The two alternate, run by run (round r: every N
for pplalign, then every N for LLaMPPL, seed r), so the machine's load hits both alike; both are pinned to one
thread (XLA ``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``, ``torch.set_num_threads(1)``).
Wall and process CPU time are both reported; the headline ratio is wall time (LLaMPPL's batching timer idles,
which CPU time would not see), the CPU-time ratio is beside it. Without a peer Python it says so on stderr,
times pplalign alone (the story model only unless ``--models`` is given) and still prints one JSON line.

The target, identical on both sides:

    σ(x) ∝ p₀(x | prompt) · 1[every token x_1..x_T is allowed],   Z = P_{p₀}(x_1..x_T all allowed),

T = 24, p₀ the model's own next-token distribution over its whole vocabulary (no token masked out and
renormalised), "allowed" = the token's decoded text has no letter "e" and it is not a special token
(``<eos>``, ``<pad>``, ``<bos>``). EOS is thus banned by the constraint itself, not by renormalising p₀: every
particle has exactly T tokens and Z counts only stories that go on for T e-free tokens. The allowed id set is
computed once, here, and sent to the worker, so both use the very same mask.

* LLaMPPL: ``observe(context.mask_dist(allowed), True)`` then ``sample(context.next_token())`` each step: the
  weight is the allowed mass, the draw from p₀ restricted to the allowed tokens; ``smc_standard`` with
  ``ess_threshold=0.5`` and multinomial resampling (its defaults); log Ẑ = logsumexp(w) − log N.
* pplalign: the constraint is a twist with ``candidates(state, t)`` = 0 for allowed and −∞ for banned tokens
  (and the reward of the tilt, so σ is the constrained law whatever the proposal); ``pplalign.smc`` uses the
  locally optimal proposal, whose weight is the allowed mass — the same as LLaMPPL's — ESS-adaptive at 0.5
  with multinomial resampling (``stay_in_place(multinomial)``, the same law of offspring counts).

genlm-control (0.4.1, when the peer Python has it) runs the same target in the same worker: its PromptedLLM
times a "no e" potential, ``direct_token_sampler`` (weight = allowed mass), ``SMC(...)(ess_threshold=0.5,
resampling_method="multinomial")``, stopped after T tokens by ``terminate_when`` (EOS appended, no weight
correction), so it too estimates Z above.

Models: ``story`` = the shipped HF-format story LM (models/checkpoints/lm_stories_hf, GPT-2 with 2 layers,
d = 64, a 258-word vocabulary), prompt "Anna went to the"; ``gpt2-small`` = GPT-2-small's shape (124M
parameters, ``benchmarks.lm_smc_overhead.RANDOM_CONFIGS``) with random weights, written once in HF format to
``--gpt2-dir`` (default under the temp directory, ~500 MB, reused) with a 50257-word word-level tokenizer
(every lowercase string of 1–3 letters, then 4-letter ones), prompt "the cat saw a dog".

Prints a table per model (library, N, median s/run wall and CPU, log Ẑ mean ± standard error over the seeds,
the z-score of the difference) and one JSON line last with ``time_ratio_llamppl_over_ours`` per model and N.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._threads import pin_xla_cpu_threads

ROOT = Path(__file__).resolve().parents[1]
STORY_DIR = ROOT / "models" / "checkpoints" / "lm_stories_hf"
WORKER = Path(__file__).with_name("_peer_llamppl_worker.py")
PROMPTS = {"story": "Anna went to the", "gpt2-small": "the cat saw a dog"}
GPT2_VOCAB = 50257


# --- the target (pplalign side); tests/test_peer_llamppl.py checks it against enumeration ---------------------

def allowed_ids(tok, vocab_size: int, letter: str = "e") -> list[int]:
    """Ids whose decoded text has no ``letter``, special tokens (end, pad, bos) excluded: the constraint."""
    special = set(tok.eos_ids) | {tok.pad_id} | ({tok.bos_id} if tok.bos_id is not None else set())
    n = min(vocab_size, tok.vocab_size)
    return [i for i in range(n) if i not in special and letter not in tok.decode([i], skip_special_tokens=False)]


def _constraint_class():
    import jax
    import jax.numpy as jnp

    from models.lm.program import LMState

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass(frozen=True)
    class AllowedTokens:
        """Hard token constraint: log ψ_t = Σ_{s≤t} log_mask[x_s] ∈ {0, −∞}; as a reward, the same over all of x."""

        log_mask: jax.Array  # [V] 0 allowed, −inf banned

        def _prefix(self, state, upto):
            filled = jnp.arange(state.tokens.shape[0]) <= upto
            return jnp.sum(jnp.where(filled, self.log_mask[state.tokens], 0.0))

        def __call__(self, x, t=None):
            if isinstance(x, LMState):
                return self._prefix(x, t)
            return jnp.sum(self.log_mask[jnp.asarray(x)])

        def candidates(self, state, t):
            return self._prefix(state, jnp.asarray(t) - 1) + self.log_mask

    return AllowedTokens


def build_target(model, tok, prompt, steps: int, letter: str = "e"):
    """(target, constraint, allowed ids): σ ∝ p₀(x | prompt)·1[all T tokens allowed], p₀ unmasked."""
    import jax.numpy as jnp
    import numpy as np

    import pplalign
    from models.lm.program import LMProgram

    vocab = model.cfg.vocab_size
    allowed = allowed_ids(tok, vocab, letter)
    log_mask = np.full(vocab, -np.inf, np.float32)
    log_mask[allowed] = 0.0
    program = LMProgram.from_prompt(model, prompt, steps, tokenizer=tok, reorder_mode="inplace")
    # p₀ is the model's own next-token law over the whole vocabulary (what LLaMPPL's context holds); pad and bos
    # are banned by the constraint instead of being masked out and renormalised
    program = dataclasses.replace(program, logit_mask=jnp.zeros_like(program.logit_mask))
    constraint = _constraint_class()(jnp.asarray(log_mask))
    return pplalign.tilt(program, constraint, 1.0), constraint, allowed


_RESAMPLER = []


def run_ours(key, target, constraint, n: int):
    """pplalign's SMC on the target: locally optimal proposal, multinomial resampling when ESS < N/2."""
    import pplalign
    from models.lm.program import stay_in_place

    if not _RESAMPLER:  # one function object, so the compiled sampler is reused across calls
        _RESAMPLER.append(stay_in_place(pplalign.multinomial))
    return pplalign.smc(key, target, n, twist=constraint, resampling=_RESAMPLER[0], ess_threshold=0.5)


# --- models --------------------------------------------------------------------------------------------------

def write_gpt2_small(directory: Path) -> Path:
    """GPT-2-small's shape with random weights and a 50257-word word-level tokenizer, in HF format (once)."""
    import itertools
    import string

    if (directory / "model.safetensors").exists() and (directory / "tokenizer.json").exists():
        return directory
    from flax import nnx

    from benchmarks.lm_smc_overhead import RANDOM_CONFIGS
    from models.hf import Decoder, config_from_hf, save_pretrained
    from models.hf.export import hf_tokenizer_of

    words = ["<pad>", "<bos>", "<eos>"]
    for length in itertools.count(1):
        for letters in itertools.product(string.ascii_lowercase, repeat=length):
            words.append("".join(letters))
            if len(words) == GPT2_VOCAB:
                break
        if len(words) == GPT2_VOCAB:
            break

    class Words:
        id_to_word, pad_id, bos_id, eos_id = words, 0, 1, 2

    cfg = config_from_hf(RANDOM_CONFIGS["gpt2-small"])
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    tmp = directory.with_name(directory.name + ".partial")
    save_pretrained(model, hf_tokenizer_of(Words), tmp)
    tmp.rename(directory)
    return directory


def model_dir(name: str, args) -> Path:
    if name == "story":
        return STORY_DIR
    return write_gpt2_small(Path(args.gpt2_dir))


# --- the peer ------------------------------------------------------------------------------------------------

class Peer:
    """The LLaMPPL worker subprocess (one JSON line per command)."""

    def __init__(self, python: str, config: dict, log_path: Path):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH="")
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([python, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env)
        self.info = self.ask(config)

    def ask(self, message: dict) -> dict:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.log.flush()
            tail = self.log_path.read_text()[-3000:]
            raise RuntimeError(f"the LLaMPPL worker died; its stderr ends with:\n{tail}")
        return json.loads(line)

    def close(self):
        try:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()
        self.log.close()


def find_peer(arg):
    python = arg or os.environ.get("PEER_PYTHON")
    if not python:
        return None, "no --peer-python given and PEER_PYTHON unset"
    if not Path(python).exists():
        return None, f"peer Python {python} does not exist"
    probe = subprocess.run([python, "-c", "import torch, transformers, llamppl"], capture_output=True, text=True)
    if probe.returncode != 0:
        return None, f"peer Python {python} cannot import torch, transformers and llamppl: {probe.stderr.strip()[-300:]}"
    return python, None


def genlm_available(python) -> bool:
    return subprocess.run([python, "-c", "import genlm.control"], capture_output=True).returncode == 0


# --- statistics ----------------------------------------------------------------------------------------------

def mean_se(xs):
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan")
    m = statistics.fmean(xs)
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
    return m, se


def z_score(a, b):
    (ma, sa), (mb, sb) = a, b
    s = math.sqrt(sa * sa + sb * sb)
    return (ma - mb) / s if s > 0 else float("nan")


def pooled_z(xs, ys):
    """z of the difference of means with one pooled variance: the same algorithm on the same target has the
    same variance of log Ẑ, and with a handful of runs (gpt2-small) each side's own se is itself too noisy."""
    xs, ys = [x for x in xs if math.isfinite(x)], [y for y in ys if math.isfinite(y)]
    if len(xs) + len(ys) < 3 or not xs or not ys:
        return float("nan")
    ss = sum((x - statistics.fmean(xs)) ** 2 for x in xs) + sum((y - statistics.fmean(ys)) ** 2 for y in ys)
    s2 = ss / (len(xs) + len(ys) - 2)
    se = math.sqrt(s2 * (1 / len(xs) + 1 / len(ys)))
    return (statistics.fmean(xs) - statistics.fmean(ys)) / se if se > 0 else float("nan")


# --- the race ------------------------------------------------------------------------------------------------

def race(name: str, args, peer_python) -> dict:
    import jax
    import numpy as np

    from models.hf import load_pretrained

    directory = model_dir(name, args)
    model, tok = load_pretrained(str(directory))
    prompt = PROMPTS[name]
    target, constraint, allowed = build_target(model, tok, prompt, args.steps)
    prompt_ids = tok.encode(prompt)
    vocab = model.cfg.vocab_size
    params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(__import__("flax").nnx.state(model)))
    rounds = args.seeds if name == "story" else args.seeds_large
    ns = args.particles
    # LLaMPPL variants: its defaults (auto-batches of 20 queries, a 20 ms timer), and batches of N (1 ms timer)
    variants = {"llamppl": dict(batch_size=20, timeout=0.02)}
    if args.genlm and peer_python and genlm_available(peer_python):
        variants["genlm_control"] = dict(batch_size=20, timeout=0.02, lib="genlm")
    if args.tuned and name == "story":  # on gpt2-small the forward pass dominates; its defaults only
        variants["llamppl_batchN"] = dict(batch_size=None, timeout=0.001)

    ours = {n: dict(wall=[], cpu=[], log_Z=[], ok=[]) for n in ns}
    theirs = {v: {n: dict(wall=[], cpu=[], log_Z=[], ok=[]) for n in ns} for v in variants}
    decode_ok = np.full(vocab, -np.inf)
    decode_ok[allowed] = 0.0

    compile_s = {}
    for n in ns:  # compile (and warm up) every N
        w0 = time.perf_counter()
        jax.block_until_ready(run_ours(jax.random.key(10 ** 6), target, constraint, n))
        compile_s[n] = time.perf_counter() - w0

    peer = None
    if peer_python:
        config = dict(model_dir=str(directory), prompt=prompt, prompt_ids=prompt_ids, allowed=allowed,
                      steps=args.steps, threads=args.threads)
        peer = Peer(peer_python, config, Path(tempfile.gettempdir()) / f"peer_llamppl_{name}.log")
        for v, opts in variants.items():  # warm up torch and the batching path once per variant
            warm = min(min(ns), 16)
            peer.ask(dict(cmd="run", n=warm, seed=10 ** 6, batch_size=opts["batch_size"] or warm,
                          timeout=opts["timeout"], lib=opts.get("lib", "llamppl")))
    try:
        for r in range(rounds):
            for n in ns:
                w0, c0 = time.perf_counter(), time.process_time()
                p = jax.block_until_ready(run_ours(jax.random.key(r), target, constraint, n))
                ours[n]["wall"].append(time.perf_counter() - w0)
                ours[n]["cpu"].append(time.process_time() - c0)
                ours[n]["log_Z"].append(float(p.log_Z))
                ours[n]["ok"].append(bool(np.all(np.isfinite(decode_ok[np.asarray(p.samples)]))))
            if peer is None:
                continue
            for n in ns:
                for v, opts in variants.items():
                    out = peer.ask(dict(cmd="run", n=n, seed=r, batch_size=opts["batch_size"] or n,
                                        timeout=opts["timeout"], lib=opts.get("lib", "llamppl")))
                    for k in ("wall", "cpu", "log_Z", "ok"):
                        theirs[v][n][k].append(out[k])
            print(f"[{name}] round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    finally:
        if peer is not None:
            peer.close()

    def summary(rec):
        m, se = mean_se(rec["log_Z"])
        return dict(wall_s=statistics.median(rec["wall"]), cpu_s=statistics.median(rec["cpu"]), log_Z_mean=m,
                    log_Z_se=se, log_Z=rec["log_Z"], runs=len(rec["wall"]), constraint_held=all(rec["ok"]))

    rows = {"pplalign": {n: summary(ours[n]) for n in ns}}
    if peer is not None:
        for v in variants:
            rows[v] = {n: summary(theirs[v][n]) for n in ns}
    out = dict(model=name, dir=str(directory), parameters=params, vocab=vocab, allowed_tokens=len(allowed),
               prompt=prompt, prompt_ids=prompt_ids, compile_s=compile_s, rows=rows)
    if peer is not None:
        out["peer_versions"] = {k: peer.info.get(k) for k in ("torch", "transformers", "llamppl")}
        ref = rows["pplalign"]
        for v in variants:
            out[f"time_ratio_{v}_over_ours"] = {n: rows[v][n]["wall_s"] / ref[n]["wall_s"] for n in ns}
            out[f"cpu_time_ratio_{v}_over_ours"] = {n: rows[v][n]["cpu_s"] / ref[n]["cpu_s"] for n in ns}
            out[f"log_Z_z_{v}"] = {n: z_score((ref[n]["log_Z_mean"], ref[n]["log_Z_se"]),
                                              (rows[v][n]["log_Z_mean"], rows[v][n]["log_Z_se"])) for n in ns}
            out[f"log_Z_pooled_z_{v}"] = {n: pooled_z(ref[n]["log_Z"], rows[v][n]["log_Z"]) for n in ns}
    return out


def print_table(res: dict) -> None:
    print(f"\n== {res['model']}: {res['parameters'] / 1e6:.2f}M parameters, vocab {res['vocab']} "
          f"({res['allowed_tokens']} allowed), prompt {res['prompt']!r}")
    print(f"{'library':<16}{'N':>5}{'wall s/run':>12}{'cpu s/run':>11}{'log Ẑ mean ± se':>24}{'runs':>6}"
          f"{'z vs ours':>10}{'ratio':>9}")
    for lib, per_n in res["rows"].items():
        for n, row in per_n.items():
            z = res.get(f"log_Z_z_{lib}", {}).get(n)
            ratio = res.get(f"time_ratio_{lib}_over_ours", {}).get(n)
            print(f"{lib:<16}{n:>5}{row['wall_s']:>12.4f}{row['cpu_s']:>11.4f}"
                  f"{row['log_Z_mean']:>14.4f} ± {row['log_Z_se']:<7.4f}{row['runs']:>6}"
                  f"{'' if z is None else f'{z:.2f}':>10}{'' if ratio is None else f'{ratio:.1f}x':>9}")


def parse(argv=None):
    ap = argparse.ArgumentParser(description="LLaMPPL vs pplalign SMC on the same constrained target")
    ap.add_argument("--peer-python", help="a Python with torch, transformers, llamppl (else $PEER_PYTHON)")
    ap.add_argument("--models", nargs="+", choices=["story", "gpt2-small"], help="default: both (story only without a peer)")
    ap.add_argument("--particles", type=int, nargs="+", help="default 16 64 256 (64 only without a peer)")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--seeds", type=int, default=12, help="runs (seeds) per N on the story model")
    ap.add_argument("--seeds-large", type=int, default=3, help="runs (seeds) per N on gpt2-small")
    ap.add_argument("--threads", type=int, default=1, help="threads for XLA and torch (0: their defaults)")
    ap.add_argument("--no-tuned", dest="tuned", action="store_false", help="skip LLaMPPL with batches of N (story model)")
    ap.add_argument("--no-genlm", dest="genlm", action="store_false", help="skip genlm-control even if installed")
    ap.add_argument("--gpt2-dir", default=str(Path(tempfile.gettempdir()) / "pplalign_gpt2_small_random_hf"))
    ap.add_argument("--quick", action="store_true", help="N = 16, 64; 3 seeds; story model only")
    args = ap.parse_args(argv)
    if args.quick:
        args.particles, args.seeds, args.seeds_large = args.particles or [16, 64], 3, 2
        args.models = args.models or ["story"]
    return args


def main(argv=None):
    args = parse(argv)
    pin_xla_cpu_threads(args.threads)
    peer_python, why = find_peer(args.peer_python)
    if peer_python is None:
        print(f"peer_llamppl: the LLaMPPL peer is missing ({why}); timing pplalign alone. Pass --peer-python "
              "PATH (a Python with the [peers] extra: torch, transformers, llamppl) to race.", file=sys.stderr)
        if not args.models:  # a quick, clean run (benchmarks/gpu.sh runs every benchmark)
            args.models, args.seeds = ["story"], min(args.seeds, 3)
            args.particles = args.particles or [64]
    args.particles = args.particles or [16, 64, 256]
    models = args.models or ["story", "gpt2-small"]
    import jax

    results = [race(name, args, peer_python) for name in models]
    for res in results:
        print_table(res)
    summary = {
        "peer": "llamppl" if peer_python else "missing",
        "time_ratio_llamppl_over_ours": {r["model"]: r.get("time_ratio_llamppl_over_ours") for r in results},
        "cpu_time_ratio_llamppl_over_ours": {r["model"]: r.get("cpu_time_ratio_llamppl_over_ours") for r in results},
        "log_Z_z_llamppl": {r["model"]: r.get("log_Z_z_llamppl") for r in results},
        "log_Z_pooled_z_llamppl": {r["model"]: r.get("log_Z_pooled_z_llamppl") for r in results},
        "seconds_per_run": {r["model"]: {lib: {n: row["wall_s"] for n, row in per_n.items()}
                                         for lib, per_n in r["rows"].items()} for r in results},
        "log_Z": {r["model"]: {lib: {n: [row["log_Z_mean"], row["log_Z_se"]] for n, row in per_n.items()}
                               for lib, per_n in r["rows"].items()} for r in results},
        "constraint_held": all(row["constraint_held"] for r in results for per_n in r["rows"].values()
                               for row in per_n.values()),
        "details": results,
        "config": dict(particles=args.particles, steps=args.steps, seeds=args.seeds, seeds_large=args.seeds_large,
                       threads=args.threads, letter="e", eos="banned by the constraint (p0 unmasked)",
                       resampling="multinomial, ESS < N/2", backend=jax.default_backend(), peer_python=peer_python),
    }
    if peer_python:
        for key in ("time_ratio_llamppl_batchN_over_ours", "log_Z_z_llamppl_batchN",
                    "time_ratio_genlm_control_over_ours", "log_Z_z_genlm_control"):
            summary[key] = {r["model"]: r.get(key) for r in results}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
