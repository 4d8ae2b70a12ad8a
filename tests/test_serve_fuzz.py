"""Random JSON, random field values and random bytes at every route: each request is answered
(a status line and, for errors, a JSON error), and afterwards /health is 200 and a good
completion comes back."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from serve_harness import serving

from gemma4_mlx.checkpoint import write_random_checkpoint
from gemma4_mlx.server import model_loader

ROUTES = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
          ("GET", "/health"), ("GET", "/v1/models/tiny"), ("POST", "/v1/models"), ("GET", "/v1/chat/completions"),
          ("PUT", "/v1/completions"), ("POST", "/nope"), ("DELETE", "/health")]
FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "min_p", "seed", "stop", "logit_bias", "repetition_penalty", "repetition_context_size", "presence_penalty",
          "frequency_penalty", "logprobs", "top_logprobs", "n", "stream", "stream_options", "chat_template_kwargs",
          "reasoning_effort", "tools", "response_format", "echo", "xtc_probability", "best_of", "draft_model"]
ANSWERS = {200, 400, 404, 405, 411, 413, 503}

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["<turn|>", "<|turn>system\n", "<|think|>", "user", "assistant", "tool", "text", "image_url",
                     "http://127.0.0.1:9/x", "\ud800", "", "9" * 30]),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer", "x"]),
                                           "content": st.one_of(st.text(max_size=40), json_values)}),
                    min_size=0, max_size=3)
bodies = st.one_of(
    json_values,
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6),
    st.builds(lambda m, extra: {"messages": m, "max_tokens": 2, **extra}, messages,
              st.dictionaries(st.sampled_from(FIELDS[3:]), json_values, max_size=3)),
    st.builds(lambda p, extra: {"prompt": p, "max_tokens": 2, **extra},
              st.one_of(st.text(max_size=40), st.lists(st.integers(-5, 600), max_size=6)),
              st.dictionaries(st.sampled_from(FIELDS[3:]), json_values, max_size=3)),
)


def _encode(body) -> bytes:
    return json.dumps(body, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = write_random_checkpoint("tiny", tmp_path_factory.mktemp("serve") / "tiny", dtype="float32")
    with serving(model_loader(str(path)), max_tokens_limit=4, default_max_tokens=4, max_prompt_tokens=256,
                 max_body_bytes=65536) as s:
        yield s
        s.client.healthy_and_answering()


def _answered(r) -> None:
    assert r.status in ANSWERS, (r.status, r.body[:300])
    if r.status != 200:
        err = json.loads(r.body)["error"]
        assert isinstance(err["message"], str) and "Traceback" not in err["message"]
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        assert r.body.rstrip().endswith(b"data: [DONE]")
    else:
        json.loads(r.body)


@settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(route=st.sampled_from(ROUTES), body=bodies)
def test_random_json_at_every_route(served, route, body):
    method, path = route
    data = _encode(body)
    r = served.client.request(method, path, data if method != "GET" else None,
                              {"Content-Type": "application/json"} if method != "GET" else {})
    _answered(r)


def test_random_bytes_at_every_route(served):
    rng = random.Random(20261128)
    for i in range(120):
        method, path = ROUTES[i % len(ROUTES)]
        n = rng.choice([0, 1, 7, 100, 3000])
        data = bytes(rng.getrandbits(8) for _ in range(n))
        if i % 3 == 0:  # valid JSON around invalid bytes
            data = b'{"messages": [{"role": "user", "content": "' + data.replace(b'"', b"") + b'"}]}'
        ctype = rng.choice(["application/json", "application/json; charset=utf-8", "text/plain", "", "a/b; x"])
        headers = {"Content-Type": ctype} if ctype else {}
        _answered(served.client.request(method, path, data, headers))
    served.client.healthy_and_answering()


def test_random_request_heads(served):
    """Garbage request lines and headers: a JSON error or a closed connection, never a hang."""
    rng = random.Random(7)
    alphabet = b"GETPOST /v1chat:\r\n \t\x00\xff{}%"
    for _ in range(60):
        n = rng.randint(1, 200)
        raw = bytes(rng.choice(alphabet) for _ in range(n)) + b"\r\n\r\n"
        reply = served.client.raw(raw, timeout=10)
        assert reply == b"" or reply.startswith(b"HTTP/1."), reply[:100]
    served.client.healthy_and_answering()


finite = dict(allow_nan=False, allow_infinity=False)
valid_settings = st.fixed_dictionaries({}, optional={
    "temperature": st.floats(0, 1e6, **finite), "top_p": st.floats(1e-9, 1, **finite),
    "top_k": st.integers(0, 512), "min_p": st.floats(0, 1, **finite), "seed": st.integers(0, 2**64 - 1),
    "repetition_penalty": st.floats(1e-6, 1e6, **finite), "repetition_context_size": st.integers(1, 4096),
    "presence_penalty": st.floats(-2, 2, **finite), "frequency_penalty": st.floats(-2, 2, **finite),
    "xtc_probability": st.floats(0, 1, **finite), "xtc_threshold": st.floats(0, 0.5, **finite),
    "logit_bias": st.dictionaries(st.integers(0, 511).map(str), st.floats(-100, 100, **finite), max_size=5),
    "stop": st.one_of(st.text(min_size=1, max_size=4), st.lists(st.text(min_size=1, max_size=4), max_size=4)),
    "logprobs": st.booleans(), "stream": st.booleans(),
})


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(settings_=valid_settings, chat=st.booleans())
@example(settings_={"temperature": 1.0, "top_k": 512}, chat=False)
@example(settings_={"temperature": 1e6, "top_p": 1e-9, "min_p": 1.0, "xtc_probability": 1.0}, chat=True)
def test_valid_sampling_settings_always_generate(served, settings_, chat):
    body = dict(settings_)
    if "logprobs" in body and chat:
        body["top_logprobs"] = 3 if body["logprobs"] else 0
    elif "logprobs" in body:
        body["logprobs"] = 2 if body["logprobs"] else 0
    if chat:
        r = served.client.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], **body})
    else:
        r = served.client.post("/v1/completions", {"prompt": "hi", **body})
    assert r.status == 200, (body, r.body[:300])
    if body.get("stream"):
        events = r.events()
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
        assert any(e["choices"] and e["choices"][0]["finish_reason"] for e in events[:-1])
    else:
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


# -- tools: near-valid structures with random leaves ------------------------------------------
def _maybe(value_strategy):
    """Mostly the valid value, sometimes any JSON."""
    return st.integers(0, 5).flatmap(lambda n: json_values if n == 0 else value_strategy)


schemas = st.recursive(
    st.fixed_dictionaries({}, optional={"type": _maybe(st.sampled_from(["string", "object", "integer", "<turn|>"])),
                                        "description": _maybe(st.text(max_size=12)), "enum": json_values}),
    lambda inner: st.fixed_dictionaries({"type": _maybe(st.just("object"))},
                                        optional={"properties": _maybe(st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=3)),
                                                  "items": _maybe(inner), "required": json_values}),
    max_leaves=6)
tools = st.lists(st.fixed_dictionaries(
    {"type": _maybe(st.just("function")),
     "function": _maybe(st.fixed_dictionaries({"name": _maybe(st.sampled_from(["f", "get_weather", "a-b", "x y"]))},
                                              optional={"description": _maybe(st.text(max_size=12)),
                                                        "parameters": _maybe(schemas), "strict": json_values}))}),
    max_size=3)
calls = st.lists(st.fixed_dictionaries(
    {"id": _maybe(st.sampled_from(["c1", "c2"])), "type": _maybe(st.just("function")),
     "function": _maybe(st.fixed_dictionaries({"name": _maybe(st.sampled_from(["f", "now", "<|tool>"])),
                                               "arguments": _maybe(st.one_of(
                                                   st.just('{"a": 1}'), st.just("{bad"), st.just("[1]"),
                                                   json_values.map(lambda v: json.dumps(v, allow_nan=True))))}))}),
    max_size=2)
@st.composite
def tool_messages(draw):
    """A conversation of user turns, assistant calls and the tool messages answering them."""
    out = [{"role": "user", "content": draw(st.text(max_size=10))}]
    for _ in range(draw(st.integers(0, 2))):
        made = draw(calls)
        out.append({"role": "assistant", "content": draw(_maybe(st.none())), "tool_calls": made})
        for call in made:
            call_id = call.get("id") if isinstance(call, dict) else None
            reply = {"role": "tool", "content": draw(_maybe(st.text(max_size=10)))}
            reply["tool_call_id"] = draw(_maybe(st.just(call_id)) if isinstance(call_id, str) else json_values)
            if draw(st.integers(0, 4)) == 0:
                reply["name"] = draw(json_values)
            out.append(reply)
        if draw(st.booleans()):
            out.append({"role": "user", "content": "more"})
    return out


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(messages_=tool_messages(), tools_=st.one_of(tools, json_values),
       choice=st.one_of(st.none(), st.sampled_from(["auto", "none", "required"]), json_values),
       stream=st.booleans())
def test_random_tools_and_tool_messages(served, messages_, tools_, choice, stream):
    body = {"messages": messages_, "tools": tools_, "max_tokens": 2, "stream": stream}
    if choice is not None:
        body["tool_choice"] = choice
    r = served.client.post("/v1/chat/completions", body)
    _answered(r)
