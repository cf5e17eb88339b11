"""A Hugging Face tokenizer (``tokenizer.json`` through the ``tokenizers`` library) with the special ids,
incremental decoding and chat template a sampler needs.

End tokens are the union of ``generation_config.json``'s ``eos_token_id`` (an id or a list: Llama-3 ends on
``<|end_of_text|>`` and ``<|eot_id|>``), ``config.json``'s, and the tokenizer's ``eos_token``. The pad id is the
tokenizer's ``pad_token``, else the generation config's, else the first end id (finished sequences only ever
draw it, so it need not be distinct). The chat template of ``tokenizer_config.json`` (or
``chat_template.jinja``) is rendered with jinja2 in a sandbox, as transformers does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

__all__ = ["HFTokenizer"]


def _token_text(value: Any) -> Optional[str]:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


class HFTokenizer:
    """Text ↔ ids for a Hugging Face model directory. Build with :meth:`from_dir`."""

    def __init__(self, tokenizer: Any, config: Mapping[str, Any] | None = None,
                 generation: Mapping[str, Any] | None = None, model_config: Mapping[str, Any] | None = None,
                 chat_template: Optional[str] = None):
        self.backend = tokenizer
        self.config = dict(config or {})
        self.generation = dict(generation or {})
        self.model_config = dict(model_config or {})
        self.chat_template = chat_template if chat_template is not None else self.config.get("chat_template")
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.pad_token = _token_text(self.config.get("pad_token"))

        eos = _ids(self.generation.get("eos_token_id")) + _ids(self.model_config.get("eos_token_id"))
        if self.eos_token is not None and self.token_to_id(self.eos_token) is not None:
            eos.append(self.token_to_id(self.eos_token))
        self.eos_ids = list(dict.fromkeys(eos))
        if not self.eos_ids:
            raise ValueError("the tokenizer has no end token: neither generation_config.json, config.json nor "
                             "tokenizer_config.json names an eos token")
        pad = self.token_to_id(self.pad_token) if self.pad_token is not None else None
        if pad is None:
            pad = next(iter(_ids(self.generation.get("pad_token_id")) + _ids(self.model_config.get("pad_token_id"))),
                       self.eos_ids[0])
        self.pad_id = int(pad)
        bos = self.token_to_id(self.bos_token) if self.bos_token is not None else None
        if bos is None:
            bos = next(iter(_ids(self.generation.get("bos_token_id")) + _ids(self.model_config.get("bos_token_id"))), None)
        self.bos_id = None if bos is None else int(bos)
        top = max(self.backend.get_vocab(with_added_tokens=True).values(), default=-1)
        self.vocab_size = max(int(self.backend.get_vocab_size(with_added_tokens=True)), top + 1)

    @classmethod
    def from_dir(cls, directory: str | Path) -> "HFTokenizer":
        from tokenizers import Tokenizer

        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.exists():
            raise ValueError(f"{directory} has no tokenizer.json (pplalign reads fast tokenizers only; save the "
                             "tokenizer with transformers' save_pretrained to write one)")
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises its own Exception type for malformed files
            raise ValueError(f"{path} is not a readable tokenizer.json: {e}") from None
        template_file = directory / "chat_template.jinja"
        template = template_file.read_text() if template_file.exists() else None
        return cls(backend, _read_json(directory / "tokenizer_config.json"),
                   _read_json(directory / "generation_config.json"), _read_json(directory / "config.json"), template)

    # --- ids --------------------------------------------------------------------------------------------------
    def token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    @property
    def special_ids(self) -> list[int]:
        """Ids of the added special tokens (``<|endoftext|>``, ``<|im_start|>``, ...)."""
        decoder = self.backend.get_added_tokens_decoder()
        return sorted(i for i, tok in decoder.items() if tok.special)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Ids of ``text``; the tokenizer's post-processor adds its own specials (e.g. Llama's
        ``<|begin_of_text|>``) when ``add_special_tokens``."""
        if not isinstance(text, str):
            raise ValueError(f"encode takes a string; got {type(text).__name__}")
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).astype(np.int64).ravel().tolist()
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} lie outside the tokenizer's vocabulary of {self.vocab_size}")
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True, stop_at_eos: bool = False) -> str:
        """Text of ``ids``; stops before the first end token when ``stop_at_eos`` (a sampled sequence's pad
        tokens after its end are then never shown)."""
        ids = self._check_ids(ids)
        if stop_at_eos:
            ends = [k for k, i in enumerate(ids) if i in self.eos_ids]
            ids = ids[: ends[0]] if ends else ids
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_incremental(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> list[str]:
        """The text after each token, holding back bytes of a character that is not complete yet.

        Byte-level BPE splits a multi-byte character (é, an emoji) over several tokens; a plain ``decode`` of
        a prefix that ends inside one shows U+FFFD. Here element k is the longest complete text of ids[:k+1],
        the same text a streaming display shows, so ``decode_incremental(ids)[-1] == decode(ids)`` whenever
        the sequence ends on a complete character."""
        from tokenizers.decoders import DecodeStream

        stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        text, out = "", []
        for i in self._check_ids(ids):
            piece = stream.step(self.backend, i)
            if piece is not None:
                text += piece
            out.append(text)
        return out

    # --- chat -------------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
                            tokenize: bool = False, **extra: Any):
        """Render ``messages`` ([{"role", "content"}, ...]) with the model's chat template, as transformers'
        ``apply_chat_template`` does (jinja2 sandbox, ``trim_blocks``/``lstrip_blocks``); ids when ``tokenize``
        (the template writes its own special tokens, so none are added)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template (a base model: encode the prompt text directly)")
        if isinstance(self.chat_template, list):
            raise ValueError("named chat templates (a list in tokenizer_config.json) are not supported")
        text = _render(self.chat_template, messages=list(messages), add_generation_prompt=add_generation_prompt,
                       bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # --- files ------------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (with the chat template) to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = dict(self.config)
        if self.chat_template:
            config["chat_template"] = self.chat_template
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _render(template: str, **context: Any) -> str:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"the chat template refused the messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **kw: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii, **kw)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: __import__("datetime").datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(**context)
    except TemplateError as e:
        raise ValueError(f"the chat template does not render: {e}") from None
