"""Regex, JSON-schema and character constraints on Hugging Face-format LMs: the tiny Qwen3 fixture (byte-level
BPE, vocabulary 400, end tokens <|im_end|> and <|endoftext|>, pad <|pad|>) and the shipped word-level story model.

Every automaton on the fixture is padded to the same number of states, so the four constraints share one
compiled twisted SMC (T = 24, N = 16). What is checked is the decoded text of every particle, with Python's
``re``, ``json`` and ``jsonschema``: independent of the automaton.
"""

import json
import re
from pathlib import Path

import jax
import jsonschema
import numpy as np
import pytest

import pplalign
from models.hf import HFTokenizer, load_pretrained
from models.hf.constraints import (
    TokenVocabulary,
    constrain,
    forbid_characters,
    json_schema_automaton,
    only_lowercase_words,
    regex_automaton,
    text_of,
    vocabulary,
)
from models.lm.program import LMProgram

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
STORIES = Path(__file__).parent.parent / "models" / "checkpoints" / "lm_stories_hf"
T, N = 24, 16
PATTERN = r"The (cat|dog|fox) (ran|sat)( to the river)?\."
SCHEMA = {
    "type": "object",
    "properties": {"name": {"enum": ["Ann", "Bob"]}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def qwen3():
    model, tok = load_pretrained(FIXTURES / "qwen3")
    program = LMProgram.from_prompt(model, "Once", T, tokenizer=tok)
    automata = {
        "regex": regex_automaton(tok, PATTERN),
        "json": json_schema_automaton(tok, SCHEMA),
        "no_e": forbid_characters(tok, "eE"),
        "lowercase": only_lowercase_words(tok),
    }
    size = max(a.num_states for a in automata.values())
    return model, tok, program, {k: a.padded(size) for k, a in automata.items()}


def _sample(program, automaton, tok, seed=0):
    target, twist = constrain(program, automaton, tok)
    p = pplalign.smc(jax.random.key(seed), target, N, twist=twist)
    assert bool(np.all(np.isfinite(np.asarray(p.log_weights)))), "every particle survives"
    assert np.isfinite(float(p.log_Z))
    return [tok.decode(x, stop_at_eos=True) for x in np.asarray(p.samples)], np.asarray(p.samples)


def _ended(samples, tok):
    return np.isin(samples, tok.eos_ids).any(axis=1)


def test_token_bytes_are_the_decoded_text(qwen3):
    """The bytes given to outlines-core for each byte-level token ("Ġ" = space, split multi-byte characters)
    concatenate to exactly what the tokenizer decodes."""
    _, tok, _, _ = qwen3
    rng = np.random.default_rng(0)
    text_ids = [i for i, b in enumerate(vocabulary(tok).tokens) if b is not None]
    for _ in range(100):
        ids = rng.choice(text_ids, size=6)
        assert text_of(tok, ids) == tok.decode(ids)
    ids = tok.encode("The café — Zoë 🍕 ran.", add_special_tokens=False)
    assert text_of(tok, ids) == "The café — Zoë 🍕 ran."


def test_regex_samples_match_and_end(qwen3):
    _, tok, program, automata = qwen3
    texts, samples = _sample(program, automata["regex"], tok)
    assert all(re.fullmatch(PATTERN, s) for s in texts), texts
    assert _ended(samples, tok).all()  # must_end: every text is complete (an end token drawn after the match)


def test_json_schema_samples_parse_and_validate(qwen3):
    _, tok, program, automata = qwen3
    texts, _ = _sample(program, automata["json"], tok, seed=1)
    for s in texts:
        jsonschema.validate(json.loads(s), SCHEMA)


def test_character_rules(qwen3):
    """"No letter e" (LLaMPPL's example) and "only lowercase words" as one-state token masks; a text cut at T
    without an end token counts (``must_end=False``)."""
    _, tok, program, automata = qwen3
    texts, _ = _sample(program, automata["no_e"], tok, seed=2)
    assert not any(c in s for s in texts for c in "eE"), texts
    texts, _ = _sample(program, automata["lowercase"], tok, seed=3)
    assert not any(c.isupper() for s in texts for c in s), texts
    assert any(len(s) > 0 for s in texts)


def test_table_memory_is_reported_and_limited(qwen3):
    _, tok, _, automata = qwen3
    auto = json_schema_automaton(tok, SCHEMA)
    assert auto.table_bytes == auto.num_states * 400 * 4
    with pytest.raises(ValueError, match="max_table_bytes"):
        json_schema_automaton(tok, SCHEMA, max_table_bytes=auto.table_bytes - 1)
    assert json_schema_automaton(tok, SCHEMA, max_table_bytes=auto.table_bytes).num_states == auto.num_states


def test_bad_input_is_refused(qwen3):
    _, tok, program, automata = qwen3
    with pytest.raises(ValueError, match="cannot convert the JSON schema"):
        json_schema_automaton(tok, {"not": {"type": "string"}})
    with pytest.raises(ValueError, match="Z = 0"):  # 40 digits never fit in 24 tokens
        constrain(program, regex_automaton(tok, r"[0-9]{40}"), tok)
    vocab = vocabulary(tok)
    swapped = list(vocab.tokens)
    swapped[100], swapped[101] = swapped[101], swapped[100]
    other = TokenVocabulary(tuple(swapped), vocab.eos_ids, vocab.pad_id)
    with pytest.raises(ValueError, match="another tokenizer"):
        constrain(program, automata["regex"], other)


def test_story_model_regex_over_words():
    """The word-level story vocabulary: each word is " word", so the regex reads " " + decode(ids)."""
    model, tok = load_pretrained(STORIES)
    program = LMProgram.from_prompt(model, "Anna went to the park .", 8, tokenizer=tok)
    pattern = r" the (dog|cat|fox) was (happy|sad|sleepy) \."
    auto = regex_automaton(tok, pattern)
    target, twist = constrain(program, auto, tok)
    p = pplalign.smc(jax.random.key(0), target, N, twist=twist)
    samples = np.asarray(p.samples)
    texts = [" " + tok.decode(x, stop_at_eos=True) for x in samples]
    assert all(re.fullmatch(pattern, s) for s in texts), texts
    assert _ended(samples, tok).all() and np.isfinite(float(p.log_Z))
    with pytest.raises(ValueError, match="no token automaton"):  # no word of this vocabulary spells " xyz"
        regex_automaton(tok, r" the xyz")
    fixture_auto = regex_automaton(HFTokenizer.from_dir(FIXTURES / "qwen3"), PATTERN)
    with pytest.raises(ValueError, match="vocabulary of 400"):  # built for the fixture's tokenizer
        constrain(program, fixture_auto, tok)
