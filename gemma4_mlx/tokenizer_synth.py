"""A real, small tokenizer with Gemma 4's special tokens, for random-weight checkpoints.

The vocabulary is a byte-level BPE (every byte string encodes; ASCII round-trips exactly) padded
to exactly ``vocab_size`` entries. Gemma 4's special tokens keep their published ids whenever the
vocabulary is large enough to hold them (all control tokens sit below 107, so even a 512-entry
vocab keeps them; the multimodal placeholders near 256k only exist in full-size vocabs).

Files written: ``tokenizer.json``, ``tokenizer_config.json`` (with a Gemma 4 ``chat_template``
unless ``chat_template=False``), ``special_tokens_map.json`` and ``generation_config.json``.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

# Published ids of Gemma 4's special tokens (google/gemma-4-*-it tokenizer).
SPECIAL_TOKENS: Dict[str, int] = {
    "<pad>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "<unk>": 3,
    "<mask>": 4,
    "<|tool>": 46,
    "<tool|>": 47,
    "<|tool_call>": 48,
    "<tool_call|>": 49,
    "<|tool_response>": 50,
    "<tool_response|>": 51,
    '<|"|>': 52,
    "<|think|>": 98,
    "<|channel>": 100,
    "<channel|>": 101,
    "<|turn>": 105,
    "<turn|>": 106,
    # Multimodal placeholders: only in vocabularies large enough to hold them.
    "<|image>": 255999,
    "<|audio>": 256000,
    "<|image|>": 258880,
    "<|audio|>": 258881,
    "<image|>": 258882,
    "<audio|>": 258883,
    "<|video|>": 258884,
}
PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
START_OF_TURN, END_OF_TURN, THINK = "<|turn>", "<turn|>", "<|think|>"

# Gemma 4's chat format: <bos><|turn>role\n...<turn|>\n, "assistant" rendered as "model",
# an optional system turn that carries <|think|> when thinking is enabled, and
# "<|turn>model\n" as the generation prompt.
GEMMA4_CHAT_TEMPLATE = (
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- elif content is iterable -%}"
    "{%- for part in content -%}{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{{ bos_token }}"
    "{%- set thinking = enable_thinking is defined and enable_thinking -%}"
    "{%- if messages and messages[0]['role'] in ('system', 'developer') -%}"
    "{{ '<|turn>system\\n' }}{%- if thinking -%}{{ '<|think|>' }}{%- endif -%}"
    "{{ text(messages[0]['content']) | trim }}{{ '<turn|>\\n' }}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- if thinking -%}{{ '<|turn>system\\n<|think|><turn|>\\n' }}{%- endif -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<|turn>' + role + '\\n' }}{{ text(message['content']) | trim }}{{ '<turn|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|turn>model\\n' }}{%- endif -%}"
)

# A little English/code text to learn BPE merges from, so common words are single tokens.
_CORPUS = """
The quick brown fox jumps over the lazy dog. A model reads text as tokens and predicts the next one.
Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris is.
Gemma runs on Apple silicon with MLX. The user asks a question and the model answers it.
def main():\n    print("hello world")\n    return 0\nfor i in range(10):\n    x = x + i
Once upon a time there was a little robot who wanted to learn how to write stories about the sea.
It was the best of times, it was the worst of times, it was the age of wisdom and of foolishness.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14 42. Lists, tables and JSON: {"key": "value"}.
"""


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _learn_merges(max_merges: int) -> List[Tuple[str, str]]:
    """Deterministic byte-level BPE over the built-in corpus (ties broken lexicographically)."""
    import re

    b2u = _bytes_to_unicode()
    words = collections.Counter(
        tuple(b2u[b] for b in w.encode("utf-8"))
        for w in re.findall(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+", _CORPUS)
    )
    merges: List[Tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: collections.Counter = collections.Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if best[1] < 2:
            break
        a, b = best[0]
        merges.append((a, b))
        new_words: collections.Counter = collections.Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += c
        words = new_words
    return merges


def special_token_ids(vocab_size: int) -> Dict[str, int]:
    """The special tokens a vocabulary of this size holds, with their ids."""
    return {t: i for t, i in SPECIAL_TOKENS.items() if i < vocab_size}


def build_tokenizer(vocab_size: int):
    """A ``tokenizers.Tokenizer`` with exactly ``vocab_size`` entries."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    specials = special_token_ids(vocab_size)
    minimum = 256 + len(specials)
    if vocab_size < max(minimum, 107):
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer (needs >= {max(minimum, 107)})")
    taken = set(specials.values())
    free = (i for i in range(vocab_size) if i not in taken)

    vocab: Dict[str, int] = dict(specials)
    alphabet = [_bytes_to_unicode()[b] for b in range(256)]
    for ch in alphabet:
        vocab[ch] = next(free)
    room = vocab_size - len(vocab)
    merges = []
    for a, b in _learn_merges(min(room, 2000)):
        if a in vocab and b in vocab and a + b not in vocab:
            if len(vocab) >= vocab_size:
                break
            vocab[a + b] = next(free)
            merges.append((a, b))
    n = 0
    while len(vocab) < vocab_size:  # unreachable filler entries: the vocab is exactly vocab_size
        vocab[f"<unused{n}>"] = next(free)
        n += 1
    assert len(vocab) == vocab_size and max(vocab.values()) == vocab_size - 1

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, specials[BOS])]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sorted(specials, key=specials.get)])
    for t, i in specials.items():
        if tok.token_to_id(t) != i:  # pragma: no cover - a tokenizers behaviour change
            raise RuntimeError(f"special token {t} got id {tok.token_to_id(t)}, expected {i}")
    return tok


def eos_token_ids(vocab_size: int) -> List[int]:
    s = special_token_ids(vocab_size)
    return [s[EOS], s[END_OF_TURN]]


def synthesize_tokenizer(out_dir: Union[str, Path], vocab_size: int, *, chat_template: bool = True,
                         model_max_length: Optional[int] = None) -> Dict[str, int]:
    """Write a Gemma 4-style tokenizer of exactly ``vocab_size`` entries into ``out_dir``.

    Returns the special-token ids used (token -> id). ``chat_template=False`` leaves the
    template out (generation must cope with template-less checkpoints).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(vocab_size)
    specials = special_token_ids(vocab_size)
    tok.save(str(out / "tokenizer.json"))

    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
        for t, i in sorted(specials.items(), key=lambda kv: kv[1])
    }
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "mask_token": "<mask>",
        "add_bos_token": True,
        "add_eos_token": False,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(model_max_length or 131072),
        "added_tokens_decoder": added,
        "sot_token": START_OF_TURN,
        "eot_token": END_OF_TURN,
        "think_token": THINK,
    }
    if chat_template:
        cfg["chat_template"] = GEMMA4_CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK,
                    "mask_token": "<mask>"}, indent=2) + "\n", encoding="utf-8")
    gen = {
        "bos_token_id": specials[BOS],
        "eos_token_id": eos_token_ids(vocab_size),
        "pad_token_id": specials[PAD],
        "do_sample": True,
        "temperature": 1.0,
        "top_k": 64,
        "top_p": 0.95,
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    return specials
