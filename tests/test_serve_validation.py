"""Every request field is checked before generation: a 400 whose JSON error names the field, no
job reaches the generation thread, and the server keeps answering."""

from __future__ import annotations

import json

import pytest
from serve_harness import serving

from gemma4_mlx.checkpoint import write_random_checkpoint
from gemma4_mlx.presets import preset_config
from gemma4_mlx.server import model_loader

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]
CONTEXT = 512


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    config = preset_config("tiny")
    config["max_position_embeddings"] = CONTEXT  # small, so filling the context is quick
    path = write_random_checkpoint(config, tmp_path_factory.mktemp("serve") / "tiny", dtype="float32")
    with serving(model_loader(str(path))) as s:
        yield s
        s.client.healthy_and_answering()


SHARED = [  # (field values, the param the error must name)
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -1}, "max_tokens"), ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_tokens": "5"}, "max_tokens"), ({"max_tokens": True}, "max_tokens"), ({"max_tokens": 10**30}, "max_tokens"),
    ({"max_tokens": CONTEXT + 1}, "max_tokens"),  # beyond the context
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_completion_tokens": 2, "max_tokens": "x"}, "max_tokens"),
    ({"temperature": -1}, "temperature"), ({"temperature": "hot"}, "temperature"),
    ({"temperature": True}, "temperature"), ({"temperature": [1]}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_p": -0.1}, "top_p"),
    ({"top_k": -1}, "top_k"), ({"top_k": 1e9}, "top_k"), ({"top_k": 10**9}, "top_k"), ({"top_k": 2.0}, "top_k"),
    ({"min_p": 2}, "min_p"), ({"min_p": -0.5}, "min_p"),
    ({"seed": -1}, "seed"), ({"seed": 2**64}, "seed"), ({"seed": 1.5}, "seed"), ({"seed": "1"}, "seed"),
    ({"seed": True}, "seed"),
    ({"stop": 123}, "stop"), ({"stop": [None]}, "stop[0]"), ({"stop": [1]}, "stop[0]"), ({"stop": [""]}, "stop[0]"),
    ({"stop": ["a"] * 17}, "stop"), ({"stop": {"a": 1}}, "stop"), ({"stop": "x" * 600}, "stop"),
    ({"logit_bias": {"999999": 10}}, "logit_bias"), ({"logit_bias": {"512": 1}}, "logit_bias"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"1": "x"}}, "logit_bias"), ({"logit_bias": {"1": 101}}, "logit_bias"),
    ({"logit_bias": {"1": True}}, "logit_bias"), ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"logit_bias": {"1" * 40: 1}}, "logit_bias"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"repetition_penalty": -1}, "repetition_penalty"),
    ({"repetition_context_size": 10**12}, "repetition_context_size"),
    ({"repetition_context_size": 1e12}, "repetition_context_size"),
    ({"repetition_context_size": 0}, "repetition_context_size"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"frequency_penalty": "x"}, "frequency_penalty"),
    ({"xtc_probability": 2}, "xtc_probability"),
    ({"n": 2}, "n"), ({"n": 0}, "n"), ({"n": True}, "n"), ({"best_of": 3}, "best_of"),
    ({"stream": "yes"}, "stream"), ({"stream": 1}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ({"stream": True, "stream_options": "x"}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"model": ["a"]}, "model"), ({"draft_model": "/tmp/x"}, "draft_model"),
]

def _call(**function):
    return {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}", **function}}


def _tool(**function):
    return {"type": "function", "function": {"name": "get_weather", **function}}


CALL = _call()
TOOL = _tool(description="Weather now.", parameters={"type": "object", "properties": {"city": {"type": "string"}}})
DEEP = {"a": [[{"b": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}]]}

CHAT_ONLY = [
    ({"messages": None}, "messages"), ({"messages": []}, "messages"), ({"messages": "hi"}, "messages"),
    ({"messages": [5]}, "messages[0]"), ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [5]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": [{"text": "x"}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]},
     "messages[0].tool_calls[0].function"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": {"id": "1"}}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [dict(CALL, type="code")]}]},
     "messages[0].tool_calls[0].type"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "c", "function": {"arguments": "{}"}}]}]},
     "messages[0].tool_calls[0].function.name"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [_call(arguments="{not json")]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [_call(arguments="[1, 2]")]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [_call(arguments=5)]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [_call(arguments=DEEP)]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [dict(CALL, id=5)]}]},
     "messages[0].tool_calls[0].id"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "tool_call_id": "c1", "content": "r"}]},
     "messages[1].role"),  # no call to answer
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [CALL]}, {"role": "tool", "content": "r"}]},
     "messages[1].tool_call_id"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [CALL]},
                   {"role": "tool", "tool_call_id": "other", "content": "r"}]}, "messages[1].tool_call_id"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [CALL]},
                   {"role": "tool", "tool_call_id": "c1", "content": 5}]}, "messages[1].content"),
    ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages[0].role"),
    ({"logprobs": "yes"}, "logprobs"), ({"top_logprobs": 21}, "top_logprobs"), ({"top_logprobs": -1}, "top_logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs
    ({"tools": {"type": "function"}}, "tools"), ({"tools": [5]}, "tools[0]"), ({"tools": [TOOL] * 129}, "tools"),
    ({"tools": [dict(TOOL, type="code_interpreter")]}, "tools[0].type"), ({"tools": [{"name": "f"}]}, "tools[0].type"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [TOOL, _tool(name="get weather")]}, "tools[1].function.name"),
    ({"tools": [_tool(name="")]}, "tools[0].function.name"), ({"tools": [_tool(name=5)]}, "tools[0].function.name"),
    ({"tools": [_tool(name="<|tool>")]}, "tools[0].function.name"), ({"tools": [TOOL, TOOL]}, "tools[1].function.name"),
    ({"tools": [_tool(description=["x"])]}, "tools[0].function.description"),
    ({"tools": [_tool(parameters="object")]}, "tools[0].function.parameters"),
    ({"tools": [_tool(parameters={"type": "<turn|>"})]}, "tools[0].function.parameters.type"),
    ({"tools": [_tool(parameters={"type": "object", "properties": {"x": {"type": 5}}})]},
     "tools[0].function.parameters.properties.x.type"),
    ({"tools": [_tool(parameters={"type": "object", "properties": {"x": DEEP}})]}, "tools[0].function.parameters"),
    ({"tools": [_tool(strict="yes")]}, "tools[0].function.strict"),
    ({"tool_choice": "required"}, "tool_choice"), ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"tool_choice": 1}, "tool_choice"), ({"parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ({"function_call": "auto"}, "function_call"),
    ({"response_format": {"type": "json_object"}}, "response_format"), ({"functions": [{}]}, "functions"),
    ({"modalities": ["audio"]}, "modalities"), ({"audio": {"voice": "x"}}, "audio"),
    ({"chat_template_kwargs": "x"}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"enable_thinking": "yes"}}, "chat_template_kwargs.enable_thinking"),
    ({"reasoning_effort": "max"}, "reasoning_effort"), ({"reasoning_effort": 1}, "reasoning_effort"),
]

COMPLETION_ONLY = [
    ({"prompt": None}, "prompt"), ({"prompt": 5}, "prompt"), ({"prompt": {"a": 1}}, "prompt"),
    ({"prompt": [1, 99999]}, "prompt[1]"), ({"prompt": [-1]}, "prompt[0]"), ({"prompt": [1.5]}, "prompt[0]"),
    ({"prompt": [True]}, "prompt[0]"), ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": [[1], [2]]}, "prompt"),
    ({"prompt": [2**70]}, "prompt[0]"), ({"prompt": []}, "prompt"),
    ({"echo": True}, "echo"), ({"suffix": "x"}, "suffix"), ({"logprobs": 21}, "logprobs"),
    ({"logprobs": True}, "logprobs"), ({"logprobs": -1}, "logprobs"),
]


def _check(served, path, body, param):
    done = served.app.worker.completed
    r = served.client.post(path, body)
    assert r.status == 400, (body, r.status, r.body)
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", (body, err)
    assert param in err["message"] and "Traceback" not in err["message"]
    assert served.app.worker.completed == done  # nothing reached the model


@pytest.mark.parametrize("fields,param", SHARED + CHAT_ONLY, ids=lambda v: json.dumps(v)[:60] if isinstance(v, dict) else v)
def test_chat_field_errors_name_the_field(served, fields, param):
    _check(served, CHAT, {"messages": MSG, "max_tokens": 2, **fields}, param)


@pytest.mark.parametrize("fields,param", SHARED + COMPLETION_ONLY,
                         ids=lambda v: json.dumps(v)[:60] if isinstance(v, dict) else v)
def test_completion_field_errors_name_the_field(served, fields, param):
    _check(served, COMPLETIONS, {"prompt": "hi", "max_tokens": 2, **fields}, param)


@pytest.mark.parametrize("literal,param", [("NaN", "temperature"), ("Infinity", "temperature"), ("-Infinity", "min_p"),
                                           ("NaN", "min_p"), ("NaN", "repetition_penalty"), ("1e999", "top_p"),
                                           ("NaN", "presence_penalty")])
def test_non_finite_numbers(served, literal, param):
    body = f'{{"messages": [{{"role": "user", "content": "hi"}}], "{param}": {literal}}}'.encode()
    r = served.client.request("POST", CHAT, body, {"Content-Type": "application/json"})
    assert r.status == 400 and r.json()["error"]["param"] == param
    bias = f'{{"prompt": "hi", "logit_bias": {{"5": {literal}}}}}'.encode()
    r = served.client.request("POST", COMPLETIONS, bias, {"Content-Type": "application/json"})
    assert r.status == 400 and r.json()["error"]["param"] == "logit_bias"


def test_lone_surrogates_are_refused(served):
    body = b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}'
    r = served.client.request("POST", CHAT, body, {"Content-Type": "application/json"})
    assert r.status == 400 and r.json()["error"]["param"] == "messages[0].content"
    r = served.client.request("POST", COMPLETIONS, b'{"prompt": "x", "stop": ["\\udfff"]}',
                              {"Content-Type": "application/json"})
    assert r.status == 400 and r.json()["error"]["param"] == "stop[0]"


def test_body_must_be_an_object(served):
    for body in ([], "hi", 5, None, [{"messages": MSG}]):
        for path in (CHAT, COMPLETIONS):
            r = served.client.post(path, body)
            assert r.status == 400 and "JSON object" in r.json()["error"]["message"]


def test_unknown_fields_are_ignored_and_noop_values_accepted(served):
    body = {"messages": MSG, "max_tokens": 2, "user": "u1", "metadata": {"a": "b"}, "store": False,
            "service_tier": "auto", "some_future_field": [1, {"x": None}], "n": 1, "tools": [], "tool_choice": "none",
            "response_format": {"type": "text"}, "modalities": ["text"], "stop": None, "seed": None,
            "logit_bias": {}, "stream": False, "parallel_tool_calls": True, "max_completion_tokens": None,
            "messages_extra": 1, "top_logprobs": 0, "presence_penalty": 0.5, "frequency_penalty": -0.5,
            "repetition_penalty": 1.1, "repetition_context_size": 8, "top_k": 512, "min_p": 0.05}
    r = served.client.post(CHAT, body)
    assert r.status == 200, r.body
    msgs = [{"role": "developer", "content": "x", "name": "d"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None}, {"role": "user", "content": ""}]
    assert served.client.post(CHAT, {"messages": msgs, "max_tokens": 1}).status == 200
    c = served.client.post(COMPLETIONS, {"prompt": "hi", "max_tokens": 1, "echo": False, "suffix": "", "best_of": 1,
                                         "logprobs": 0, "whatever": 1})
    assert c.status == 200 and c.json()["choices"][0]["logprobs"]["top_logprobs"] == [{}]


def test_prompt_plus_max_tokens_must_fit_the_context(served):
    ids = [50 + i % 100 for i in range(CONTEXT - 12)]
    r = served.client.post(COMPLETIONS, {"prompt": ids, "max_tokens": 20})
    assert r.status == 400 and r.json()["error"]["param"] == "max_tokens"
    assert str(CONTEXT) in r.json()["error"]["message"]
    r = served.client.post(COMPLETIONS, {"prompt": ids * 2, "max_tokens": 1})
    assert r.status == 400 and r.json()["error"]["param"] == "prompt"
    # Without max_tokens the default is cut to what fits.
    r = served.client.post(COMPLETIONS, {"prompt": ids + ids[:6], "logit_bias": {str(i): -100 for i in served.app.worker.end_ids}})
    assert r.status == 200 and r.json()["usage"]["completion_tokens"] == 6
