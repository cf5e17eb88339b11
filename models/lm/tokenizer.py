"""A word-level tokenizer: one id per whitespace-separated word, three special tokens.

Ids 0, 1, 2 are ``<pad>``, ``<bos>``, ``<eos>``. The vocabulary is closed: encoding a word it does not know
raises ``ValueError`` (the project's corpora are generated, so an unknown word is always a user error).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = ["Tokenizer", "PAD", "BOS", "EOS"]

PAD, BOS, EOS = 0, 1, 2
SPECIALS = ("<pad>", "<bos>", "<eos>")


class Tokenizer:
    """Maps words to ids and back. ``words`` must not contain the special tokens or repeats."""

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if len(set(words)) != len(words):
            raise ValueError("tokenizer words must be unique")
        if any(w in SPECIALS or not w or any(c.isspace() for c in w) for w in words):
            raise ValueError("tokenizer words must be non-empty, without spaces, and not special tokens")
        self.id_to_word = list(SPECIALS) + words
        self.word_to_id = {w: i for i, w in enumerate(self.id_to_word)}

    @property
    def vocab_size(self) -> int:
        return len(self.id_to_word)

    pad_id, bos_id, eos_id = PAD, BOS, EOS

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        """Ids of the words of ``text``; ``<bos>`` first when ``bos``. Unknown words raise ``ValueError``."""
        words = text.split()
        unknown = sorted({w for w in words if w not in self.word_to_id})
        if unknown:
            shown = ", ".join(repr(w) for w in unknown[:10])
            raise ValueError(f"the tokenizer cannot encode {len(unknown)} word(s): {shown} (closed vocabulary of {self.vocab_size})")
        ids = [self.word_to_id[w] for w in words]
        return ([BOS] if bos else []) + ids + ([EOS] if eos else [])

    def encode_batch(self, texts: Iterable[str], length: int, *, bos: bool = True, eos: bool = True) -> np.ndarray:
        """[B, length] int32, right-padded with ``<pad>``; a text longer than ``length`` raises ``ValueError``."""
        rows = [self.encode(t, bos=bos, eos=eos) for t in texts]
        too_long = [len(r) for r in rows if len(r) > length]
        if too_long:
            raise ValueError(f"{len(too_long)} text(s) encode to more than {length} tokens (longest {max(too_long)})")
        out = np.full((len(rows), length), PAD, np.int32)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out

    def decode(self, ids: Iterable[int], *, stop_at_eos: bool = True) -> str:
        """Words of the ids, skipping ``<pad>``/``<bos>``; stops at the first ``<eos>`` when asked."""
        words = []
        for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).tolist():
            if i == EOS and stop_at_eos:
                break
            if i in (PAD, BOS):
                continue
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} outside the vocabulary of {self.vocab_size}")
            words.append(self.id_to_word[i])
        return " ".join(words)

    def ids(self, words: Iterable[str]) -> list[int]:
        """Ids of single words (``ValueError`` for unknown ones)."""
        return self.encode(" ".join(words), bos=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"words": self.id_to_word[len(SPECIALS):]}))

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        return cls(json.loads(Path(path).read_text())["words"])

    def __eq__(self, other) -> bool:
        return isinstance(other, Tokenizer) and self.id_to_word == other.id_to_word

    def __hash__(self) -> int:
        return hash(tuple(self.id_to_word))
