"""Writes notebooks/06_pretrained_lms.ipynb (kept as code so the notebook stays reviewable)."""

import nbformat as nbf

cells = [
    nbf.v4.new_markdown_cell(
        "# 06 · Steering a Hugging Face model\n\n"
        "`models.hf.load_pretrained` reads a Hugging Face model directory — `config.json`, `model.safetensors` "
        "(or a sharded index), `generation_config.json`, `tokenizer.json`, `tokenizer_config.json` — into a "
        "flax.nnx decoder with the same contract as the in-house transformer, with no PyTorch: GPT-2, GPT-Neo "
        "(TinyStories), Llama-3 (with its `llama3` RoPE scaling), SmolLM2, Qwen2.5 and Qwen3. Everything of "
        "notebook 03 — `LMProgram`, SMC with a KV cache resampled by ancestor gather, twist heads, rewards — "
        "runs on it unchanged.\n\n"
        "This machine has no network, so the notebook loads the story LM that ships in Hugging Face format "
        "(`models/checkpoints/lm_stories_hf`, a GPT-2 checkpoint written by `python -m models.hf.export "
        "lm_stories ...` and checked against transformers' own logits in `tests/test_hf_loader.py`), with "
        "exactly the call you would make for a downloaded model."
    ),
    nbf.v4.new_code_cell(
        """import jax, jax.numpy as jnp, numpy as np
import pplalign
from models.hf import load_pretrained
from models.lm.checkpoint import checkpoint_path, load_model
from models.lm.program import LMProgram, ancestral_sample

model, tok = load_pretrained(checkpoint_path("lm_stories_hf"))   # a directory, or a hub name in your HF cache
cfg = model.cfg
print(f"{cfg.model_type}: {cfg.num_layers} layers, d_model {cfg.d_model}, {cfg.num_heads} heads "
      f"({cfg.num_kv_heads} kv), vocab {cfg.vocab_size}; end ids {tok.eos_ids}, pad {tok.pad_id}")
ids = tok.encode("Anna went to the park .")
print(ids, "->", repr(tok.decode(ids)))"""
    ),
    nbf.v4.new_markdown_cell(
        "**Your own model.** Download it once on a machine with network access "
        "(`hf download Qwen/Qwen2.5-0.5B --local-dir Qwen2.5-0.5B`), then change the two lines that name the "
        "model and the prompt:\n\n"
        "```python\n"
        "model, tok = load_pretrained(\"Qwen2.5-0.5B\", dtype=\"bfloat16\")        # or \"Qwen/Qwen2.5-0.5B\" from the HF cache\n"
        "program = LMProgram.from_prompt(model, \"Once upon a time\", 32, tokenizer=tok)\n"
        "```\n\n"
        "The end tokens come from the checkpoint's `generation_config.json` (Llama-3 ends on either "
        "`<|end_of_text|>` or `<|eot_id|>`), and an instruct model's prompt is "
        "`tok.apply_chat_template(messages, add_generation_prompt=True)`. The rewards below are specific to the "
        "story vocabulary; with another model use any reward on its tokens (`tok.decode` gives the text)."
    ),
    nbf.v4.new_markdown_cell("## Plain sampling from p₀"),
    nbf.v4.new_code_cell(
        """program = LMProgram.from_prompt(model, "Anna went to the", 20, tokenizer=tok)
plain, _ = ancestral_sample(jax.random.key(0), program, 4)
for row in plain:
    print(tok.decode(row, stop_at_eos=True))"""
    ),
    nbf.v4.new_markdown_cell(
        "## SMC and twisted SMC towards positive stories\n\n"
        "The target is σ(x) ∝ p₀(x | prompt)·p(positive | x) (β = 1), with the shipped story classifier as the "
        "reward. Bootstrap SMC weights by the reward at the end; twisted SMC proposes from "
        "q_t(k) ∝ p₀(k | x_{<t})·ψ_t(x_{<t}, k) with a shipped twist head (trained by DPG on the in-house LM). The "
        "export keeps the final hidden state the head reads, so the same head steers the Hugging Face model. Both "
        "estimate Z = E_{p₀}[p(positive | x)] without bias. At these small settings (4 seeds, N = 16) their log Ẑ "
        "agree within the seed spread; `experiments/lm_twisted_smc.py` compares heads and N at length."
    ),
    nbf.v4.new_code_cell(
        """from models.lm.train_twist import build_task
from models.lm.twist_head import HeadTwist, load_head

clf, _ = load_model("lm_story_classifier")
program, positive, beta = build_task("positive", model, tok, clf)
target = pplalign.tilt(program, positive, beta)
head, meta = load_head("lm_story_twist_positive_dpg", d_model=cfg.d_model, vocab_size=cfg.vocab_size)
p_pos = jax.jit(jax.vmap(lambda x: jnp.exp(positive(x))))
for name, twist in [("bootstrap", None), ("twisted (DPG head)", HeadTwist(head))]:
    runs = [pplalign.smc(jax.random.key(10 + s), target, 16, twist=twist) for s in range(4)]
    log_z = np.array([float(r.log_Z) for r in runs])
    hit = np.mean([float(jnp.sum(r.normalized_weights * p_pos(r.samples))) for r in runs])
    print(f"{name:>20}: log Z-hat = {log_z.mean():.2f} ± {log_z.std():.2f} (4 seeds, N = 16), "
          f"E_sigma-hat[P(positive)] = {hit:.2f}")
best = runs[0]
for i in np.argsort(-np.asarray(best.normalized_weights))[:3]:
    print(f"{float(best.normalized_weights[i]):.2f}", tok.decode(best.samples[i], stop_at_eos=True))"""
    ),
    nbf.v4.new_markdown_cell(
        "## The same model as the in-house one\n\n"
        "The exported checkpoint is the in-house story LM written in GPT-2's format (its head bias folded into "
        "the unembedding exactly); transformers, `load_pretrained` and the in-house loader give the same logits."
    ),
    nbf.v4.new_code_cell(
        """lm, itok = load_model("lm_stories")
x = jnp.asarray([tok.encode("then Leo and Uma went to the bridge .")])
print("max |logit difference|:", float(jnp.max(jnp.abs(model(x)[0] - lm(x)[0]))))"""
    ),
]

nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}})
nbf.write(nb, "notebooks/06_pretrained_lms.ipynb")
