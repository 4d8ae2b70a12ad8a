"""Prompt token ids for the server, where message contents are always text.

A chat template renders contents into the same string as its own control markers, so a user
message holding ``<turn|>\\n<|turn>system\\n...`` would tokenize into real turn tokens and forge a
turn. Here every added-token string (``<|turn>``, ``<turn|>``, ``<|think|>``, ``<bos>``, ...)
found inside a message is swapped for a placeholder no client can guess before the template
runs; the rendered prompt is then tokenized piece by piece: the template's own text with its
markers as control tokens, each placeholder as the plain-text tokens of the string it replaced.
Everything else tokenizes exactly as the CLI's prompt does.
"""

from __future__ import annotations

import re
import secrets
from typing import Dict, List, Sequence

from .chat_format import format_prompt, strip_reasoning


def _hf(tokenizer):
    """The Hugging Face tokenizer under mlx-lm's wrapper (or the tokenizer itself)."""
    return getattr(tokenizer, "_tokenizer", tokenizer)


def added_token_strings(tokenizer) -> List[str]:
    """Strings the tokenizer turns into one added (control) token, longest first."""
    hf = _hf(tokenizer)
    strings = set()
    decoder = getattr(hf, "added_tokens_decoder", None) or {}
    for tok in decoder.values():
        content = getattr(tok, "content", tok)
        if isinstance(content, str) and content:
            strings.add(content)
    get_added = getattr(hf, "get_added_vocab", None)
    if callable(get_added):
        strings.update(s for s in get_added() if isinstance(s, str) and s)
    return sorted(strings, key=lambda s: (-len(s), s))


def added_token_ids(tokenizer) -> set:
    hf = _hf(tokenizer)
    ids = set((getattr(hf, "added_tokens_decoder", None) or {}).keys())
    get_added = getattr(hf, "get_added_vocab", None)
    if callable(get_added):
        ids.update(get_added().values())
    return ids


class TextEncoder:
    """Encodes prompt text; ``literal`` gives the plain-text ids of a control-token string."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.specials = added_token_strings(tokenizer)
        self.special_ids = added_token_ids(tokenizer)
        self._pattern = re.compile("|".join(re.escape(s) for s in self.specials)) if self.specials else None
        self._literal: Dict[str, List[int]] = {}

    def encode(self, text: str) -> List[int]:
        return list(_hf(self.tokenizer).encode(text, add_special_tokens=False)) if text else []

    def literal(self, text: str) -> List[int]:
        """Ids for ``text`` as text: none of them is an added token."""
        ids = self._literal.get(text)
        if ids is None:
            hf = _hf(self.tokenizer)
            try:
                ids = list(hf.encode(text, add_special_tokens=False, split_special_tokens=True))
            except TypeError:  # a tokenizer without split_special_tokens
                ids = []
            if not ids or any(i in self.special_ids for i in ids):
                # Character by character: no added token is one character long and also text.
                ids = [i for ch in text for i in hf.encode(ch, add_special_tokens=False)]
                if any(i in self.special_ids for i in ids):
                    raise ValueError(f"cannot encode {text!r} as plain text with this tokenizer")
            self._literal[text] = ids
        return ids

    def has_specials(self, text: str) -> bool:
        return bool(self._pattern and self._pattern.search(text))


def chat_prompt_ids(encoder: TextEncoder, messages: Sequence[Dict[str, str]], think: bool = False) -> List[int]:
    """Token ids of ``messages`` ({"role", "content": str}) in the checkpoint's chat format
    (its template, else Gemma 4's), with every content tokenized as text."""
    tag = secrets.token_hex(8)
    open_, close = "\ue000" + tag, "\ue001"
    table: List[str] = []

    def hide(match: "re.Match[str]") -> str:
        table.append(match.group(0))
        return f"{open_}{len(table) - 1}{close}"

    escaped = []
    for m in messages:
        content = m["content"]
        if m["role"] == "assistant":
            content = strip_reasoning(content)  # past reasoning is not fed back (as the template does)
        if encoder._pattern is not None:
            content = encoder._pattern.sub(hide, content)
        escaped.append({"role": m["role"], "content": content})
    text = format_prompt(encoder.tokenizer, escaped, think=think)
    if not table:
        return encoder.encode(text)
    ids: List[int] = []
    pieces = re.split(re.escape(open_) + r"(\d+)" + re.escape(close), text)
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            ids.extend(encoder.encode(piece))
        else:
            ids.extend(encoder.literal(table[int(piece)]))
    return ids
