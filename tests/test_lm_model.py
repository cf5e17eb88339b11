"""The transformer LM: tokenizer, corpora, cached decoding, checkpoints, training resume (issue 4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.lm import corpora
from models.lm.checkpoint import load_model, load_params, save_model
from models.lm.tokenizer import BOS, EOS, Tokenizer
from models.lm.train import corrupt_solution, train
from models.lm.transformer import LMConfig, Transformer

TINY = dict(d_model=16, num_layers=1, num_heads=2, d_ff=32)


def test_tokenizer_roundtrip_and_unknown_words():
    tok = corpora.story_tokenizer()
    assert 200 <= tok.vocab_size <= 400
    text = corpora.sample_stories(np.random.default_rng(0), 1).texts[0]
    ids = tok.encode(text, eos=True)
    assert ids[0] == BOS and ids[-1] == EOS
    assert tok.decode(ids) == text
    with pytest.raises(ValueError, match="cannot encode"):
        tok.encode("Anna went to the spaceship")
    with pytest.raises(ValueError, match="more than"):
        tok.encode_batch([text], 3)


def test_story_labels_shape_the_text():
    data = corpora.sample_stories(np.random.default_rng(1), 400)
    insult = set(corpora.INSULTS) | set(corpora.TOXIC_ADJ)
    has_insult = np.array([bool(insult & set(t.split())) for t in data.texts])
    np.testing.assert_array_equal(has_insult, data.toxic)
    pos = np.array([len(set(corpora.POS_ADJ + corpora.POS_VERB + corpora.POS_FEEL) & set(t.split())) for t in data.texts])
    assert pos[data.sentiment == 2].mean() > 3 * pos[data.sentiment == 0].mean() + 0.1


def test_arithmetic_chains_and_checker():
    tok = corpora.arithmetic_tokenizer()
    for p in corpora.sample_problems(np.random.default_rng(2), 50):
        vals = corpora.solve(p)
        assert all(0 <= v < corpora.MAX_NUMBER for v in vals)
        sol = tok.encode(corpora.solution_text(p), bos=False, eos=True)
        steps, answer = corpora.check_solution(p, sol, tok)
        assert all(steps) and answer == p.answer
    rng = np.random.default_rng(3)
    p = corpora.sample_problems(rng, 1)[0]
    words, first_bad = corrupt_solution(rng, p)
    assert first_bad <= len(words)


def test_decode_step_matches_full_forward():
    cfg = LMConfig(23, max_len=20, **TINY)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    toks = jax.random.randint(jax.random.key(0), (1, 12), 3, 23)
    logits, hidden, kv = model(toks, return_kv=True)
    p, steps = 5, 7
    gen = jnp.zeros((1, 2, steps, 16))
    for t in range(steps):
        lg, h, gen = model.decode_step(toks[0, p + t], p + t, kv[0, :, :, :p], jnp.ones(p, bool), gen, t,
                                       jnp.arange(steps) <= t)
        np.testing.assert_allclose(lg, logits[0, p + t], atol=1e-5)
        np.testing.assert_allclose(h, hidden[0, p + t], atol=1e-5)


def test_checkpoint_roundtrip_and_shape_mismatch(tmp_path):
    tok = Tokenizer(["a", "b", "c"])
    cfg = LMConfig(tok.vocab_size, max_len=8, **TINY)
    model = Transformer(cfg, rngs=nnx.Rngs(1))
    save_model(tmp_path / "ck", model, tok)
    loaded, tok2 = load_model(tmp_path / "ck")
    assert tok2 == tok
    x = jnp.asarray([[1, 3, 4]])
    np.testing.assert_allclose(loaded(x)[0], model(x)[0], atol=1e-6)
    bigger = Transformer(LMConfig(tok.vocab_size, max_len=8, d_model=32, num_layers=1, num_heads=2, d_ff=32), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="does not match"):
        load_params(bigger, tmp_path / "ck" / "params")
    with pytest.raises(ValueError, match="does not match"):
        load_model(tmp_path / "ck", LMConfig(tok.vocab_size, max_len=8, d_model=16, num_layers=2, num_heads=2, d_ff=32))
    with pytest.raises(ValueError, match="not a checkpoint"):
        load_model(tmp_path)


def test_interrupted_training_resumes_exactly(tmp_path):
    cfg = LMConfig(corpora.story_tokenizer().vocab_size, max_len=48, **TINY)
    kw = dict(steps=4, batch_size=4, cfg=cfg, save_every=100, progress=False)
    straight, losses_a = train("stories", tmp_path / "a", **kw)
    _, first = train("stories", tmp_path / "b", stop_after=2, **kw)  # "interrupted" after 2 steps
    assert not (tmp_path / "b" / "config.json").exists() and (tmp_path / "b" / "train_state").exists()
    resumed, second = train("stories", tmp_path / "b", **kw)
    assert len(first) == 2 and len(second) == 2  # no step lost or repeated
    np.testing.assert_allclose(first + second, losses_a, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(nnx.state(straight)), jax.tree_util.tree_leaves(nnx.state(resumed))):
        np.testing.assert_array_equal(a, b)
    assert load_model(tmp_path / "b")[1] == corpora.story_tokenizer()
