"""Gemma 4 tool calling: declarations, calls and responses in Gemma 4's markup, and a streaming
parser that turns the model's calls into structured ones.

Gemma 4 writes values in its own notation (not JSON): strings between ``<|"|>`` delimiters, object
keys bare, keys in sorted order, ``true`` / ``false`` / ``null`` and numbers as in JSON::

    <|tool>declaration:get_weather{description:<|"|>Weather now<|"|>,parameters:{...}}<tool|>
    <|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:2}<tool_call|>
    <|tool_response>response:get_weather{value:<|"|>sunny<|"|>}<tool_response|>

Declarations sit in the system turn. A call is written by the model inside its turn; the model
then writes ``<|tool_response>`` (an end id in Gemma 4's ``generation_config.json``) and stops, the
host appends the response block, and the model goes on in the same turn.

Nothing here depends on a model or a tokenizer: the server reuses :class:`ToolCallParser`,
:func:`normalize_tools` and :class:`ToolCall` as they are.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

TOOL_DECL_START = "<|tool>"
TOOL_DECL_END = "<tool|>"
TOOL_CALL_START = "<|tool_call>"
TOOL_CALL_END = "<tool_call|>"
TOOL_RESPONSE_START = "<|tool_response>"
TOOL_RESPONSE_END = "<tool_response|>"
QUOTE = '<|"|>'

Tool = Dict[str, Any]


class ToolCallError(ValueError):
    """Markup that is not a well-formed Gemma 4 call."""


# -- Gemma 4's value notation ------------------------------------------------------------------
def _sorted_keys(mapping: Mapping) -> List[Any]:
    # Case-insensitive and stable, as Jinja's dictsort (which chat templates use) orders them.
    return sorted(mapping, key=lambda k: k.lower() if isinstance(k, str) else k)


def format_value(value: Any, quote_keys: bool = False) -> str:
    """``value`` in Gemma 4's notation (keys sorted; ``quote_keys`` wraps keys in ``<|"|>``)."""
    if isinstance(value, str):
        return QUOTE + value + QUOTE
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        items = []
        for k in _sorted_keys(value):
            key = QUOTE + str(k) + QUOTE if quote_keys else str(k)
            items.append(f"{key}:{format_value(value[k], quote_keys)}")
        return "{" + ",".join(items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v, quote_keys) for v in value) + "]"
    return str(value)


def format_schema(schema: Mapping[str, Any]) -> str:
    """A JSON schema as Gemma 4 declares parameters: keys sorted with ``type`` last and
    upper-case, ``properties`` and ``items`` as nested schemas."""
    parts = []
    for k in _sorted_keys(schema):
        if k == "type":
            continue
        v = schema[k]
        if k == "properties" and isinstance(v, Mapping):
            inner = ",".join(f"{name}:{format_schema(v[name]) if isinstance(v[name], Mapping) else format_value(v[name])}"
                             for name in _sorted_keys(v))
            parts.append(f"properties:{{{inner}}}")
        elif k == "items" and isinstance(v, Mapping):
            parts.append(f"items:{format_schema(v)}")
        else:
            parts.append(f"{k}:{format_value(v)}")
    if "type" in schema:
        t = schema["type"]
        parts.append("type:" + format_value([x.upper() for x in t] if isinstance(t, list) else str(t).upper()))
    return "{" + ",".join(parts) + "}"


def format_declaration(tool: Tool) -> str:
    """``<|tool>declaration:NAME{description:...,parameters:...}<tool|>`` for an OpenAI-style tool."""
    fn = tool["function"]
    parts = []
    if fn.get("description"):
        parts.append("description:" + format_value(fn["description"]))
    if fn.get("parameters"):
        parts.append("parameters:" + format_schema(fn["parameters"]))
    return f"{TOOL_DECL_START}declaration:{fn['name']}{{{','.join(parts)}}}{TOOL_DECL_END}"


def format_arguments(arguments: Union[Mapping[str, Any], str, None]) -> str:
    """The ``{...}`` of a call: a mapping in Gemma 4's notation; a string is taken as written."""
    if isinstance(arguments, str):
        return "{" + arguments + "}"
    return format_value(dict(arguments or {}))


def format_call(name: str, arguments: Union[Mapping[str, Any], str, None]) -> str:
    return f"{TOOL_CALL_START}call:{name}{format_arguments(arguments)}{TOOL_CALL_END}"


def format_response(name: str, response: Any, opened: bool = True) -> str:
    """A response block: a mapping's items, anything else as ``value``. ``opened=False`` leaves
    out the ``<|tool_response>`` opener (the model already wrote it before stopping)."""
    body = format_value(dict(response)) if isinstance(response, Mapping) else "{value:" + format_value(response) + "}"
    return (TOOL_RESPONSE_START if opened else "") + f"response:{name}{body}{TOOL_RESPONSE_END}"


class _Reader:
    """Recursive-descent reader of Gemma 4's notation (also accepts JSON's quoted strings)."""

    def __init__(self, text: str):
        self.s = text
        self.i = 0

    def error(self, what: str) -> ToolCallError:
        return ToolCallError(f"{what} at offset {self.i} of {self.s[:80]!r}")

    def skip_space(self) -> None:
        while self.i < len(self.s) and self.s[self.i].isspace():
            self.i += 1

    def peek(self, token: str) -> bool:
        return self.s.startswith(token, self.i)

    def expect(self, token: str) -> None:
        self.skip_space()
        if not self.peek(token):
            raise self.error(f"expected {token!r}")
        self.i += len(token)

    def value(self) -> Any:
        self.skip_space()
        if self.peek(QUOTE):
            end = self.s.find(QUOTE, self.i + len(QUOTE))
            if end < 0:
                raise self.error("unterminated string")
            out = self.s[self.i + len(QUOTE):end]
            self.i = end + len(QUOTE)
            return out
        if self.peek('"'):
            try:
                out, end = json.JSONDecoder().raw_decode(self.s, self.i)
            except json.JSONDecodeError as e:
                raise self.error("bad JSON string") from e
            self.i = end
            return out
        if self.peek("{"):
            return self.mapping()
        if self.peek("["):
            return self.sequence()
        return self.bare()

    def key(self) -> str:
        self.skip_space()
        if self.peek(QUOTE) or self.peek('"'):
            k = self.value()
            return str(k)
        start = self.i
        while self.i < len(self.s) and self.s[self.i] not in ":,{}[]" and not self.s[self.i].isspace():
            self.i += 1
        if self.i == start:
            raise self.error("expected a key")
        return self.s[start:self.i]

    def mapping(self) -> Dict[str, Any]:
        self.expect("{")
        out: Dict[str, Any] = {}
        self.skip_space()
        if self.peek("}"):
            self.i += 1
            return out
        while True:
            k = self.key()
            self.expect(":")
            out[k] = self.value()
            self.skip_space()
            if self.peek(","):
                self.i += 1
                continue
            self.expect("}")
            return out

    def sequence(self) -> List[Any]:
        self.expect("[")
        out: List[Any] = []
        self.skip_space()
        if self.peek("]"):
            self.i += 1
            return out
        while True:
            out.append(self.value())
            self.skip_space()
            if self.peek(","):
                self.i += 1
                continue
            self.expect("]")
            return out

    def bare(self) -> Any:
        start = self.i
        while self.i < len(self.s) and self.s[self.i] not in ",}]":
            self.i += 1
        word = self.s[start:self.i].strip()
        if not word:
            raise self.error("expected a value")
        if word in ("true", "True"):
            return True
        if word in ("false", "False"):
            return False
        if word in ("null", "None"):
            return None
        try:
            return int(word)
        except ValueError:
            pass
        try:
            number = float(word)
            if math.isfinite(number):
                return number
        except ValueError:
            pass
        return word  # an unquoted word: keep it as text rather than fail the call


def parse_value(text: str) -> Any:
    """A value in Gemma 4's notation (the whole text)."""
    r = _Reader(text)
    out = r.value()
    r.skip_space()
    if r.i != len(r.s):
        raise r.error("trailing text")
    return out


# -- calls -------------------------------------------------------------------------------------
def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolCall:
    """One call the model made: the function's ``name`` and its ``arguments`` (JSON values)."""

    name: str
    arguments: Dict[str, Any]
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> Dict[str, Any]:
        """The call as an OpenAI ``tool_calls`` entry (``arguments`` a JSON string)."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}

    def result(self, content: Any) -> Dict[str, Any]:
        """The ``tool`` message that answers this call."""
        return {"role": "tool", "tool_call_id": self.id, "name": self.name, "content": content}


def parse_call(body: str) -> ToolCall:
    """``call:NAME{...}`` (the text between ``<|tool_call>`` and ``<tool_call|>``) as a ToolCall."""
    text = body.strip()
    if not text.startswith("call:"):
        raise ToolCallError(f"a tool call starts with 'call:', got {text[:40]!r}")
    brace = text.find("{")
    name = (text[len("call:"):brace] if brace >= 0 else "").strip()
    if brace < 0 or not name:
        raise ToolCallError(f"a tool call needs a name and '{{arguments}}', got {text[:40]!r}")
    arguments = parse_value(text[brace:])
    if not isinstance(arguments, dict):
        raise ToolCallError(f"tool call arguments must be an object, got {text[brace:brace + 40]!r}")
    return ToolCall(name=name, arguments=arguments)


def partial_suffix(buf: str, marker: str) -> int:
    """Length of the longest suffix of ``buf`` that is a proper prefix of ``marker`` (text a
    streaming parser holds back: it may be the start of the marker)."""
    for n in range(min(len(buf), len(marker) - 1), 0, -1):
        if marker.startswith(buf[-n:]):
            return n
    return 0


class ToolCallParser:
    """Streaming split of ``<|tool_call>call:NAME{...}<tool_call|>`` from the answer text.

    ``feed(piece)`` returns ``(text, calls)``: the text that is certainly not part of a call and
    the calls completed by this piece, however the markup is split across pieces. A call whose
    markup is not well formed is passed through as text (nothing the model wrote is lost), and
    so is an unfinished call at :meth:`finish`. ``errors`` lists why each such call was refused.
    """

    def __init__(self):
        self._buf = ""
        self._in_call = False
        self.errors: List[str] = []

    def feed(self, piece: str) -> Tuple[str, List[ToolCall]]:
        self._buf += piece
        text: List[str] = []
        calls: List[ToolCall] = []
        while True:
            buf = self._buf
            if not self._in_call:
                i = buf.find(TOOL_CALL_START)
                if i >= 0:
                    text.append(buf[:i])
                    self._buf = buf[i:]
                    self._in_call = True
                    continue
                keep = partial_suffix(buf, TOOL_CALL_START)
                text.append(buf[: len(buf) - keep])
                self._buf = buf[len(buf) - keep:]
                break
            j = buf.find(TOOL_CALL_END)
            if j < 0:
                break
            markup = buf[: j + len(TOOL_CALL_END)]
            self._buf = buf[j + len(TOOL_CALL_END):]
            self._in_call = False
            try:
                calls.append(parse_call(markup[len(TOOL_CALL_START):-len(TOOL_CALL_END)]))
            except ToolCallError as e:
                self.errors.append(str(e))
                text.append(markup)
        return "".join(text), calls

    def finish(self) -> Tuple[str, List[ToolCall]]:
        buf, self._buf = self._buf, ""
        if self._in_call:
            self.errors.append(f"unfinished tool call {buf[:80]!r}")
        self._in_call = False
        return buf, []


def parse_tool_calls(text: str) -> Tuple[str, List[ToolCall]]:
    """(text without the calls, calls) of a complete output."""
    p = ToolCallParser()
    a, calls = p.feed(text)
    b, more = p.finish()
    return a + b, calls + more


# -- tool schemas ------------------------------------------------------------------------------
def normalize_tools(tools: Optional[Sequence[Union[Tool, Callable]]]) -> Optional[List[Tool]]:
    """OpenAI-style function tools, checked: ``{"type": "function", "function": {"name", ...}}``.

    A bare ``{"name", "description", "parameters"}`` is wrapped; a Python function becomes its
    schema (transformers' ``get_json_schema``: type hints and a Google-style docstring).
    """
    if tools is None:
        return None
    if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
        raise ValueError("tools must be a list of function schemas")
    out: List[Tool] = []
    for n, tool in enumerate(tools):
        if callable(tool) and not isinstance(tool, Mapping):
            try:
                from transformers.utils import get_json_schema
                tool = get_json_schema(tool)
            except Exception as e:
                raise ValueError(f"tools[{n}]: cannot describe {getattr(tool, '__name__', tool)!r} as a tool: {e}") from e
        if not isinstance(tool, Mapping):
            raise ValueError(f"tools[{n}] must be an object, got {type(tool).__name__}")
        if "function" not in tool and "name" in tool:
            tool = {"type": "function", "function": dict(tool)}
        if tool.get("type", "function") != "function":
            raise ValueError(f"tools[{n}]: only 'function' tools are supported, got type {tool.get('type')!r}")
        fn = tool.get("function")
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise ValueError(f"tools[{n}] needs function.name (a non-empty string)")
        if any(c in fn["name"] for c in "{}<>:,\"' \n\t"):
            raise ValueError(f"tools[{n}]: function name {fn['name']!r} may not hold spaces, quotes, braces, '<', '>', ':' or ','")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            raise ValueError(f"tools[{n}]: function.parameters must be a JSON schema object")
        if fn.get("description") is not None and not isinstance(fn.get("description"), str):
            raise ValueError(f"tools[{n}]: function.description must be a string")
        out.append({"type": "function", "function": dict(fn)})
    return out


def call_arguments(call: Mapping[str, Any]) -> Union[Dict[str, Any], str]:
    """The arguments of an OpenAI ``tool_calls`` entry as a mapping (a JSON string is decoded;
    text that is not a JSON object is kept as written)."""
    fn = call.get("function", call)
    args = fn.get("arguments", {}) if isinstance(fn, Mapping) else {}
    if isinstance(args, str):
        try:
            decoded = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return args
        return decoded if isinstance(decoded, dict) else args
    return dict(args or {})
