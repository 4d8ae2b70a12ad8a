"""Gemma 4's chat format and the streaming parser that splits reasoning from the answer.

The prompt format (Gemma 4 control tokens, as Google documents them)::

    <bos><|turn>system\n<|think|>{system}<turn|>\n<|turn>user\n{content}<turn|>\n<|turn>model\n

* ``<|turn>ROLE\n ... <turn|>\n`` delimits a turn; roles are ``system``, ``user``, ``model``
  (``assistant`` messages are written as ``model`` turns).
* Thinking is switched on by ``<|think|>`` at the start of the system turn (a system turn holding
  only ``<|think|>`` is added when there is no system prompt).
* The model writes its reasoning as ``<|channel>thought\n ... <channel|>`` before the answer;
  :class:`ReasoningParser` separates the two, whatever way the markers are split across pieces.

When the checkpoint's tokenizer carries a chat template it is used instead (with
``enable_thinking``), so the prompt is exactly what the checkpoint expects.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

BOS = "<bos>"
TURN_START = "<|turn>"
TURN_END = "<turn|>"
THINK = "<|think|>"
CHANNEL_START = "<|channel>"
CHANNEL_END = "<channel|>"
THOUGHT_HEADER = "thought\n"

Message = Dict[str, Any]


def _role(role: str) -> str:
    role = (role or "user").lower()
    if role == "assistant":
        return "model"
    if role not in ("system", "user", "model", "developer"):
        raise ValueError(f"unknown chat role {role!r} (expected system, user or assistant)")
    return "system" if role == "developer" else role


def _content(message: Message) -> str:
    content = message.get("content", "")
    if isinstance(content, list):  # OpenAI-style parts: keep the text ones
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def messages_from(prompt: Union[str, Sequence[Message]], system: Optional[str] = None) -> List[Message]:
    """A message list for a user prompt (str) or an existing list, with ``system`` first if given."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [dict(m) for m in prompt]
    if system and not (messages and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def gemma4_prompt(messages: Sequence[Message], think: bool = False, bos: Optional[str] = BOS,
                  add_generation_prompt: bool = True) -> str:
    """Render ``messages`` in Gemma 4's own chat format (no template needed)."""
    out = [bos or ""]
    msgs = list(messages)
    system = None
    if msgs and _role(msgs[0].get("role", "user")) == "system":
        system = _content(msgs.pop(0))
    if think or system:
        out.append(f"{TURN_START}system\n{THINK if think else ''}{(system or '').strip()}{TURN_END}\n")
    for m in msgs:
        role = _role(m.get("role", "user"))
        text = _content(m)
        if role == "model":
            text = strip_reasoning(text)  # past thinking is not fed back, as the official template does
        out.append(f"{TURN_START}{role}\n{text.strip()}{TURN_END}\n")
    if add_generation_prompt:
        out.append(f"{TURN_START}model\n")
    return "".join(out)


def next_turn_text(user: str, previous_closed: bool) -> str:
    """Text that extends a cached conversation (ending with the model's reply) by one user turn."""
    close = "" if previous_closed else TURN_END
    return f"{close}\n{TURN_START}user\n{user.strip()}{TURN_END}\n{TURN_START}model\n"


def has_chat_template(tokenizer) -> bool:
    flag = getattr(tokenizer, "has_chat_template", None)
    if flag is not None:
        return bool(flag)
    return getattr(tokenizer, "chat_template", None) is not None


def bos_text(tokenizer) -> str:
    bos = getattr(tokenizer, "bos_token", None)
    return bos if isinstance(bos, str) and bos else BOS


def format_prompt(tokenizer, prompt: Union[str, Sequence[Message]], system: Optional[str] = None,
                  think: bool = False, use_template: bool = True) -> str:
    """The prompt text for one generation: the checkpoint's template if it has one, else Gemma 4's."""
    messages = messages_from(prompt, system)
    if use_template and has_chat_template(tokenizer):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                 enable_thinking=think)
        except Exception as e:  # a broken template: say so, don't silently switch formats
            raise ValueError(f"the checkpoint's chat template failed: {str(e).splitlines()[0] if str(e) else e}") from e
    return gemma4_prompt(messages, think=think, bos=bos_text(tokenizer))


def encode_text(tokenizer, text: str) -> List[int]:
    """Token ids for prompt text that already holds its special tokens (no second BOS)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def strip_reasoning(text: str) -> str:
    parser = ReasoningParser()
    answer, _ = parser.feed(text)
    a2, _ = parser.finish()
    return answer + a2


def _partial_suffix(buf: str, marker: str) -> int:
    """Length of the longest suffix of ``buf`` that is a proper prefix of ``marker``."""
    for n in range(min(len(buf), len(marker) - 1), 0, -1):
        if marker.startswith(buf[-n:]):
            return n
    return 0


class ReasoningParser:
    """Streaming split of ``<|channel>thought\\n ... <channel|>`` (reasoning) from the answer.

    ``feed(piece)`` returns ``(answer_text, reasoning_text)`` that is certain so far; text that
    might be the start of a marker is held back until the next piece decides it. ``finish()``
    flushes what is held (an unfinished marker is plain text). Markers never reach either output.
    """

    ANSWER, HEADER, THINKING = "answer", "header", "thinking"

    def __init__(self):
        self.state = self.ANSWER
        self._buf = ""

    @property
    def in_reasoning(self) -> bool:
        return self.state != self.ANSWER

    def feed(self, piece: str) -> Tuple[str, str]:
        self._buf += piece
        answer: List[str] = []
        reasoning: List[str] = []
        while True:
            buf = self._buf
            if self.state == self.ANSWER:
                i = buf.find(CHANNEL_START)
                j = buf.find(CHANNEL_END)
                if j >= 0 and (i < 0 or j < i):  # a stray end marker: drop it
                    answer.append(buf[:j])
                    self._buf = buf[j + len(CHANNEL_END):]
                    continue
                if i >= 0:
                    answer.append(buf[:i])
                    self._buf = buf[i + len(CHANNEL_START):]
                    self.state = self.HEADER
                    continue
                keep = max(_partial_suffix(buf, CHANNEL_START), _partial_suffix(buf, CHANNEL_END))
                answer.append(buf[: len(buf) - keep])
                self._buf = buf[len(buf) - keep:]
                break
            if self.state == self.HEADER:
                if buf.startswith(THOUGHT_HEADER):
                    self._buf = buf[len(THOUGHT_HEADER):]
                    self.state = self.THINKING
                    continue
                if THOUGHT_HEADER.startswith(buf):
                    break  # could still become the header: wait
                if buf.startswith(THOUGHT_HEADER[:-1]):  # "thought" without its newline
                    self._buf = buf[len(THOUGHT_HEADER) - 1:]
                self.state = self.THINKING  # another channel name: keep it as reasoning text
                continue
            # THINKING
            i = buf.find(CHANNEL_END)
            if i >= 0:
                reasoning.append(buf[:i])
                self._buf = buf[i + len(CHANNEL_END):]
                self.state = self.ANSWER
                continue
            keep = _partial_suffix(buf, CHANNEL_END)
            reasoning.append(buf[: len(buf) - keep])
            self._buf = buf[len(buf) - keep:]
            break
        return "".join(answer), "".join(reasoning)

    def finish(self) -> Tuple[str, str]:
        buf, self._buf = self._buf, ""
        if self.state == self.ANSWER:
            return buf, ""
        if self.state == self.HEADER:
            self.state = self.THINKING
            return "", "" if THOUGHT_HEADER.startswith(buf) else buf
        return "", buf


def split_reasoning(text: str) -> Tuple[str, str]:
    """(answer, reasoning) of a complete output."""
    p = ReasoningParser()
    a, r = p.feed(text)
    a2, r2 = p.finish()
    return a + a2, r + r2


def iter_split(pieces: Iterable[str]) -> Tuple[str, str]:
    p = ReasoningParser()
    answer, reasoning = [], []
    for piece in pieces:
        a, r = p.feed(piece)
        answer.append(a)
        reasoning.append(r)
    a, r = p.finish()
    return "".join(answer) + a, "".join(reasoning) + r
