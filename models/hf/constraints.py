"""Regex, JSON-schema and character constraints over a tokenizer's vocabulary, as ``pplalign.constraints``
automata.

The token automaton of a regex is outlines-core's ``Index``, built over the bytes each token stands for; a JSON
schema becomes a regex through outlines-core's schema converter first. Character rules ("no letter e", "only
lowercase words") are token masks from the same per-token bytes. The dense table, the end-token rule and the
twist are in :mod:`pplalign.constraints`.

What text a constraint reads (:func:`text_of`): for a byte-level BPE tokenizer (GPT-2, Llama-3, Qwen) the
decoded text, token bytes concatenated; for a word-level tokenizer without a decoder (the shipped story model),
whose ``decode`` joins words with spaces, every word is preceded by one space, so the regex reads
``" " + decode(ids)`` (e.g. ``( [a-z]+)+ \\.``). Special tokens (``<bos>``, ``<pad>``, chat markers) are no text:
they are never allowed, except the end tokens (from a final state) and the pad token after an end token.

    auto = regex_automaton(tok, r"The (cat|dog) ran\\.")
    target, twist = constrain(pplalign.tilt(program, reward, beta), auto, tok)
    particles = pplalign.smc(key, target, 64, twist=twist)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Callable, Optional, Sequence

import numpy as np

from pplalign.constraints import UNREACHABLE, TokenAutomaton
from pplalign.constraints import constrain as _constrain

__all__ = ["TokenVocabulary", "vocabulary", "regex_automaton", "json_schema_automaton", "forbid_characters",
           "only_lowercase_words", "mask_automaton", "text_of", "constrain"]


@dataclasses.dataclass(frozen=True)
class TokenVocabulary:
    """The bytes each token id stands for (None: a special token, no text), the end ids and the pad id.

    ``joiner``: the bytes :func:`text_of` puts before the decoded text (b" " for a space-joined word-level
    vocabulary, whose tokens are b" word")."""

    tokens: tuple  # [V] bytes | None
    eos_ids: tuple = ()
    pad_id: Optional[int] = None
    joiner: bytes = b""

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def hash(self) -> str:
        """sha256 of the token bytes in id order and the end/pad ids: two tokenizers agree iff it does."""
        h = hashlib.sha256()
        for tok in self.tokens:
            h.update(b"\x00S" if tok is None else len(tok).to_bytes(4, "little") + tok)
        h.update(json.dumps([list(self.eos_ids), self.pad_id]).encode())
        return h.hexdigest()


def _gpt2_byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet (Radford et al. 2019): printable Latin-1 bytes stand for themselves, the
    other 68 bytes for the code points 256, 257, ... in byte order (so a space is "Ġ", U+0120)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _decoder_types(spec: Any) -> list[str]:
    if not spec:
        return []
    if spec.get("type") == "Sequence":
        return [t for d in spec.get("decoders", []) for t in _decoder_types(d)]
    return [spec.get("type")]


def vocabulary(tokenizer: Any, vocab_size: Optional[int] = None) -> TokenVocabulary:
    """The :class:`TokenVocabulary` of an :class:`~models.hf.HFTokenizer` (byte-level BPE, or word-level
    without a decoder); ``vocab_size`` (e.g. the model's embedding rows, ≥ the tokenizer's) pads with special
    ids. Raises ``ValueError`` for another decoder (the bytes of its tokens are not read here)."""
    if isinstance(tokenizer, TokenVocabulary):
        return tokenizer
    spec = json.loads(tokenizer.backend.to_str())
    size = tokenizer.vocab_size if vocab_size is None else int(vocab_size)
    if size < tokenizer.vocab_size:
        raise ValueError(f"vocab_size {size} is smaller than the tokenizer's {tokenizer.vocab_size}")
    added = {i: t for i, t in tokenizer.backend.get_added_tokens_decoder().items()}
    decoders = _decoder_types(spec.get("decoder"))
    model_type = (spec.get("model") or {}).get("type")
    tokens: list = [None] * size
    if "ByteLevel" in decoders:
        table, joiner = _gpt2_byte_decoder(), b""
        to_bytes = lambda s: bytes(table[c] for c in s) if all(c in table for c in s) else None
    elif not decoders and model_type == "WordLevel":
        joiner = b" "
        to_bytes = lambda s: b" " + s.encode()
    else:
        raise ValueError(f"constraints read byte-level BPE or word-level tokenizers; this one has decoder "
                         f"{decoders or None} and model {model_type}")
    for text, i in tokenizer.backend.get_vocab(with_added_tokens=True).items():
        if i in added:
            # a non-special added token decodes like any other token of its kind (word-level: " word")
            tokens[i] = None if added[i].special else (to_bytes(text) if joiner == b" " else text.encode())
        else:
            tokens[i] = to_bytes(text)
    for e in (*tokenizer.eos_ids, tokenizer.pad_id):
        tokens[e] = None
    return TokenVocabulary(tuple(tokens), tuple(int(e) for e in tokenizer.eos_ids), int(tokenizer.pad_id), joiner)


def text_of(tokenizer: Any, ids: Sequence[int]) -> str:
    """The text a constraint reads for ``ids`` (up to the first end token; specials dropped)."""
    vocab = vocabulary(tokenizer)
    out = []
    for i in np.asarray(ids).ravel().tolist():
        if i in vocab.eos_ids:
            break
        if vocab.tokens[i] is not None:
            out.append(vocab.tokens[i])
    return b"".join(out).decode("utf-8", errors="replace")


def _outlines_vocabulary(vocab: TokenVocabulary, sentinel: int):
    from outlines_core import Vocabulary

    entries: dict[bytes, list[int]] = {b"\x00": [sentinel]}
    for i, tok in enumerate(vocab.tokens):
        if tok:  # None (special) and b"" are no text
            entries.setdefault(tok, []).append(i)
    # outlines-core wants one end id outside the map (an unused id when the vocabulary has none)
    eos = int(vocab.eos_ids[0]) if vocab.eos_ids else vocab.vocab_size
    return Vocabulary(eos, entries)


def _anchored(pattern: str) -> str:
    r"""The pattern outlines-core indexes: ``\x00(?:pattern)\z``, whose state after the sentinel NUL is ours.

    outlines-core walks a leftmost-first DFA, which drops the continuations after a first match unless the
    pattern is anchored at the end (``a[ab]*b`` would refuse "abab"); ``\z`` does that, and the leading sentinel
    keeps the DFA's start state universal (``(?:[^c]*)\z`` alone has none, since it matches the empty text).
    With both, the table accepts exactly what ``re.fullmatch`` accepts (tests/test_constraints.py)."""
    return f"\\x00(?:{pattern})\\z"


def regex_automaton(tokenizer: Any, pattern: str, *, vocab_size: Optional[int] = None, must_end: bool = True,
                    max_table_bytes: Optional[int] = None, description: Optional[str] = None) -> TokenAutomaton:
    """The automaton of "the text fully matches ``pattern``" (outlines-core's regex dialect), over the
    tokenizer's vocabulary. With end ids, ``must_end`` requires the sequence to have ended (an end token drawn
    in a final state) by the last step.

    Raises ``ValueError`` when the regex does not compile, when outlines-core finds it incompatible with the
    vocabulary (a character no token spells, so nothing matches), or when the table (states × V × 4 bytes)
    exceeds ``max_table_bytes``."""
    from outlines_core import Index

    vocab = vocabulary(tokenizer, vocab_size)
    what = description or f"regex {pattern!r}"
    sentinel = vocab.vocab_size + 1  # an id outside the table, spelling the NUL byte
    try:
        index = Index(_anchored(pattern), _outlines_vocabulary(vocab, sentinel))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{what} gives no token automaton over this vocabulary ({vocab.vocab_size} tokens): {e}") from None
    moves = index.get_transitions()
    start = moves.get(index.get_initial_state(), {}).get(sentinel)
    if start is None:
        raise ValueError(f"{what} gives no token automaton over this vocabulary ({vocab.vocab_size} tokens)")
    # outlines-core's own end-token moves (and the sentinel's) are dropped: the ENDED rule replaces them
    transitions = {q: {v: n for v, n in m.items() if v < vocab.vocab_size and v not in vocab.eos_ids}
                   for q, m in moves.items() if q != index.get_initial_state()}
    # from_transitions counts the states and refuses a table over max_table_bytes before allocating it
    auto = TokenAutomaton.from_transitions(transitions, start, sorted(index.get_final_states()),
                                           vocab.vocab_size, end_ids=vocab.eos_ids, pad_id=vocab.pad_id,
                                           must_end=must_end, vocab_hash=vocab.hash, description=what,
                                           max_table_bytes=max_table_bytes)
    if int(auto.distance[auto.initial]) >= UNREACHABLE:
        raise ValueError(f"{what} matches no text over this vocabulary (Z = 0)")
    return auto


def json_schema_automaton(tokenizer: Any, schema: Any, *, whitespace: Optional[str] = r"[ ]?", **kwargs: Any) -> TokenAutomaton:
    """The automaton of "the text is a JSON document valid under ``schema``" (a dict or a JSON string),
    through outlines-core's schema → regex converter; ``whitespace`` is the regex allowed between tokens of
    the JSON. Keyword arguments go to :func:`regex_automaton`. Raises ``ValueError`` naming the schema when
    the converter cannot handle it."""
    from outlines_core.json_schema import build_regex_from_schema

    text = schema if isinstance(schema, str) else json.dumps(schema)
    try:
        pattern = build_regex_from_schema(text, whitespace)
    except (ValueError, TypeError) as e:
        raise ValueError(f"outlines-core cannot convert the JSON schema {text[:200]} to a regex: {e}") from None
    kwargs.setdefault("description", f"JSON schema {text[:80]}")
    return regex_automaton(tokenizer, pattern, **kwargs)


def mask_automaton(tokenizer: Any, allowed: Callable[[bytes], bool], *, vocab_size: Optional[int] = None,
                   must_end: bool = False, description: str = "token mask") -> TokenAutomaton:
    """The one-state automaton of the tokens whose bytes satisfy ``allowed`` (special tokens never; the end
    tokens end the sequence, then pads). ``must_end=False``: a sequence cut at T without an end token counts."""
    vocab = vocabulary(tokenizer, vocab_size)
    mask = np.array([tok is not None and len(tok) > 0 and bool(allowed(tok)) for tok in vocab.tokens], bool)
    if not mask.any():
        raise ValueError(f"{description}: no token of the vocabulary is allowed")
    return TokenAutomaton.from_mask(mask, end_ids=vocab.eos_ids, pad_id=vocab.pad_id, must_end=must_end,
                                    vocab_hash=vocab.hash, description=description)


def forbid_characters(tokenizer: Any, characters: str, **kwargs: Any) -> TokenAutomaton:
    """"No token spells any of ``characters``" (e.g. ``"eE"``, LLaMPPL's no-e example). ASCII only: a byte of
    an ASCII character never occurs inside a multi-byte one, so a token mask is exact; for other characters
    use :func:`regex_automaton` with ``[^...]*``, which follows characters split over tokens."""
    if not characters or any(ord(c) > 127 for c in characters):
        raise ValueError(f"forbid_characters takes ASCII characters (got {characters!r}); for others use "
                         "regex_automaton(tokenizer, '[^...]*')")
    banned = set(characters.encode())
    return mask_automaton(tokenizer, lambda tok: not banned.intersection(tok),
                          description=f"no characters {characters!r}", **kwargs)


def only_lowercase_words(tokenizer: Any, **kwargs: Any) -> TokenAutomaton:
    """"No uppercase letter in the text": tokens whose text is complete UTF-8 with no ``str.isupper``
    character. A token that is a fragment of a multi-byte character is refused too (its case is unknown
    until the character is complete), so the rule is exact, at the cost of those characters."""
    def ok(tok: bytes) -> bool:
        try:
            text = tok.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return not any(c.isupper() for c in text)

    return mask_automaton(tokenizer, ok, description="only lowercase words", **kwargs)


def constrain(target: Any, automaton: TokenAutomaton, tokenizer: Any, *, twist: Any = None):
    """:func:`pplalign.constraints.constrain` after checking that ``automaton`` was built for ``tokenizer``
    (vocabulary hash) and the program's vocabulary size. Returns (target, twist)."""
    if not isinstance(tokenizer, TokenVocabulary):
        tokenizer = vocabulary(tokenizer, max(automaton.vocab_size, tokenizer.vocab_size))
    vocab = tokenizer
    return _constrain(target, automaton, twist=twist, vocab_hash=vocab.hash)
