"""The LLaMPPL side of ``benchmarks/peer_llamppl.py``: run in a *peer* Python that has torch, transformers and
llamppl (the ``[peers]`` extra); imports neither jax nor pplalign. Not a benchmark itself (leading underscore).

Protocol (one JSON object a line): the first line on stdin is the configuration
``{"model_dir", "prompt", "prompt_ids", "allowed", "steps", "threads"}``; the worker answers
``{"ready": true, "versions": ..., "vocab": V}``. Then each line is a command
``{"cmd": "run", "n": N, "seed": s, "batch_size": B, "timeout": τ, "lib": "llamppl" | "genlm"}`` answered by
``{"wall": s, "cpu": s, "log_Z": ..., "ok": all particles obey the constraint}``, or ``{"cmd": "quit"}``.

The LLaMPPL program is its classic hard-constraint idiom, one token a step for ``steps`` steps:

    await self.observe(self.context.mask_dist(allowed), True)   # weight × p₀(next token ∈ allowed)
    await self.sample(self.context.next_token())                 # a draw from p₀ restricted to allowed

so each step's incremental weight is the mass of the allowed tokens and the draw is from the masked,
renormalised next-token distribution: the locally optimal proposal for σ ∝ p₀·1[every token allowed].
``allowed`` comes from the orchestrator (the same id set pplalign uses); EOS and the other special tokens are
not in it, so every particle has exactly ``steps`` tokens. log Ẑ = logsumexp(final weights) − log N, which is
what ``smc_standard``'s weights give (it sets every weight to the average at a resampling).

``"lib": "genlm"`` runs genlm-control's SMC (when installed) on the same target through the same backend
(see ``genlm_run``).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path


def _with_byte_decoder(model_dir: str) -> str:
    """A copy of ``model_dir`` whose tokenizer.json names a decoder genlm-backend can read (a word-level
    tokenizer has none, and genlm-backend then refuses to build its byte vocabulary). Encoding, ids and weights
    are unchanged: the weights are symlinked, only the decoder entry is added."""
    src = Path(model_dir)
    dst = Path(tempfile.mkdtemp(prefix="peer_llamppl_"))
    for f in src.iterdir():
        if f.name == "tokenizer.json":
            spec = json.loads(f.read_text())
            spec["decoder"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
            (dst / f.name).write_text(json.dumps(spec))
        elif f.suffix == ".safetensors":
            (dst / f.name).symlink_to(f.resolve())
        else:
            shutil.copy(f, dst / f.name)
    return str(dst)


def main() -> None:
    cfg = json.loads(sys.stdin.readline())
    import numpy as np
    import torch

    torch.set_num_threads(int(cfg.get("threads", 1)))
    import llamppl
    import transformers
    from llamppl import CachedCausalLM, LMContext, Model, smc_standard

    def load(batch_size, timeout):
        kw = dict(backend="hf", batch_size=batch_size, timeout=timeout, hf_opts={"device_map": "cpu", "torch_dtype": torch.float32})
        try:
            return CachedCausalLM.from_pretrained(cfg["model_dir"], **kw)
        except ValueError as e:
            if "byte representation" not in str(e):
                raise
            return CachedCausalLM.from_pretrained(_with_byte_decoder(cfg["model_dir"]), **kw)

    allowed = frozenset(int(i) for i in cfg["allowed"])
    steps = int(cfg["steps"])
    prompt_ids = [int(i) for i in cfg["prompt_ids"]]

    class NoLetter(Model):
        def __init__(self, lm):
            super().__init__()
            self.context = LMContext(lm, cfg["prompt"])
            self.count = 0

        async def step(self):
            await self.observe(self.context.mask_dist(allowed), True)
            await self.sample(self.context.next_token())
            self.count += 1
            if self.count == steps:
                self.finish()

    lms = {}

    def lm_for(batch_size, timeout):
        key = (batch_size, timeout)
        if key not in lms:
            lms[key] = load(batch_size, timeout)
        return lms[key]

    first = lm_for(20, 0.02)
    ids = first.tokenizer.encode(cfg["prompt"])
    if ids != prompt_ids:
        raise SystemExit(f"the peer's tokenizer encodes the prompt as {ids}, pplalign as {prompt_ids}")
    vocab = first.model.model.config.vocab_size
    if len(first.str_vocab) != vocab:
        raise SystemExit(f"tokenizer size {len(first.str_vocab)} != model vocab {vocab}: llamppl's masks would miss ids")
    print(json.dumps({"ready": True, "vocab": vocab, "torch": torch.__version__, "transformers": transformers.__version__,
                      "llamppl": getattr(llamppl, "__version__", "0.2.3")}), flush=True)

    genlm = {}

    def genlm_run(lm, n):
        """genlm-control's SMC on the same target: the product of its PromptedLLM and a "no e" potential,
        sampled token by token from the product's normalised next-token weights (``direct_token_sampler``:
        weight = allowed mass, as above), stopped after ``steps`` tokens by ``terminate_when`` (which closes
        the sequence with EOS and no weight correction) — not by ``max_tokens``, whose boundary would force
        EOS with the weight p₀(EOS | x), another target."""
        from genlm.control import SMC, Potential, PromptedLLM, direct_token_sampler

        if id(lm) not in genlm:
            llm = PromptedLLM(lm.model, prompt_ids=prompt_ids)
            index = [k for k, v in enumerate(llm.vocab) if v.token_id in allowed]  # Token(token_id, byte_string)
            if len(index) != len(allowed):
                raise SystemExit(f"genlm-control's vocabulary holds {len(index)} of the {len(allowed)} allowed tokens")

            class NoLetterPotential(Potential):
                async def prefix(self, context):
                    return 0.0 if all(t.token_id in allowed for t in context) else float("-inf")

                async def complete(self, context):
                    return float("-inf")  # EOS is never allowed before the cut-off

                async def sparse_logw_next(self, context):
                    return index, 0.0, float("-inf")

            genlm[id(lm)] = (llm, SMC(direct_token_sampler(llm * NoLetterPotential(llm.vocab))))
        llm, smc = genlm[id(lm)]
        seqs = asyncio.run(smc(n_particles=n, ess_threshold=0.5, max_tokens=steps + 1,
                               terminate_when=lambda ctx: len(ctx) >= steps, resampling_method="multinomial"))
        ok = all(len(c) == steps + 1 and all(t.token_id in allowed for t in c[:-1]) for c in seqs.contexts)
        return float(seqs.log_ml), ok

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        lm = lm_for(int(cmd.get("batch_size", 20)), float(cmd.get("timeout", 0.02)))
        lm.clear_cache()  # no logits cached from earlier runs; the prompt's KV cached, as pplalign prefills it
        lm.cache_kv(prompt_ids)
        np.random.seed(int(cmd["seed"]))
        torch.manual_seed(int(cmd["seed"]))
        if cmd.get("lib") == "genlm":
            w0, c0 = time.perf_counter(), time.process_time()
            log_z, ok = genlm_run(lm, int(cmd["n"]))
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            print(json.dumps({"wall": wall, "cpu": cpu, "log_Z": log_z, "ok": ok}), flush=True)
            continue
        model = NoLetter(lm)
        n = int(cmd["n"])
        w0, c0 = time.perf_counter(), time.process_time()
        particles = asyncio.run(smc_standard(model, n, ess_threshold=0.5, resampling_method="multinomial"))
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        weights = np.array([p.weight for p in particles], np.float64)
        m = weights.max()
        log_z = float(m + np.log(np.mean(np.exp(weights - m)))) if np.isfinite(m) else float("-inf")
        gen = [p.context.tokens[len(prompt_ids):] for p in particles]
        ok = all(len(g) == steps and all(int(x) in allowed for x in g) for g in gen)
        print(json.dumps({"wall": wall, "cpu": cpu, "log_Z": log_z, "ok": ok}), flush=True)


if __name__ == "__main__":
    main()
