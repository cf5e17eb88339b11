"""Writes notebooks/07_constraints.ipynb (kept as code so the notebook stays reviewable)."""

import nbformat as nbf

cells = [
    nbf.v4.new_markdown_cell(
        "# 07 · Hard constraints: a regex, a character rule, a JSON schema\n\n"
        "A constraint is a potential like any other (DESIGN §9): a token automaton built by outlines-core over the "
        "tokenizer's vocabulary, held as a dense `[states, V]` table, gives log ψ ∈ {0, −∞} for every next token "
        "in one gather — \"the prefix can still complete to a match in the steps left\". Twisted SMC with the "
        "locally optimal proposal then samples σ(x) ∝ p₀(x)·1[x ∈ L] (times any reward): every particle "
        "matches, and Ẑ estimates P_{p₀}(x ∈ L) without bias. See `docs/constraints.md`."
    ),
    nbf.v4.new_code_cell(
        """import json, re
import jax, jax.numpy as jnp, numpy as np
import jsonschema
import pplalign
from pplalign.viewer import view
from models.hf import load_pretrained
from models.hf.constraints import constrain, forbid_characters, json_schema_automaton, regex_automaton, text_of
from models.lm.checkpoint import checkpoint_path
from models.lm.program import LMProgram

model, tok = load_pretrained(checkpoint_path("lm_stories_hf"))     # the shipped story LM, in HF format
program = LMProgram.from_prompt(model, "Anna went to the", 12, tokenizer=tok)"""
    ),
    nbf.v4.new_markdown_cell(
        "## A regex: the continuation must be a place, then a time, then a full stop\n\n"
        "The story model is word-level, so each token reads as ` word` and the constraint reads "
        "`\" \" + decode(ids)`."
    ),
    nbf.v4.new_code_cell(
        """pattern = r" (park|farm|river|market|school) in the (morning|evening|night) \\."
auto = regex_automaton(tok, pattern)
target, twist = constrain(program, auto, tok)
res = pplalign.smc(jax.random.key(0), target, 32, twist=twist)
texts = [text_of(tok, x) for x in np.asarray(res.samples)]
print(f"automaton: {auto.num_states} states x {auto.vocab_size} tokens = {auto.table_bytes} bytes")
print("P_p0(match) ~ Z-hat =", float(jnp.exp(res.log_Z)))
print("all match:", all(re.fullmatch(pattern, t) for t in texts))
for t in texts[:4]:
    print(repr(t))"""
    ),
    nbf.v4.new_markdown_cell(
        "## A character rule: no letter *e* (LLaMPPL's classic example), with a viewer of the particles\n\n"
        "The viewer is a self-contained HTML page: each particle's text, its weight and its ancestry across the "
        "resampling steps (`pplalign.viewer.write_html(path, ...)` saves it)."
    ),
    nbf.v4.new_code_cell(
        """no_e = forbid_characters(tok, "eE")
target, twist = constrain(program, no_e, tok)
res = pplalign.smc(jax.random.key(1), target, 16, twist=twist)
samples = np.asarray(res.samples)
print("P_p0(no e in 12 tokens) ~", float(jnp.exp(res.log_Z)), "| any e:", any("e" in text_of(tok, x) for x in samples))
view(res, lambda x: tok.decode(x, stop_at_eos=True), tokens=samples, title="no letter e", max_particles=8)"""
    ),
    nbf.v4.new_markdown_cell(
        "## A JSON schema\n\n"
        "The story vocabulary cannot spell JSON, so this cell uses the tiny byte-level BPE model of the test "
        "fixtures (random weights: the contents are nonsense, the format is not). With a real model, pass its "
        "directory to `load_pretrained` instead."
    ),
    nbf.v4.new_code_cell(
        """jmodel, jtok = load_pretrained("../tests/fixtures/hf/qwen3")
schema = {"type": "object", "properties": {"name": {"enum": ["Ann", "Bob"]}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
jprogram = LMProgram.from_prompt(jmodel, "Answer in JSON:", 28, tokenizer=jtok)
jauto = json_schema_automaton(jtok, schema)
target, twist = constrain(jprogram, jauto, jtok)
res = pplalign.smc(jax.random.key(2), target, 8, twist=twist)
samples = np.asarray(res.samples)
for x in samples[:3]:
    doc = json.loads(jtok.decode(x, stop_at_eos=True))
    jsonschema.validate(doc, schema)
    print(doc)
print(f"{jauto.num_states} states, {jauto.table_bytes} bytes; every sample parses and validates")"""
    ),
]

nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}})
nbf.write(nb, "notebooks/07_constraints.ipynb")
