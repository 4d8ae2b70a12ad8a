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
TOOL_RESPONSE = "<|tool_response>"

# Gemma 4's chat format: <bos><|turn>role\n...<turn|>\n, "assistant" rendered as "model",
# an optional system turn that carries <|think|> when thinking is enabled and the tool
# declarations, and "<|turn>model\n" as the generation prompt. Tool calls, and the responses of
# the tool messages that follow them, are written inside the model's turn in Gemma 4's notation
# (gemma4_mlx.tools); after responses the turn stays open for the model to go on. Past
# reasoning (<|channel>...<channel|>) is dropped from model turns.
# gemma4_mlx.chat_format.gemma4_prompt renders the same text in Python.
GEMMA4_CHAT_TEMPLATE = (
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- elif content is iterable and content is not mapping -%}"
    "{%- for part in content -%}{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- macro strip_thinking(t) -%}"
    "{%- for part in t.split('<channel|>') -%}{{ part.split('<|channel>')[0] }}{%- endfor -%}"
    "{%- endmacro -%}"
    "{%- macro value(v) -%}"
    "{%- if v is string -%}{{ '<|\"|>' + v + '<|\"|>' }}"
    "{%- elif v is boolean -%}{{ 'true' if v else 'false' }}"
    "{%- elif v is none -%}{{ 'null' }}"
    "{%- elif v is mapping -%}{{ '{' }}{%- for k, x in v | dictsort -%}"
    "{{ '' if loop.first else ',' }}{{ k ~ ':' }}{{ value(x) }}{%- endfor -%}{{ '}' }}"
    "{%- elif v is iterable -%}{{ '[' }}{%- for x in v -%}{{ '' if loop.first else ',' }}{{ value(x) }}"
    "{%- endfor -%}{{ ']' }}"
    "{%- else -%}{{ v }}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- macro schema(s) -%}"
    "{{ '{' }}{%- set sn = namespace(first=true) -%}"
    "{%- for k, x in s | dictsort -%}{%- if k != 'type' -%}"
    "{{ '' if sn.first else ',' }}{%- set sn.first = false -%}"
    "{%- if k == 'properties' and x is mapping -%}{{ 'properties:{' }}{%- for name, p in x | dictsort -%}"
    "{{ '' if loop.first else ',' }}{{ name ~ ':' }}{{ schema(p) if p is mapping else value(p) }}"
    "{%- endfor -%}{{ '}' }}"
    "{%- elif k == 'items' and x is mapping -%}{{ 'items:' }}{{ schema(x) }}"
    "{%- else -%}{{ k ~ ':' }}{{ value(x) }}"
    "{%- endif -%}{%- endif -%}{%- endfor -%}"
    "{%- if s['type'] is defined -%}{{ '' if sn.first else ',' }}{{ 'type:' }}"
    "{{ value(s['type'] | upper if s['type'] is string else s['type'] | map('upper') | list) }}{%- endif -%}"
    "{{ '}' }}"
    "{%- endmacro -%}"
    "{%- macro declaration(fn) -%}"
    "{{ '<|tool>declaration:' + fn['name'] + '{' }}"
    "{%- if fn['description'] -%}{{ 'description:' }}{{ value(fn['description']) }}{%- endif -%}"
    "{%- if fn['parameters'] -%}{{ ',' if fn['description'] else '' }}{{ 'parameters:' }}"
    "{{ schema(fn['parameters']) }}{%- endif -%}"
    "{{ '}<tool|>' }}"
    "{%- endmacro -%}"
    "{{ bos_token }}"
    "{%- set thinking = enable_thinking is defined and enable_thinking -%}"
    "{%- set has_system = messages and messages[0]['role'] in ('system', 'developer') -%}"
    "{%- if thinking or tools or has_system -%}"
    "{{ '<|turn>system\\n' }}{%- if thinking -%}{{ '<|think|>' }}{%- endif -%}"
    "{%- if has_system -%}{{ text(messages[0]['content']) | trim }}{%- endif -%}"
    "{%- for tool in tools or [] -%}{{ declaration(tool['function'] if tool['function'] is defined else tool) }}"
    "{%- endfor -%}"
    "{{ '<turn|>\\n' }}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] if has_system else messages -%}"
    "{%- set ns = namespace(prev=none, open=false) -%}"
    "{%- for message in loop_messages -%}{%- if message['role'] != 'tool' -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else "
    "('system' if message['role'] == 'developer' else message['role']) -%}"
    "{%- if not (role == 'model' and ns.prev == 'model') -%}{{ '<|turn>' + role + '\\n' }}{%- endif -%}"
    "{%- set ns.prev = role -%}"
    "{%- set calls = message['tool_calls'] if role == 'model' and message['tool_calls'] else [] -%}"
    "{%- for call in calls -%}{{ '<|tool_call>call:' + call['function']['name'] }}"
    "{%- if call['function']['arguments'] is string -%}{{ '{' + call['function']['arguments'] + '}' }}"
    "{%- else -%}{{ value(call['function']['arguments'] or {}) }}{%- endif -%}{{ '<tool_call|>' }}"
    "{%- endfor -%}"
    "{%- set r = namespace(stopped=false, answered=false) -%}"
    "{%- if calls -%}{%- for follow in loop_messages[loop.index0 + 1:] -%}"
    "{%- if follow['role'] != 'tool' -%}{%- set r.stopped = true -%}{%- endif -%}"
    "{%- if not r.stopped -%}"
    "{%- set t = namespace(name=follow['name'] or 'unknown') -%}"
    "{%- for call in calls -%}{%- if call['id'] and call['id'] == follow['tool_call_id'] -%}"
    "{%- set t.name = call['function']['name'] -%}{%- endif -%}{%- endfor -%}"
    "{{ '<|tool_response>response:' + t.name }}"
    "{%- if follow['content'] is mapping -%}{{ value(follow['content']) }}"
    "{%- else -%}{{ '{value:' }}{{ value(text(follow['content'])) }}{{ '}' }}{%- endif -%}"
    "{{ '<tool_response|>' }}{%- set r.answered = true -%}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- set content = (strip_thinking(text(message['content'])) if role == 'model' "
    "else text(message['content'])) | trim -%}"
    "{{ content }}"
    "{%- if calls and not r.answered -%}{{ '<|tool_response>' }}{%- set ns.open = true -%}"
    "{%- elif r.answered and not content -%}{%- set ns.open = true -%}"
    "{%- else -%}{{ '<turn|>\\n' }}{%- set ns.open = false -%}"
    "{%- endif -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt and not ns.open -%}{{ '<|turn>model\\n' }}{%- endif -%}"
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
    """config.json's end ids: <eos> and <turn|>."""
    s = special_token_ids(vocab_size)
    return [s[EOS], s[END_OF_TURN]]


def generation_eos_token_ids(vocab_size: int) -> List[int]:
    """generation_config.json's end ids: also <|tool_response>, which the model writes after a tool
    call to hand over to the host (as Gemma 4's published generation_config.json has it)."""
    return eos_token_ids(vocab_size) + [special_token_ids(vocab_size)[TOOL_RESPONSE]]


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
        "eos_token_id": generation_eos_token_ids(vocab_size),
        "pad_token_id": specials[PAD],
        "do_sample": True,
        "temperature": 1.0,
        "top_k": 64,
        "top_p": 0.95,
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    return specials
