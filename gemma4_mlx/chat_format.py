"""Gemma 4's chat format, special-token-safe prompt encoding, and the streaming parser that splits
reasoning from the answer.

The prompt format (Gemma 4 control tokens, as Google documents them)::

    <bos><|turn>system\n<|think|>{system}{tool declarations}<turn|>\n<|turn>user\n{content}<turn|>\n<|turn>model\n

* ``<|turn>ROLE\n ... <turn|>\n`` delimits a turn; roles are ``system``, ``user``, ``model``
  (``assistant`` messages are written as ``model`` turns).
* Thinking is switched on by ``<|think|>`` at the start of the system turn (a system turn holding
  only ``<|think|>`` is added when there is no system prompt). It is off unless asked.
* Tools (:mod:`gemma4_mlx.tools`): declarations in the system turn; an assistant message's calls
  and the responses of the ``tool`` messages after it inside the model's turn, which then stays
  open for the model to go on.
* The model writes its reasoning as ``<|channel>thought\n ... <channel|>`` before the answer;
  :class:`ReasoningParser` separates the two, whatever way the markers are split across pieces.

When the checkpoint's tokenizer carries a chat template it is used instead (with
``enable_thinking`` always explicit), so the prompt is exactly what the checkpoint expects.
:func:`encode_prompt` tokenizes the rendered prompt so that special-token text inside any caller
content stays text (:class:`SpecialTokenGuard`): control tokens come only from the template.
"""

from __future__ import annotations

import functools
import re
import secrets
import weakref
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .tools import (
    TOOL_RESPONSE_START,
    ToolCall,
    call_arguments,
    format_call,
    format_declaration,
    format_response,
    normalize_tools,
    partial_suffix,
)

BOS = "<bos>"
TURN_START = "<|turn>"
TURN_END = "<turn|>"
THINK = "<|think|>"
CHANNEL_START = "<|channel>"
CHANNEL_END = "<channel|>"
THOUGHT_HEADER = "thought\n"

Message = Dict[str, Any]
ROLES = ("system", "developer", "user", "assistant", "model", "tool")


def _role(role: str) -> str:
    role = (role or "user").lower()
    if role == "assistant":
        return "model"
    if role not in ROLES:
        raise ValueError(f"unknown chat role {role!r} (expected system, user, assistant or tool)")
    return "system" if role == "developer" else role


def _content(message: Message) -> str:
    content = message.get("content", "")
    if content is None:
        return ""
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


def _normal_call(call: Any, n: int) -> Dict[str, Any]:
    if isinstance(call, ToolCall):
        call = call.to_openai()
    if not isinstance(call, Mapping):
        raise ValueError(f"tool_calls[{n}] must be an object")
    fn = call.get("function", call)
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ValueError(f"tool_calls[{n}] needs function.name")
    out = {"type": "function", "function": {"name": name, "arguments": call_arguments(call)}}
    if call.get("id") is not None:
        out["id"] = str(call["id"])
    return out


def normalize_messages(messages: Sequence[Message]) -> List[Message]:
    """Checked copies of ``messages``, as every renderer here expects them.

    Roles are checked; ``content: None`` becomes ``""``; past reasoning is dropped from
    assistant messages (as Gemma 4's template does); ``tool_calls`` get mapping arguments (an
    OpenAI JSON string is decoded) and may be :class:`~gemma4_mlx.tools.ToolCall` objects; a
    ``tool`` message must answer an assistant message with ``tool_calls``.
    """
    out: List[Message] = []
    for n, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"messages[{n}] must be an object with 'role' and 'content'")
        m = dict(m)
        role = m.get("role")
        if not isinstance(role, str):
            raise ValueError(f"messages[{n}].role must be a string")
        r = _role(role)
        content = m.get("content")
        if content is None:
            m["content"] = ""
        elif not isinstance(content, (str, list)) and not (r == "tool" and isinstance(content, Mapping)):
            raise ValueError(f"messages[{n}].content must be a string or a list of parts")
        if r == "model":
            if isinstance(m["content"], str):
                m["content"] = strip_reasoning(m["content"])
            elif isinstance(m["content"], list):
                m["content"] = [dict(p, text=strip_reasoning(p["text"])) if isinstance(p, dict) and isinstance(
                    p.get("text"), str) else p for p in m["content"]]
            if m.get("tool_calls"):
                if not isinstance(m["tool_calls"], (list, tuple)):
                    raise ValueError(f"messages[{n}].tool_calls must be a list")
                m["tool_calls"] = [_normal_call(c, k) for k, c in enumerate(m["tool_calls"])]
            else:
                m.pop("tool_calls", None)
        elif "tool_calls" in m:
            raise ValueError(f"messages[{n}]: only assistant messages carry tool_calls")
        if r == "tool":
            prev = out[-1] if out else None
            if prev is None or not (prev.get("tool_calls") or _role(prev["role"]) == "tool"):
                raise ValueError(f"messages[{n}]: a tool message must follow an assistant message with tool_calls")
        out.append(m)
    return out


def _tool_name(follow: Message, calls: Sequence[Message]) -> str:
    name = follow.get("name") or "unknown"
    for c in calls:
        if c.get("id") and c.get("id") == follow.get("tool_call_id"):
            name = c["function"]["name"]
    return name


def _tool_body(follow: Message) -> Any:
    content = follow.get("content")
    return dict(content) if isinstance(content, Mapping) else _content(follow)


def gemma4_prompt(messages: Sequence[Message], think: bool = False, bos: Optional[str] = BOS,
                  add_generation_prompt: bool = True, tools: Optional[Sequence[Any]] = None,
                  continue_final: bool = False) -> str:
    """Render ``messages`` in Gemma 4's own chat format (no template needed).

    Tool declarations go in the system turn; an assistant message's ``tool_calls`` are written
    as calls in its turn, and the ``tool`` messages that follow it as response blocks in the
    same turn (then the turn stays open: the model goes on after the responses, and no
    generation prompt is added). ``continue_final`` leaves the last message open (a prefilled
    reply). The checkpoint template that ``init`` writes renders exactly the same text.
    """
    tools = normalize_tools(tools) or []
    msgs = normalize_messages(messages)
    out = [bos or ""]
    system = None
    if msgs and _role(msgs[0]["role"]) == "system":
        system = _content(msgs.pop(0))
    if think or system is not None or tools:
        decls = "".join(format_declaration(t) for t in tools)
        out.append(f"{TURN_START}system\n{THINK if think else ''}{(system or '').strip()}{decls}{TURN_END}\n")
    prev_role = None
    open_turn = False
    for i, m in enumerate(msgs):
        role = _role(m["role"])
        if role == "tool":
            continue  # written inside the model turn that called it
        if not (role == "model" and prev_role == "model"):
            out.append(f"{TURN_START}{role}\n")
        prev_role = role
        calls = m.get("tool_calls") or []
        for c in calls:
            out.append(format_call(c["function"]["name"], c["function"]["arguments"]))
        answered = False
        if calls:
            for follow in msgs[i + 1:]:
                if _role(follow["role"]) != "tool":
                    break
                out.append(format_response(_tool_name(follow, calls), _tool_body(follow)))
                answered = True
        text = _content(m).strip()
        out.append(text)
        if continue_final and i == len(msgs) - 1:
            return "".join(out)
        if calls and not answered:
            out.append(TOOL_RESPONSE_START)
            open_turn = True
        elif answered and not text:
            open_turn = True
        else:
            out.append(f"{TURN_END}\n")
            open_turn = False
    if add_generation_prompt and not open_turn:
        out.append(f"{TURN_START}model\n")
    return "".join(out)


def next_turn_text(user: str, previous_closed: bool) -> str:
    """Text that extends a cached conversation (ending with the model's reply) by one user turn."""
    close = "" if previous_closed else TURN_END
    return f"{close}\n{TURN_START}user\n{user.strip()}{TURN_END}\n{TURN_START}model\n"


def tool_results_text(results: Sequence[Tuple[str, Any]], opened: bool) -> str:
    """Text that extends a cached model turn that made tool calls by their ``(name, result)``
    responses; ``opened``: the model already wrote the first ``<|tool_response>``."""
    return "".join(format_response(name, body, opened=not (opened and k == 0)) for k, (name, body) in enumerate(results))


def has_chat_template(tokenizer) -> bool:
    flag = getattr(tokenizer, "has_chat_template", None)
    if flag is not None:
        return bool(flag)
    return getattr(tokenizer, "chat_template", None) is not None


def bos_text(tokenizer) -> str:
    bos = getattr(tokenizer, "bos_token", None)
    return bos if isinstance(bos, str) and bos else BOS


def thinking_wanted(think: bool, template_kwargs: Optional[Mapping[str, Any]]) -> bool:
    """Thinking is off unless asked: ``think=True`` or ``enable_thinking`` in the template options."""
    if template_kwargs and "enable_thinking" in template_kwargs:
        return bool(template_kwargs["enable_thinking"])
    return bool(think)


def _template_source(tokenizer) -> str:
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):
        return " ".join(str(v) for v in tpl.values())
    return tpl if isinstance(tpl, str) else ""


def _render(tokenizer, messages: List[Message], *, think: bool, use_template: bool, tools, template_kwargs,
            continue_final: bool) -> str:
    template_kwargs = dict(template_kwargs or {})
    think = thinking_wanted(think, template_kwargs)
    template_kwargs.pop("enable_thinking", None)
    if use_template and has_chat_template(tokenizer):
        if tools and "tools" not in _template_source(tokenizer):
            raise ValueError("the checkpoint's chat template has no tool support; use Gemma 4's built-in format "
                             "(--use-default-chat-template / use_template=False) to pass tools")
        try:
            # enable_thinking always explicit: mlx-lm's wrapper would default it on for Gemma 4.
            return tokenizer.apply_chat_template(
                messages, tools=tools or None, tokenize=False, add_generation_prompt=not continue_final,
                continue_final_message=continue_final, enable_thinking=think, **template_kwargs)
        except Exception as e:  # a broken template: say so, don't silently switch formats
            raise ValueError(f"the checkpoint's chat template failed: {str(e).splitlines()[0] if str(e) else e}") from e
    if template_kwargs:
        raise ValueError(f"chat template options {sorted(template_kwargs)} need a chat template, and this checkpoint "
                         "has none (Gemma 4's built-in format only knows enable_thinking)")
    return gemma4_prompt(messages, think=think, bos=bos_text(tokenizer), tools=tools, continue_final=continue_final)


def _prompt_messages(prompt, system, prefill) -> List[Message]:
    messages = normalize_messages(messages_from(prompt, system))
    if prefill is not None:  # the start of this reply, as given (not a past reply: nothing dropped)
        if not isinstance(prefill, str):
            raise ValueError("prefill_response must be a string")
        messages.append({"role": "assistant", "content": prefill})
    return messages


def format_prompt(tokenizer, prompt: Union[str, Sequence[Message]], system: Optional[str] = None,
                  think: bool = False, use_template: bool = True, tools: Optional[Sequence[Any]] = None,
                  template_kwargs: Optional[Mapping[str, Any]] = None, prefill: Optional[str] = None) -> str:
    """The prompt text for one generation: the checkpoint's template if it has one, else Gemma 4's.

    Thinking is off unless ``think`` (or ``enable_thinking`` in ``template_kwargs``) is true; it is
    always passed to the template explicitly. ``prefill`` starts the model's reply with that text.
    """
    return _render(tokenizer, _prompt_messages(prompt, system, prefill), think=think, use_template=use_template,
                   tools=normalize_tools(tools), template_kwargs=template_kwargs, continue_final=prefill is not None)


def encode_text(tokenizer, text: str) -> List[int]:
    """Token ids for prompt text that already holds its special tokens (no second BOS)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


# -- special-token text in caller content ------------------------------------------------------
_SPECIALS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def special_token_strings(tokenizer) -> Tuple[str, ...]:
    """The text of every special token (``<bos>``, ``<|turn>``, ``<turn|>``, ``<|think|>`` ...).

    Kept per tokenizer (real vocabularies add thousands of tokens) and read again when the
    tokenizer's size changes (tokens added)."""
    inner = getattr(tokenizer, "_tokenizer", tokenizer)
    try:
        size = len(tokenizer)
        cached = _SPECIALS.get(inner)
    except TypeError:  # not weak-referenceable, or no len(): read it every time
        return _read_special_strings(tokenizer)
    if cached is None or cached[0] != size:
        cached = (size, _read_special_strings(tokenizer))
        _SPECIALS[inner] = cached
    return cached[1]


def _read_special_strings(tokenizer) -> Tuple[str, ...]:
    strings = set()
    decoder = getattr(tokenizer, "added_tokens_decoder", None)
    if isinstance(decoder, Mapping):
        strings = {getattr(t, "content", str(t)) for t in decoder.values() if getattr(t, "special", True)}
    strings.update(getattr(tokenizer, "all_special_tokens", None) or [])
    return tuple(sorted((s for s in strings if isinstance(s, str) and s), key=lambda s: (-len(s), s)))


def _trie_pattern(strings: Sequence[str]) -> str:
    """A regex matching any of ``strings`` (longest first), factored by common prefixes so a
    scan costs little even with thousands of special tokens."""
    trie: Dict[str, Any] = {}
    for s in strings:
        node = trie
        for ch in s:
            node = node.setdefault(ch, {})
        node[""] = True

    def emit(node) -> str:
        branches = [re.escape(ch) + emit(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        alt = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return "(?:" + alt + ")?" if "" in node else alt

    return emit(trie)


@functools.lru_cache(maxsize=8)
def _special_regex(strings: Tuple[str, ...]):
    return re.compile(_trie_pattern(strings)) if strings else None


_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"


class SpecialTokenGuard:
    """Keeps special-token text in caller content (messages, system prompt, tool results ...) as
    text: control tokens come only from the template.

    :meth:`shield` replaces each special-token string in caller text by a private marker before
    rendering; :meth:`encode` tokenizes the rendered prompt with the template's special tokens
    as such and the marked strings back in place as plain text (special-token matching off).
    Content without special-token text is tokenized exactly as the whole rendered text would be.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.regex = _special_regex(special_token_strings(tokenizer))
        # Digits only: a marker survives a template's ``upper``/``lower`` (schema types are upper-cased).
        self.nonce = f"{secrets.randbelow(10**12):012d}"
        self.found: List[str] = []
        self._marker = re.compile(re.escape(_MARK_OPEN + self.nonce) + r":(\d+)" + re.escape(_MARK_CLOSE))

    def shield(self, text: str) -> str:
        if self.regex is None or not text:
            return text

        def mark(m):
            self.found.append(m.group(0))
            return f"{_MARK_OPEN}{self.nonce}:{len(self.found) - 1}{_MARK_CLOSE}"

        return self.regex.sub(mark, text)

    def shield_data(self, obj: Any) -> Any:
        """``obj`` (messages, tools) with every string shielded, keys and role/type values too: a
        valid role or type holds no special-token text, so only forged ones change."""
        if isinstance(obj, str):
            return self.shield(obj)
        if isinstance(obj, Mapping):
            return {self.shield(k) if isinstance(k, str) else k: self.shield_data(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self.shield_data(v) for v in obj]
        return obj

    def _text_ids(self, text: str) -> List[int]:
        if not text:
            return []
        text = self._marker.sub(lambda m: self.found[int(m.group(1))], text)
        return list(self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))

    def encode(self, rendered: str) -> List[int]:
        if not self.found:
            return encode_text(self.tokenizer, rendered)
        ids: List[int] = []
        pos = 0
        for m in self.regex.finditer(rendered):
            ids += self._text_ids(rendered[pos:m.start()])
            ids.append(int(self.tokenizer.convert_tokens_to_ids(m.group(0))))
            pos = m.end()
        ids += self._text_ids(rendered[pos:])
        return ids


def check_text(text: str, what: str = "the prompt") -> None:
    """ValueError (one line) for text that cannot be UTF-8: lone surrogates, e.g. undecodable bytes
    that Python smuggled in from argv or a file opened with ``errors='surrogateescape'``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        detail = (f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"U+{ord(bad):04X}")
        raise ValueError(f"{what} is not valid UTF-8 text ({detail} at character {e.start})") from None


def _check_strings(obj: Any, what: str) -> None:
    if isinstance(obj, str):
        check_text(obj, what)
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _check_strings(k, what)
            _check_strings(v, what)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _check_strings(v, what)


def encode_prompt(tokenizer, prompt: Union[str, Sequence[Message]], system: Optional[str] = None,
                  think: bool = False, use_template: bool = True, tools: Optional[Sequence[Any]] = None,
                  template_kwargs: Optional[Mapping[str, Any]] = None, prefill: Optional[str] = None,
                  after_cached_prefix: bool = False) -> List[int]:
    """Token ids of :func:`format_prompt`'s text, with special-token text in any caller string
    (messages, system prompt, tools, prefill) tokenized as plain text.

    ``after_cached_prefix``: only the ids from the last user message's content on (a saved
    prompt cache holds what comes before it, as ``mlx_lm.cache_prompt`` writes it).
    """
    messages = _prompt_messages(prompt, system, prefill)
    tools = normalize_tools(tools)
    _check_strings(messages, "the prompt")
    _check_strings(tools, "the tools")
    guard = SpecialTokenGuard(tokenizer)
    shielded = guard.shield_data(messages)
    shielded_tools = guard.shield_data(tools) if tools else tools
    start = None
    if after_cached_prefix:
        start = _MARK_OPEN + "query" + guard.nonce + _MARK_CLOSE
        users = [m for m in shielded if _role(m["role"]) == "user"]
        if not users:
            raise ValueError("continuing a prompt cache needs a user message")
        users[-1]["content"] = start + _content(users[-1]).strip()
    text = _render(tokenizer, shielded, think=think, use_template=use_template, tools=shielded_tools,
                   template_kwargs=template_kwargs, continue_final=prefill is not None)
    if start is not None:
        if start not in text:
            raise ValueError("the chat template does not write the prompt as it was given; cannot continue a prompt cache")
        text = text[text.index(start) + len(start):]
    return guard.encode(text)


def encode_next_turn(tokenizer, user: str, previous_closed: bool) -> List[int]:
    """Ids of :func:`next_turn_text`, the user's special-token text kept as text."""
    check_text(user, "the message")
    guard = SpecialTokenGuard(tokenizer)
    return guard.encode(next_turn_text(guard.shield(user), previous_closed))


def encode_tool_results(tokenizer, results: Sequence[Tuple[str, Any]], opened: bool) -> List[int]:
    """Ids of :func:`tool_results_text`, special-token text in the results kept as text."""
    _check_strings([r for _, r in results], "a tool result")
    guard = SpecialTokenGuard(tokenizer)
    return guard.encode(tool_results_text([(guard.shield(n), guard.shield_data(r)) for n, r in results], opened))


def strip_reasoning(text: str) -> str:
    parser = ReasoningParser()
    answer, _ = parser.feed(text)
    a2, _ = parser.finish()
    return answer + a2


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
                keep = max(partial_suffix(buf, CHANNEL_START), partial_suffix(buf, CHANNEL_END))
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
            keep = partial_suffix(buf, CHANNEL_END)
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
