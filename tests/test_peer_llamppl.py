"""The target of the race against LLaMPPL (benchmarks/peer_llamppl.py), pplalign side, without torch: the "no
letter e" mask of the shipped HF-format story model, and Ẑ against the exact Z by enumeration at T = 2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.peer_llamppl import PROMPTS, STORY_DIR, allowed_ids, build_target, run_ours
from models.hf import load_pretrained


@pytest.fixture(scope="module")
def story():
    return load_pretrained(str(STORY_DIR))


def test_no_e_mask_of_the_story_tokenizer(story):
    model, tok = story
    allowed = set(allowed_ids(tok, model.cfg.vocab_size))
    words = [tok.decode([i], skip_special_tokens=False) for i in range(tok.vocab_size)]
    special = {tok.pad_id, tok.bos_id, *tok.eos_ids}
    assert special == {0, 1, 2}
    assert allowed == {i for i, w in enumerate(words) if "e" not in w and i not in special}
    assert {words[i] for i in (3, 229, 225)} == {"Anna", "went", "to"} and 3 in allowed and 229 not in allowed
    assert 0 < len(allowed) < len(words) and not special & allowed


def test_log_Z_matches_enumeration_at_two_steps(story):
    model, tok = story
    prompt = PROMPTS["story"]
    target, constraint, allowed = build_target(model, tok, prompt, 2)
    ids = tok.encode(prompt)
    a = np.asarray(allowed)
    # Z = Σ_{x1, x2 allowed} p0(x1 | prompt) p0(x2 | prompt, x1), p0 the model's unmasked next-token law
    lp1 = jax.nn.log_softmax(model(jnp.asarray([ids]))[0][0, -1])
    lp2 = jax.nn.log_softmax(model(jnp.asarray([ids + [int(x)] for x in a]))[0][:, -1], axis=-1)
    log_z = float(jax.nn.logsumexp(lp1[a] + jax.nn.logsumexp(lp2[:, a], axis=-1)))
    # the constraint is the tilt's reward too: a sequence with a banned token has weight 0
    assert float(target.reward(jnp.asarray([3, 229]))) == -np.inf and float(target.reward(jnp.asarray(a[:2]))) == 0.0

    zhat = []
    for seed in range(8):
        p = run_ours(jax.random.key(seed), target, constraint, 32)
        assert np.isin(np.asarray(p.samples), a).all()  # every particle obeys the constraint, EOS never drawn
        zhat.append(float(np.exp(p.log_Z - log_z)))
    zhat = np.asarray(zhat)
    se = zhat.std(ddof=1) / np.sqrt(len(zhat))
    assert abs(zhat.mean() - 1.0) < 4 * se + 1e-3, (zhat.mean(), se)
