"""The OpenAI-compatible request schema of ``gemma4-mlx serve``: validation and response shapes.

Every request body is checked here, field by field, before anything reaches the model: a wrong
type, a value out of range, NaN/inf, a token id outside the vocabulary, a non-text content part
or a prompt that does not fit end as :class:`APIError` (HTTP 400 whose JSON names the field).

Policy for fields: a field this module does not know is ignored (OpenAI clients send many:
``user``, ``metadata``, ``store``, ...); a field it knows but the server does not support
(``n`` > 1, ``tool_choice: "required"``, ``response_format`` other than text, ``echo``,
``best_of`` > 1, ``draft_model``, ``adapters``, ...) is refused with 400 unless it has its no-op
value.

Tools (OpenAI function tools) are checked to the leaf: names, JSON schemas (finite numbers,
bounded nesting), assistant ``tool_calls`` (arguments a JSON object) and ``tool`` messages that
answer them; they reach the prompt only through the chat template, their text kept as text.
Nothing in a request is ever opened, loaded or fetched: ``model`` is only echoed back as the
served model's id, and image/audio/file parts are refused without being looked at.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["APIError", "Limits", "GenerationRequest", "parse_chat", "parse_completion"]

MAX_STOP = 16
MAX_STOP_CHARS = 512
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024
MAX_SEED = 2**64 - 1
MAX_TOOLS = 128
MAX_JSON_DEPTH = 32  # nesting of a tool schema, call arguments or a tool result
ROLES = ("system", "developer", "user", "assistant", "tool")
TOOL_CHOICES = ("auto", "none")
SCHEMA_TYPES = ("string", "number", "integer", "boolean", "array", "object", "null")
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")


class APIError(Exception):
    """An answer other than 200: ``status``, a one-line ``message``, the ``param`` at fault."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 type: str = "invalid_request_error", code: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.code = code
        self.headers = headers or {}

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: Optional[str], message: str) -> APIError:
    return APIError(400, f"{param}: {message}" if param else message, param=param)


@dataclass
class Limits:
    """What a request may ask for and the defaults of what it leaves out."""

    vocab_size: int
    context: Optional[int]  # max_position_embeddings
    max_prompt_tokens: int
    max_tokens_limit: Optional[int] = None  # per-request cap on max_tokens (None: the context)
    default_max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0


@dataclass
class GenerationRequest:
    """A validated request: everything the worker needs and nothing from the client unchecked."""

    kind: str  # "chat" or "completion"
    prompt: List[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    logit_bias: Dict[int, float] = field(default_factory=dict)
    repetition_penalty: Optional[float] = None
    repetition_context_size: int = 20
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    logprobs: bool = False
    top_logprobs: int = 0
    stream: bool = False
    include_usage: bool = False
    think: bool = False
    tools: Optional[List[Dict[str, Any]]] = None  # declared to the model (chat only)
    tool_choice: str = "auto"  # "auto": calls are parsed out; "none": the model cannot start one
    parallel_tool_calls: bool = True  # False: the reply ends after its first call
    id: str = ""
    created: int = 0

    @property
    def split_reasoning(self) -> bool:
        return self.kind == "chat"

    @property
    def parse_tool_calls(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"


# -- field readers ---------------------------------------------------------------------------
_MISSING = object()


def _get(body: Dict[str, Any], name: str):
    value = body.get(name, _MISSING)
    return _MISSING if value is None else value


def _number(body, name, default, lo=None, hi=None, lo_open=False, hi_open=False):
    value = _get(body, name)
    if value is _MISSING:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(name, f"must be a number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:
        raise bad(name, "is out of range") from None
    if not math.isfinite(value):
        raise bad(name, "must be a finite number")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise bad(name, f"must be {'>' if lo_open else '>='} {lo:g}, got {value:g}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise bad(name, f"must be {'<' if hi_open else '<='} {hi:g}, got {value:g}")
    return value


def _integer(body, name, default, lo=None, hi=None, what="an integer"):
    value = _get(body, name)
    if value is _MISSING:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"must be {what}, got {_kind(value)}")
    if lo is not None and value < lo:
        raise bad(name, f"must be >= {lo}, got {_short(value)}")
    if hi is not None and value > hi:
        raise bad(name, f"must be <= {hi}, got {_short(value)}")
    return value


def _boolean(body, name, default):
    value = _get(body, name)
    if value is _MISSING:
        return default
    if not isinstance(value, bool):
        raise bad(name, f"must be true or false, got {_kind(value)}")
    return value


def _kind(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float):
        return "a non-integer number" if math.isfinite(value) and value != int(value) else f"the number {value!r}"
    return {dict: "an object", list: "an array", str: "a string", int: "an integer"}.get(type(value), type(value).__name__)


def _short(value: int) -> str:
    s = str(value)
    return s if len(s) <= 24 else f"a {len(s)}-digit number"


def _text(value, name) -> str:
    if not isinstance(value, str):
        raise bad(name, f"must be a string, got {_kind(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(name, "is not valid Unicode (lone surrogate)") from None
    return value


def _refuse_unless(body, name, ok, why: str) -> None:
    value = body.get(name)
    if value is not None and not ok(value):
        raise bad(name, why)


# -- shared fields ---------------------------------------------------------------------------
def _common(body: Dict[str, Any], limits: Limits) -> Dict[str, Any]:
    model = body.get("model")
    if model is not None:
        _text(model, "model")  # any name is accepted: the served model answers, nothing is loaded
    _refuse_unless(body, "n", lambda v: v == 1 and not isinstance(v, bool), "only n=1 is supported")
    _refuse_unless(body, "best_of", lambda v: v == 1 and not isinstance(v, bool), "only best_of=1 is supported")
    for name in ("draft_model", "adapters", "adapter"):
        _refuse_unless(body, name, lambda v: False,
                       "is set when the server starts (a request never loads anything)")

    cap = limits.max_tokens_limit
    if limits.context is not None:
        cap = min(cap, limits.context) if cap is not None else limits.context
    legacy = _integer(body, "max_tokens", None, lo=1, hi=cap)
    max_tokens = _integer(body, "max_completion_tokens", None, lo=1, hi=cap)  # OpenAI's newer name wins
    name = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, name = legacy, "max_tokens"

    out = dict(
        max_tokens=max_tokens, max_tokens_field=name,
        temperature=_number(body, "temperature", limits.temperature, lo=0.0),
        top_p=_number(body, "top_p", limits.top_p, lo=0.0, hi=1.0, lo_open=True),
        top_k=_integer(body, "top_k", limits.top_k, lo=0, hi=limits.vocab_size),
        min_p=_number(body, "min_p", limits.min_p, lo=0.0, hi=1.0),
        seed=_integer(body, "seed", None, lo=0, hi=MAX_SEED, what=f"an integer in [0, {MAX_SEED}]"),
        stop=_stop(body),
        logit_bias=_logit_bias(body, limits.vocab_size),
        repetition_penalty=_number(body, "repetition_penalty", None, lo=0.0, lo_open=True),
        repetition_context_size=_integer(body, "repetition_context_size", 20, lo=1,
                                         hi=limits.context or 1 << 20),
        presence_penalty=_number(body, "presence_penalty", None, lo=-2.0, hi=2.0),
        frequency_penalty=_number(body, "frequency_penalty", None, lo=-2.0, hi=2.0),
        xtc_probability=_number(body, "xtc_probability", 0.0, lo=0.0, hi=1.0),
        xtc_threshold=_number(body, "xtc_threshold", 0.1, lo=0.0, hi=0.5),
        stream=_boolean(body, "stream", False),
    )
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise bad("stream_options", f"must be an object, got {_kind(options)}")
        include = options.get("include_usage")
        if include is not None and not isinstance(include, bool):
            raise bad("stream_options.include_usage", f"must be true or false, got {_kind(include)}")
        out["include_usage"] = bool(include)
        if not out["stream"]:
            raise bad("stream_options", "is only allowed with stream: true")
    else:
        out["include_usage"] = False
    return out


def _stop(body) -> List[str]:
    value = _get(body, "stop")
    if value is _MISSING:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list):
        raise bad("stop", f"must be a string or an array of strings, got {_kind(value)}")
    if len(stops) > MAX_STOP:
        raise bad("stop", f"at most {MAX_STOP} stop sequences")
    for i, s in enumerate(stops):
        name = "stop" if isinstance(value, str) else f"stop[{i}]"
        _text(s, name)
        if not s:
            raise bad(name, "must not be empty")
        if len(s) > MAX_STOP_CHARS:
            raise bad(name, f"longer than {MAX_STOP_CHARS} characters")
    return list(stops)


_TOKEN_KEY = re.compile(r"[0-9]{1,12}")


def _logit_bias(body, vocab_size: int) -> Dict[int, float]:
    value = _get(body, "logit_bias")
    if value is _MISSING:
        return {}
    if not isinstance(value, dict):
        raise bad("logit_bias", f"must be an object mapping token ids to numbers, got {_kind(value)}")
    if len(value) > MAX_LOGIT_BIAS:
        raise bad("logit_bias", f"at most {MAX_LOGIT_BIAS} entries")
    bias: Dict[int, float] = {}
    for key, v in value.items():
        if not _TOKEN_KEY.fullmatch(key):
            raise bad("logit_bias", f"key {key[:40]!r} is not a token id")
        tid = int(key)
        if tid >= vocab_size:
            raise bad("logit_bias", f"token id {tid} is outside the vocabulary (0..{vocab_size - 1})")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad("logit_bias", f"the value of {key!r} must be a number, got {_kind(v)}")
        if not (math.isfinite(v) and -100 <= v <= 100):
            raise bad("logit_bias", f"the value of {key!r} must be in [-100, 100]")
        bias[tid] = bias.get(tid, 0.0) + float(v)  # "7" and "07" name the same token
    return bias


def _token_ids(value: Sequence[Any], name: str, vocab_size: int) -> List[int]:
    ids = []
    for i, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, int):
            raise bad(f"{name}[{i}]", f"must be a token id (integer), got {_kind(t)}")
        if not 0 <= t < vocab_size:
            raise bad(f"{name}[{i}]", f"token id {_short(t)} is outside the vocabulary (0..{vocab_size - 1})")
        ids.append(t)
    return ids


def _fit(prompt: List[int], opts: Dict[str, Any], limits: Limits, prompt_field: str) -> int:
    """max_tokens for this prompt, or 400 when the prompt (or prompt + max_tokens) is too long."""
    n = len(prompt)
    if n == 0:
        raise bad(prompt_field, "the prompt is empty")
    top = max(prompt)
    if top >= limits.vocab_size:  # the tokenizer knows more ids than the model: never index past it
        raise bad(prompt_field, f"the prompt holds token id {top}, outside the model's vocabulary "
                                f"(0..{limits.vocab_size - 1}); the tokenizer does not match the model")
    if n > limits.max_prompt_tokens:
        raise bad(prompt_field, f"the prompt has {n} tokens, more than this server's limit of "
                                f"{limits.max_prompt_tokens} (--max-prompt-tokens)")
    max_tokens = opts["max_tokens"]
    if limits.context is None:
        return max_tokens if max_tokens is not None else limits.default_max_tokens
    room = limits.context - n
    if room < 1:
        raise bad(prompt_field, f"the prompt has {n} tokens; the model's context is {limits.context}")
    if max_tokens is None:  # the client did not ask: the default, cut to what fits
        return min(limits.default_max_tokens, room)
    if max_tokens > room:
        raise bad(opts["max_tokens_field"],
                  f"the prompt ({n} tokens) + {opts['max_tokens_field']} ({max_tokens}) exceeds the "
                  f"model's context of {limits.context} tokens")
    return max_tokens


def _request(kind: str, prompt: List[int], opts: Dict[str, Any], max_tokens: int, **extra) -> GenerationRequest:
    opts = {k: v for k, v in opts.items() if k not in ("max_tokens", "max_tokens_field")}
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    return GenerationRequest(kind=kind, prompt=prompt, max_tokens=max_tokens, id=f"{prefix}-{uuid.uuid4().hex}",
                             created=int(time.time()), **opts, **extra)


# -- /v1/chat/completions --------------------------------------------------------------------
def parse_messages(body: Dict[str, Any]) -> List[Dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty array of messages"
                  if messages is None or isinstance(messages, list) else f"must be an array, got {_kind(messages)}")
    out: List[Dict[str, Any]] = []
    calls: Optional[List[Dict[str, Any]]] = None  # the calls that tool messages here may answer
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, f"must be an object, got {_kind(m)}")
        role = m.get("role")
        if role == "function":
            raise bad(f"{where}.role", "'function' messages are OpenAI's old form: send 'tool' messages "
                                       "with tool_call_id")
        if role not in ROLES:
            raise bad(f"{where}.role", f"must be one of {', '.join(ROLES)}"
                      + (f", got {role[:40]!r}" if isinstance(role, str) else f", got {_kind(role)}"))
        if m.get("tool_calls") not in (None, []) and role != "assistant":
            raise bad(f"{where}.tool_calls", "only assistant messages carry tool calls")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        message: Dict[str, Any] = {"role": "system" if role == "developer" else role,
                                   "content": _content(content, f"{where}.content")}
        if role == "tool":
            if calls is None:
                raise bad(f"{where}.role", "a tool message must follow an assistant message with tool_calls "
                                           "(or another tool message)")
            message.update(_tool_reply(m, calls, where))
        elif role == "assistant" and m.get("tool_calls") not in (None, []):
            message["tool_calls"] = calls = _tool_calls(m.get("tool_calls"), f"{where}.tool_calls")
        else:
            calls = None
        out.append(message)
    return out


def _json(value, where: str, depth: int = 0, at: Optional[str] = None) -> Any:
    """A JSON value from a client, checked: text valid, numbers finite, nesting bounded (``where``
    names the field, ``at`` the place inside it)."""
    at = at or where
    if depth > MAX_JSON_DEPTH:
        raise bad(where, f"is nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, str):
        return _text(value, at)
    if isinstance(value, float) and not math.isfinite(value):
        raise bad(at, "must be a finite number")
    if isinstance(value, dict):
        for k in value:
            _text(k, at)
        return {k: _json(v, where, depth + 1, f"{at}.{_key(k)}") for k, v in value.items()}
    if isinstance(value, list):
        return [_json(v, where, depth + 1, f"{at}[{i}]") for i, v in enumerate(value)]
    return value


def _key(k: str) -> str:
    return k if len(k) <= 64 else k[:64] + "..."


def _tool_calls(value, where: str) -> List[Dict[str, Any]]:
    """An assistant message's ``tool_calls`` as the chat template takes them (arguments decoded)."""
    if not isinstance(value, list):
        raise bad(where, f"must be an array, got {_kind(value)}")
    out = []
    for j, call in enumerate(value):
        at = f"{where}[{j}]"
        if not isinstance(call, dict):
            raise bad(at, f"must be an object, got {_kind(call)}")
        if call.get("type", "function") != "function":
            raise bad(f"{at}.type", "must be 'function'")
        call_id = call.get("id")
        if call_id is not None:
            _text(call_id, f"{at}.id")
        fn = call.get("function")
        if not isinstance(fn, dict):
            raise bad(f"{at}.function", "must be an object with name and arguments"
                      + ("" if fn is None else f", got {_kind(fn)}"))
        name = fn.get("name")
        if not isinstance(name, str) or not name or len(name) > 256 or any(c in name for c in "{}"):
            raise bad(f"{at}.function.name", "must be a function name (1 to 256 characters, no braces)")
        _text(name, f"{at}.function.name")
        arguments = fn.get("arguments")
        if arguments is None:
            arguments = {}
        elif isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except (ValueError, RecursionError):
                raise bad(f"{at}.function.arguments", "must be a JSON object (as a string)") from None
        if not isinstance(arguments, dict):
            raise bad(f"{at}.function.arguments", f"must be a JSON object, got {_kind(arguments)}")
        entry = {"type": "function",
                 "function": {"name": name, "arguments": _json(arguments, f"{at}.function.arguments")}}
        if call_id is not None:
            entry["id"] = call_id
        out.append(entry)
    return out


def _tool_reply(m: Dict[str, Any], calls: List[Dict[str, Any]], where: str) -> Dict[str, Any]:
    """A tool message's link to the call it answers: ``tool_call_id`` (OpenAI) or ``name``."""
    out: Dict[str, Any] = {}
    call_id, name = m.get("tool_call_id"), m.get("name")
    if name is not None:
        out["name"] = _text(name, f"{where}.name")
    if call_id is not None:
        _text(call_id, f"{where}.tool_call_id")
        if call_id not in [c.get("id") for c in calls]:
            raise bad(f"{where}.tool_call_id", f"{call_id[:64]!r} is the id of no call in the assistant "
                                               "message before it")
        out["tool_call_id"] = call_id
    elif name is None:
        raise bad(f"{where}.tool_call_id", "is required: the id of the call this message answers")
    return out


def _content(content, where: str) -> str:
    if isinstance(content, str):
        return _text(content, where)
    if not isinstance(content, list):
        raise bad(where, f"must be a string or an array of content parts, got {_kind(content)}")
    texts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise bad(at, f"must be an object, got {_kind(part)}")
        kind = part.get("type")
        if kind != "text":
            shown = repr(kind[:40]) if isinstance(kind, str) else _kind(kind)
            raise bad(f"{at}.type", f"only 'text' content parts are supported, got {shown} "
                                    "(the server fetches and reads nothing for a request)")
        texts.append(_text(part.get("text"), f"{at}.text"))
    return "".join(texts)


def _thinking(body: Dict[str, Any]) -> bool:
    """Thinking is off unless the request turns it on (one default across the project)."""
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise bad("chat_template_kwargs", f"must be an object, got {_kind(kwargs)}")
        value = kwargs.get("enable_thinking")
        if value is not None:
            if not isinstance(value, bool):
                raise bad("chat_template_kwargs.enable_thinking", f"must be true or false, got {_kind(value)}")
            return value
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in REASONING_EFFORTS:
            raise bad("reasoning_effort", f"must be one of {', '.join(REASONING_EFFORTS)}")
        return effort != "none"
    return False


def parse_tools(body: Dict[str, Any]) -> Optional[List[Dict[str, Any]]]:
    """``tools``: OpenAI function tools, checked field by field (None when absent or empty)."""
    value = _get(body, "tools")
    if value is _MISSING:
        return None
    if not isinstance(value, list):
        raise bad("tools", f"must be an array of function tools, got {_kind(value)}")
    if len(value) > MAX_TOOLS:
        raise bad("tools", f"at most {MAX_TOOLS} tools")
    out, names = [], set()
    for n, tool in enumerate(value):
        at = f"tools[{n}]"
        if not isinstance(tool, dict):
            raise bad(at, f"must be an object, got {_kind(tool)}")
        if tool.get("type") != "function":
            kind = tool.get("type")
            raise bad(f"{at}.type", "must be 'function' (the only kind of tool)"
                      + (f", got {kind[:40]!r}" if isinstance(kind, str) else ""))
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise bad(f"{at}.function", "must be an object with name, description and parameters"
                      + ("" if fn is None else f", got {_kind(fn)}"))
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise bad(f"{at}.function.name", "must be 1 to 64 letters, digits, '_' or '-'"
                      + (f", got {name[:40]!r}" if isinstance(name, str) else ""))
        if name in names:
            raise bad(f"{at}.function.name", f"{name!r} is declared twice")
        names.add(name)
        clean: Dict[str, Any] = {"name": name}
        description = fn.get("description")
        if description is not None:
            clean["description"] = _text(description, f"{at}.function.description")
        params = fn.get("parameters")
        if params is not None:
            if not isinstance(params, dict):
                raise bad(f"{at}.function.parameters", f"must be a JSON schema object, got {_kind(params)}")
            clean["parameters"] = _schema(params, f"{at}.function.parameters")
        strict = fn.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise bad(f"{at}.function.strict", f"must be true or false, got {_kind(strict)}")
        out.append({"type": "function", "function": clean})
    return out or None


def _schema(schema: Dict[str, Any], where: str, depth: int = 0) -> Dict[str, Any]:
    """A JSON schema as the chat template declares it: ``type`` one of JSON's (or a list of them),
    ``properties`` / ``items`` schemas in turn, every other value plain JSON."""
    if depth > MAX_JSON_DEPTH:
        raise bad(where, f"is nested deeper than {MAX_JSON_DEPTH} levels")
    out = _json(schema, where, depth)
    kind = out.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not kinds or any(k not in SCHEMA_TYPES for k in kinds):
            raise bad(f"{where}.type", f"must be one of {', '.join(SCHEMA_TYPES)} (or a list of them)")
    props = out.get("properties")
    if isinstance(props, dict):
        for k, p in props.items():
            if isinstance(p, dict):
                _schema(p, f"{where}.properties.{_key(k)}", depth + 2)
    if isinstance(out.get("items"), dict):
        _schema(out["items"], f"{where}.items", depth + 1)
    return out


def _tool_choice(body: Dict[str, Any]) -> str:
    value = _get(body, "tool_choice")
    if value is _MISSING:
        return "auto"
    if value in TOOL_CHOICES:
        return value
    if value == "required" or isinstance(value, dict):
        raise bad("tool_choice", "only 'auto' and 'none' are supported (this server never forces a call)")
    raise bad("tool_choice", "must be 'auto' or 'none'"
              + (f", got {value[:40]!r}" if isinstance(value, str) else f", got {_kind(value)}"))


def parse_chat(body: Any, limits: Limits, render) -> GenerationRequest:
    """A chat request; ``render(messages, think, tools)`` gives the prompt's token ids."""
    if not isinstance(body, dict):
        raise bad(None, f"the request body must be a JSON object, got {_kind(body)}")
    messages = parse_messages(body)
    opts = _common(body, limits)
    tools = parse_tools(body)
    tool_choice = _tool_choice(body)
    parallel = _boolean(body, "parallel_tool_calls", True)
    for name in ("functions", "function_call", "audio", "prediction", "web_search_options"):
        _refuse_unless(body, name, lambda v: False, "is not supported by this server"
                       + (" (send tools and tool_choice)" if name.startswith("function") else ""))
    _refuse_unless(body, "modalities", lambda v: v == ["text"], "only [\"text\"] is supported")
    _refuse_unless(body, "response_format", lambda v: isinstance(v, dict) and v.get("type") == "text",
                   "only {\"type\": \"text\"} is supported")
    logprobs = _boolean(body, "logprobs", False)
    top = _integer(body, "top_logprobs", 0, lo=0, hi=MAX_TOP_LOGPROBS)
    if top and not logprobs:
        raise bad("top_logprobs", "needs logprobs: true")
    think = _thinking(body)
    try:
        prompt = render(messages, think, tools)
    except ValueError as e:
        raise bad("messages", str(e).splitlines()[0] if str(e) else "could not be rendered") from None
    max_tokens = _fit(prompt, opts, limits, "messages")
    return _request("chat", prompt, opts, max_tokens, logprobs=logprobs, top_logprobs=top, think=think,
                    tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel)


# -- /v1/completions -------------------------------------------------------------------------
def parse_completion(body: Any, limits: Limits, encode) -> GenerationRequest:
    """A completion request; ``encode(text)`` gives a raw prompt's token ids (BOS first)."""
    if not isinstance(body, dict):
        raise bad(None, f"the request body must be a JSON object, got {_kind(body)}")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # one prompt in a batch of one
    if isinstance(prompt, str):
        ids = encode(_text(prompt, "prompt"))
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise bad("prompt", "one prompt per request (this server answers n=1)")
    elif isinstance(prompt, list):
        ids = _token_ids(prompt, "prompt", limits.vocab_size)
    else:
        raise bad("prompt", "must be a string or an array of token ids"
                  + ("" if prompt is None else f", got {_kind(prompt)}"))
    opts = _common(body, limits)
    _refuse_unless(body, "echo", lambda v: v is False, "echo is not supported")
    _refuse_unless(body, "suffix", lambda v: v == "", "suffix is not supported")
    top = _get(body, "logprobs")
    if top is _MISSING:
        logprobs, top = False, 0
    else:
        top = _integer(body, "logprobs", 0, lo=0, hi=MAX_TOP_LOGPROBS)
        logprobs = True
    max_tokens = _fit(ids, opts, limits, "prompt")
    return _request("completion", ids, opts, max_tokens, logprobs=logprobs, top_logprobs=top)


# -- responses -------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> Dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _head(req: GenerationRequest, model: str, obj: str) -> Dict[str, Any]:
    return {"id": req.id, "object": obj, "created": req.created, "model": model, "system_fingerprint": None}


def chat_logprobs(entries: List[Dict[str, Any]]) -> Dict[str, Any]:
    return {"content": entries, "refusal": None}


def completion_logprobs(entries: List[Dict[str, Any]], offset: int = 0) -> Dict[str, Any]:
    tokens, lps, tops, offsets = [], [], [], []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
        tokens.append(e["token"])
        lps.append(e["logprob"])
        tops.append({t["token"]: t["logprob"] for t in e["top_logprobs"]})
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_response(req, model, content, reasoning, finish, n_prompt, n_completion, logprobs,
                  tool_calls: Sequence[Any] = ()) -> Dict[str, Any]:
    """``tool_calls``: :class:`~gemma4_mlx.tools.ToolCall` objects (content is null when the
    reply holds only calls, as OpenAI answers)."""
    message: Dict[str, Any] = {"role": "assistant", "content": content if content or not tool_calls else None}
    if tool_calls:
        message["tool_calls"] = [c.to_openai() for c in tool_calls]
    if reasoning:
        message["reasoning_content"] = reasoning
    choice = {"index": 0, "message": message, "finish_reason": finish,
              "logprobs": chat_logprobs(logprobs) if req.logprobs else None}
    return {**_head(req, model, "chat.completion"), "choices": [choice], "usage": usage(n_prompt, n_completion)}


def completion_response(req, model, text, finish, n_prompt, n_completion, logprobs) -> Dict[str, Any]:
    choice = {"index": 0, "text": text, "finish_reason": finish,
              "logprobs": completion_logprobs(logprobs) if req.logprobs else None}
    return {**_head(req, model, "text_completion"), "choices": [choice], "usage": usage(n_prompt, n_completion)}


def tool_call_deltas(calls: Sequence[Any], first_index: int) -> List[Dict[str, Any]]:
    """Streamed ``delta.tool_calls`` entries: each call whole in one entry, ``index`` counting the
    reply's calls (OpenAI clients join entries of one index)."""
    return [dict(c.to_openai(), index=first_index + k) for k, c in enumerate(calls)]


def chat_chunk(req, model, delta: Dict[str, Any], finish=None, logprobs=None) -> Dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish,
              "logprobs": chat_logprobs(logprobs) if logprobs is not None else None}
    return {**_head(req, model, "chat.completion.chunk"), "choices": [choice]}


def completion_chunk(req, model, text: str, finish=None, logprobs=None, offset: int = 0) -> Dict[str, Any]:
    choice = {"index": 0, "text": text, "finish_reason": finish,
              "logprobs": completion_logprobs(logprobs, offset) if logprobs is not None else None}
    return {**_head(req, model, "text_completion"), "choices": [choice]}


def usage_chunk(req, model, n_prompt, n_completion) -> Dict[str, Any]:
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    return {**_head(req, model, obj), "choices": [], "usage": usage(n_prompt, n_completion)}


def models_list(model: str, created: int) -> Dict[str, Any]:
    return {"object": "list", "data": [model_card(model, created)]}


def model_card(model: str, created: int) -> Dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": "gemma4-mlx"}

