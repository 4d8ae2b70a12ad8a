"""Gemma 4 tool calling: the value notation, the streaming call parser, the chat format with tools
(built-in and the template ``init`` writes agree), and calls end to end through ``generate``,
``ChatSession`` and ``gemma4-mlx chat --tools``."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemma4_mlx.chat_format import encode_prompt, encode_text, format_prompt, gemma4_prompt
from gemma4_mlx.tools import (
    TOOL_CALL_END,
    TOOL_CALL_START,
    ToolCallParser,
    format_call,
    format_value,
    normalize_tools,
    parse_call,
    parse_tool_calls,
    parse_value,
)
from test_generate import Scripted, loaded, tiny_ckpt  # noqa: F401  (fixtures)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"},
        "days": {"type": "integer", "enum": [1, 2, 3]},
        "Units": {"type": "array", "items": {"type": "string"}}},
        "required": ["city"]}}}


# -- the value notation -----------------------------------------------------------------------
def test_value_notation():
    assert format_value({"b": 1, "a": "x", "C": [True, None, 2.5]}) == '{a:<|"|>x<|"|>,b:1,C:[true,null,2.5]}'
    assert format_call("f", {"q": "a,b}{"}) == '<|tool_call>call:f{q:<|"|>a,b}{<|"|>}<tool_call|>'
    assert parse_value('{a:<|"|>x, y<|"|>,n:-3,f:1.5,t:true,z:null,l:[1,<|"|>s<|"|>],o:{k:false}}') == {
        "a": "x, y", "n": -3, "f": 1.5, "t": True, "z": None, "l": [1, "s"], "o": {"k": False}}
    assert parse_value('{"quoted": "json string"}') == {"quoted": "json string"}


JSON = st.recursive(
    # any text but Gemma 4's string delimiter itself (one special token, never inside a string)
    st.none() | st.booleans() | st.integers(-10**6, 10**6)
    | st.text(alphabet="ab ,:{}[]<>|\"'\n", max_size=8).filter(lambda t: '<|"|>' not in t),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet="abcXYZ_", min_size=1, max_size=5),
                                                                  inner, max_size=3),
    max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(args=st.dictionaries(st.text(alphabet="abcXYZ_", min_size=1, max_size=5), JSON, max_size=4))
def test_value_notation_round_trips(args):
    """Whatever JSON arguments the host sends, writing them in Gemma 4's notation and reading
    them back gives them again (strings may hold commas, braces and quotes)."""
    assert parse_value(format_value(args)) == args
    call = parse_call(format_call("fn", args)[len(TOOL_CALL_START):-len(TOOL_CALL_END)])
    assert (call.name, call.arguments) == ("fn", args)


# -- the streaming parser ------------------------------------------------------------------------
CALL_TEXT = ('Let me look.<|tool_call>call:get_weather{city:<|"|>Paris, FR<|"|>,days:2}<tool_call|>'
             '<|tool_call>call:now{}<tool_call|> then <|tool')
WANT_TEXT = "Let me look. then <|tool"
WANT_CALLS = [("get_weather", {"city": "Paris, FR", "days": 2}), ("now", {})]


def _run(pieces):
    p = ToolCallParser()
    text, calls = [], []
    for piece in pieces:
        t, c = p.feed(piece)
        text.append(t)
        calls += c
    t, c = p.finish()
    return "".join(text) + t, [(c.name, c.arguments) for c in calls + c]


def test_calls_whole():
    text, calls = parse_tool_calls(CALL_TEXT)
    assert text == WANT_TEXT and [(c.name, c.arguments) for c in calls] == WANT_CALLS


def test_calls_split_at_every_pair_of_positions():
    for i, j in itertools.combinations(range(len(CALL_TEXT) + 1), 2):
        assert _run([CALL_TEXT[:i], CALL_TEXT[i:j], CALL_TEXT[j:]]) == (WANT_TEXT, WANT_CALLS), (i, j)
    assert _run(list(CALL_TEXT)) == (WANT_TEXT, WANT_CALLS)


_ATOMS = ["a", " ", "<", "|", ">", "{", "}", ":", ",", "<|tool", "_call>", "<tool_call", "|>", TOOL_CALL_START,
          TOOL_CALL_END, "call:f", '{x:<|"|>v<|"|>}', "{}", "call:", '<|"|>']
TEXT = st.lists(st.sampled_from(_ATOMS), max_size=14).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=TEXT, cuts=st.lists(st.integers(0, 300), max_size=6))
def test_streaming_equals_whole_text_for_any_split(text, cuts):
    """However the model's output is cut into pieces, the streamed text and calls equal those of
    the whole text; nothing is lost: malformed or unfinished markup comes back as text."""
    points = sorted({c % (len(text) + 1) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0] + points, points + [len(text)])]
    whole_text, whole_calls = parse_tool_calls(text)
    assert _run(pieces) == (whole_text, [(c.name, c.arguments) for c in whole_calls])
    if not whole_calls:
        assert whole_text == text


def test_malformed_call_is_kept_as_text():
    p = ToolCallParser()
    bad = "<|tool_call>call:f{x:<|\"|>unterminated}<tool_call|>"
    assert p.feed(bad + " ok") == (bad + " ok", [])
    assert p.errors and "unterminated" in p.errors[0]


def test_normalize_tools():
    def add(a: int, b: int) -> int:
        """Add two numbers.

        Args:
            a: first
            b: second
        """
        return a + b

    out = normalize_tools([WEATHER, {"name": "ping"}, add])
    assert [t["function"]["name"] for t in out] == ["get_weather", "ping", "add"]
    assert out[2]["function"]["parameters"]["properties"]["a"]["type"] == "integer"
    for bad, msg in (("x", "list"), ([{"type": "code"}], "only 'function'"), ([{"function": {}}], "function.name"),
                     ([{"name": "a b"}], "may not hold"), ([{"name": "f", "parameters": 3}], "JSON schema")):
        with pytest.raises(ValueError, match=msg):
            normalize_tools(bad)


# -- the chat format with tools -------------------------------------------------------------------
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}},
        {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lyon"}}}]},
    {"role": "tool", "tool_call_id": "c2", "content": "rain"},
    {"role": "tool", "tool_call_id": "c1", "content": {"sky": "sunny", "temp": 21}},
    {"role": "assistant", "content": "Sunny in Paris, rain in Lyon."},
    {"role": "user", "content": "Thanks"},
]


def test_builtin_format_with_tools():
    text = gemma4_prompt(HISTORY, tools=[WEATHER])
    assert text.startswith("<bos><|turn>system\nBe brief.<|tool>declaration:get_weather{description:<|\"|>Current "
                           "weather of a city.<|\"|>,parameters:{properties:{city:{description:<|\"|>City name<|\"|>,"
                           "type:<|\"|>STRING<|\"|>},days:{enum:[1,2,3],type:<|\"|>INTEGER<|\"|>},Units:{items:{type:"
                           "<|\"|>STRING<|\"|>},type:<|\"|>ARRAY<|\"|>}},required:[<|\"|>city<|\"|>],type:<|\"|>OBJECT"
                           "<|\"|>}}<tool|><turn|>\n")
    assert text.endswith(
        "<|turn>user\nWeather in Paris?<turn|>\n<|turn>model\n"
        "<|tool_call>call:get_weather{city:<|\"|>Paris<|\"|>,days:2}<tool_call|>"
        "<|tool_call>call:get_weather{city:<|\"|>Lyon<|\"|>}<tool_call|>"
        "<|tool_response>response:get_weather{value:<|\"|>rain<|\"|>}<tool_response|>"
        "<|tool_response>response:get_weather{sky:<|\"|>sunny<|\"|>,temp:21}<tool_response|>"
        "Sunny in Paris, rain in Lyon.<turn|>\n<|turn>user\nThanks<turn|>\n<|turn>model\n")
    # after the responses the model goes on in its own turn: no new turn, no generation prompt
    assert gemma4_prompt(HISTORY[:5], tools=[WEATHER]).endswith("temp:21}<tool_response|>")
    # calls not answered yet: the model's hand-over marker ends the text
    assert gemma4_prompt(HISTORY[:3], tools=[WEATHER]).endswith("<tool_call|><|tool_response>")
    with pytest.raises(ValueError, match="must follow an assistant message with tool_calls"):
        gemma4_prompt([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}])


MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "tool"]),
                                 "content": st.sampled_from(["", " hi ", "a\nb", "<|channel>thought\nx<channel|>y"]),
                                 "calls": st.lists(st.sampled_from(["get_weather", "now"]), max_size=2)})


@settings(max_examples=60, deadline=None)
@given(msgs=st.lists(MESSAGE, min_size=1, max_size=6), system=st.sampled_from([None, "", "S"]),
       think=st.booleans(), with_tools=st.booleans(), gen=st.booleans())
def test_checkpoint_template_and_builtin_format_agree(tiny_ckpt, msgs, system, think, with_tools, gen):  # noqa: F811
    """The Jinja template `init` writes and gemma4_prompt() render every conversation the same:
    tool calls, tool responses (by id and by name), continuation after responses, reasoning drop."""
    t1 = _tokenizer(tiny_ckpt)
    messages = [] if system is None else [{"role": "system", "content": system}]
    prev_calls = False
    for k, m in enumerate(msgs):
        if m["role"] == "tool" and not prev_calls:
            continue
        msg = {"role": m["role"], "content": m["content"]}
        if m["role"] == "assistant" and m["calls"]:
            msg["tool_calls"] = [{"id": f"i{k}{j}", "type": "function", "function": {"name": n, "arguments": {"k": j}}}
                                 for j, n in enumerate(m["calls"])]
        if m["role"] == "tool":
            msg["name" if k % 2 else "tool_call_id"] = "now" if k % 2 else f"i{k - 1}0"
        prev_calls = bool(msg.get("tool_calls")) or (prev_calls and m["role"] == "tool")
        messages.append(msg)
    if not messages:
        messages = [{"role": "user", "content": "q"}]
    tools = [WEATHER, {"name": "now"}] if with_tools else None
    a = t1.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen, enable_thinking=think)
    b = gemma4_prompt(messages, think=think, tools=tools, add_generation_prompt=gen)
    assert a == b


_TOKENIZERS = {}


def _tokenizer(path):
    from gemma4_mlx.loading import load_tokenizer

    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = load_tokenizer(path)
    return _TOKENIZERS[path]


def test_checkpoint_template_without_tool_support_is_refused(tiny_ckpt, tmp_path):  # noqa: F811
    import shutil

    from gemma4_mlx.loading import load_tokenizer

    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    cfg = json.loads((ck / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (ck / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(ck)
    with pytest.raises(ValueError, match="no tool support"):
        format_prompt(tok, "hi", tools=[WEATHER])
    assert "declaration:get_weather" in format_prompt(tok, "hi", tools=[WEATHER], use_template=False)


# -- end to end ---------------------------------------------------------------------------------------
def by_position(model, script):
    """The model with ``script[p]`` forced as the token at absolute position ``p``."""
    wrapped = Scripted(model, script=script)
    wrapped.start = 0  # count positions from the start of the sequence, not of the reply
    return wrapped


def _place(tokens, start):
    return {start + i: t for i, t in enumerate(tokens)}


def test_generate_returns_tool_calls_and_takes_their_results(loaded):  # noqa: F811
    import gemma4_mlx

    model, tok = loaded
    vocab = tok.get_vocab()
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    prompt = encode_prompt(tok, messages, tools=[WEATHER])
    call = encode_text(tok, 'Checking.<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:2}<tool_call|>')
    w = by_position(model, _place(call + [vocab["<|tool_response>"]], len(prompt)))
    res = gemma4_mlx.generate(w, tok, messages, max_tokens=60, tools=[WEATHER])
    assert res.finish_reason == "stop" and res.text == "Checking."
    assert [(c.name, c.arguments) for c in res.tool_calls] == [("get_weather", {"city": "Paris", "days": 2})]
    steps = list(gemma4_mlx.stream_generate(by_position(model, w.script), tok, messages, max_tokens=60, tools=[WEATHER]))
    assert sum(len(s.tool_calls) for s in steps) == 1 and steps[-2].tool_calls  # completed by <tool_call|>
    assert all(s.logprobs is not None and s.logprobs.shape[-1] == model.args.vocab_size for s in steps)
    assert not any(s.from_draft for s in steps)

    # the result goes back as a tool message; the model goes on in the same turn. (Gemma 4's
    # template writes an assistant message's content after its tool responses, so the text said
    # before the call is not sent back here.)
    messages += [{"role": "assistant", "content": "", "tool_calls": [c.to_openai() for c in res.tool_calls]},
                 res.tool_calls[0].result({"sky": "sunny"})]
    prompt2 = encode_prompt(tok, messages, tools=[WEATHER])
    assert tok.decode(prompt2).endswith(
        '<|tool_response>response:get_weather{sky:<|"|>sunny<|"|>}<tool_response|>')
    answer = encode_text(tok, "Sunny.")
    w2 = by_position(model, _place(answer + [vocab["<turn|>"]], len(prompt2)))
    res2 = gemma4_mlx.generate(w2, tok, messages, max_tokens=20, tools=[WEATHER])
    assert res2.text == "Sunny." and res2.tool_calls == [] and res2.finish_reason == "stop"


def test_chat_session_tool_round_reuses_the_cache(loaded):  # noqa: F811
    from gemma4_mlx.chat_format import encode_tool_results
    from gemma4_mlx.generation import ChatSession, generate

    model, tok = loaded
    vocab = tok.get_vocab()
    p1 = len(encode_prompt(tok, "Weather?", tools=[WEATHER]))
    call = encode_text(tok, '<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>}<tool_call|>') + [vocab["<|tool_response>"]]
    results = encode_tool_results(tok, [("get_weather", "snow <turn|>")], opened=True)
    p2 = p1 + len(call) + len(results)
    answer = encode_text(tok, "Snow.") + [vocab["<turn|>"]]
    w = by_position(model, {**_place(call, p1), **_place(answer, p2)})
    s = ChatSession(w, tok, tools=[WEATHER], max_tokens=40)
    list(s.send("Weather?"))
    assert [(c.name, c.arguments) for c in s.pending_calls] == [("get_weather", {"city": "Oslo"})]
    w.fed.clear()
    reply = list(s.send_tool_results(["snow <turn|>"]))
    assert "".join(r.text for r in reply) == "Snow." and reply[-1].finish_reason == "stop"
    # only the response block was prefilled, and its <turn|> text stayed text
    assert s.last_prefill_tokens == len(results) and w.fed[0] == len(results) - 1
    assert vocab["<turn|>"] not in results
    # the kept cache holds exactly what a fresh render of the history gives
    history = encode_prompt(tok, s.messages[:-1], tools=[WEATHER])
    assert history == encode_prompt(tok, "Weather?", tools=[WEATHER]) + call + results
    fresh = generate(by_position(model, _place(answer, p2)), tok, history, max_tokens=40)
    assert fresh.text == "Snow."
    assert [m["role"] for m in s.messages] == ["user", "assistant", "tool", "assistant"]
    with pytest.raises(ValueError, match="no tool calls"):
        s.send_tool_results(["x"])


def test_chat_command_with_tools(tiny_ckpt, tmp_path, monkeypatch):  # noqa: F811
    """`chat --tools`: the call is printed, its result read as the next line, and the model goes on."""
    from typer.testing import CliRunner

    import gemma4_mlx.generation as generation
    from gemma4_mlx.commands import app
    import gemma4_mlx.commands.chat  # noqa: F401

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER]))
    real = generation.stream_generate
    scripted = {}

    def forcing(model, tokenizer, prompt, **kw):
        if not scripted:
            vocab = tokenizer.get_vocab()
            call = encode_text(tokenizer, '<|tool_call>call:get_weather{city:<|"|>Rome<|"|>}<tool_call|>')
            scripted["w"] = by_position(model, _place(call + [vocab["<|tool_response>"]], len(prompt)))
        return real(scripted["w"], tokenizer, prompt, **kw)

    monkeypatch.setattr(generation, "stream_generate", forcing)
    r = CliRunner().invoke(app, ["chat", "--model", str(tiny_ckpt), "--tools", str(tools), "-m", "40"],
                           input='Weather in Rome?\n{"sky": "clear"}\n/exit\n')
    assert r.exit_code == 0, r.output
    assert '[tool call] get_weather {"city": "Rome"}' in r.stdout
    assert "result of get_weather>> " in r.stdout
    bad = CliRunner().invoke(app, ["chat", "--model", str(tiny_ckpt), "--tools", str(tmp_path / "none.json")])
    assert bad.exit_code == 2 and "no such tools file" in bad.stderr
