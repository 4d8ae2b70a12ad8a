"""Gemma 4's chat format and the streaming reasoning/answer parser."""

from __future__ import annotations

import itertools

import pytest

from gemma4_mlx.chat_format import (
    CHANNEL_END,
    CHANNEL_START,
    ReasoningParser,
    gemma4_prompt,
    iter_split,
    messages_from,
    next_turn_text,
    split_reasoning,
)


# -- prompt format --------------------------------------------------------------------------
def test_single_user_turn():
    assert gemma4_prompt(messages_from("Hi")) == "<bos><|turn>user\nHi<turn|>\n<|turn>model\n"


def test_system_and_thinking_switch():
    assert gemma4_prompt(messages_from("Hi", system="Be brief.")) == (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n")
    assert gemma4_prompt(messages_from("Hi"), think=True) == (
        "<bos><|turn>system\n<|think|><turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n")
    assert gemma4_prompt(messages_from("Hi", system="S"), think=True) == (
        "<bos><|turn>system\n<|think|>S<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n")
    assert "<|think|>" not in gemma4_prompt(messages_from("Hi", system="S"), think=False)


def test_history_assistant_is_model_and_drops_reasoning():
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "<|channel>thought\nhmm<channel|>b"},
        {"role": "user", "content": "c"},
    ]
    assert gemma4_prompt(msgs) == (
        "<bos><|turn>user\na<turn|>\n<|turn>model\nb<turn|>\n<|turn>user\nc<turn|>\n<|turn>model\n")
    assert gemma4_prompt(msgs, add_generation_prompt=False).endswith("<|turn>user\nc<turn|>\n")


def test_next_turn_text_extends_a_conversation():
    # the cached reply ended with <turn|>: the new turn continues exactly as a full render would
    full = gemma4_prompt([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}])
    head = "<bos><|turn>user\na<turn|>\n<|turn>model\nb<turn|>"
    assert head + next_turn_text("c", previous_closed=True) == full
    assert "<bos><|turn>user\na<turn|>\n<|turn>model\nb" + next_turn_text("c", previous_closed=False) == full


def test_unknown_role_rejected():
    with pytest.raises(ValueError):
        gemma4_prompt([{"role": "robot", "content": "x"}])


# -- parser ---------------------------------------------------------------------------------
CASES = [
    ("<|channel>thought\nlet me think<channel|>The answer is 4.", "The answer is 4.", "let me think"),
    ("plain answer, no reasoning", "plain answer, no reasoning", ""),
    ("<|channel>thought\n<channel|>empty thought", "empty thought", ""),
    ("pre <|channel>thought\nA<channel|> mid <|channel>thought\nB<channel|> end", "pre  mid  end", "AB"),
    ("<|channel>thought\nunfinished reasoning", "", "unfinished reasoning"),
    ("a < b and <|chan is not a marker", "a < b and <|chan is not a marker", ""),
    ("x <channel| y", "x <channel| y", ""),
    ("<|channel>thoughtless<channel|>ok", "ok", "less"),
    ("<|channel>other\nstuff<channel|>ok", "ok", "other\nstuff"),
]


@pytest.mark.parametrize("text,answer,reasoning", CASES)
def test_whole_text(text, answer, reasoning):
    assert split_reasoning(text) == (answer, reasoning)


@pytest.mark.parametrize("text,answer,reasoning", CASES)
def test_split_at_every_position(text, answer, reasoning):
    for i in range(len(text) + 1):
        assert iter_split([text[:i], text[i:]]) == (answer, reasoning), i


@pytest.mark.parametrize("text,answer,reasoning", CASES[:4])
def test_split_at_every_pair_of_positions(text, answer, reasoning):
    for i, j in itertools.combinations(range(len(text) + 1), 2):
        assert iter_split([text[:i], text[i:j], text[j:]]) == (answer, reasoning), (i, j)


@pytest.mark.parametrize("text,answer,reasoning", CASES)
def test_one_character_at_a_time(text, answer, reasoning):
    assert iter_split(list(text)) == (answer, reasoning)


def test_markers_never_leak_and_text_is_not_held_longer_than_needed():
    p = ReasoningParser()
    assert p.feed("Hello <") == ("Hello ", "")  # "<" may start a marker: held
    assert p.feed("b>") == ("<b>", "")  # decided: plain text
    assert p.feed("<|channel>thou") == ("", "")
    assert p.in_reasoning
    assert p.feed("ght\nwhy") == ("", "why")
    assert p.feed("<chan") == ("", "")
    assert p.feed("nel|>done") == ("done", "")
    assert not p.in_reasoning
    assert p.finish() == ("", "")
    out = "".join(itertools.chain.from_iterable(p.feed(c) for c in "x<|channel>thought\ny<channel|>z"))
    assert CHANNEL_START not in out and CHANNEL_END not in out


# -- properties (hypothesis) ----------------------------------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# Text made of marker fragments and look-alikes, so random strings often come close to markers.
_ATOMS = ["a", " ", "\n", "<", "|", ">", "<|", "|>", "<|chan", "channel", "thought", "thought\n",
          CHANNEL_START, CHANNEL_END, "<channel|", "|channel>", "<|turn>", "x<"]
TEXT = st.lists(st.sampled_from(_ATOMS), max_size=12).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=TEXT, cuts=st.lists(st.integers(0, 200), max_size=6))
def test_streaming_equals_whole_text_for_any_split(text, cuts):
    """However the generated text is cut into pieces, the streamed answer and reasoning equal
    the whole-text split. (Marker *leaks* are checked below on well-formed text: here plain
    text around a dropped stray marker may spell a marker by concatenation, which a token
    stream, where each marker is one token, cannot.)"""
    points = sorted({c % (len(text) + 1) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0] + points, points + [len(text)])]
    assert iter_split(pieces) == split_reasoning(text)


@settings(max_examples=200, deadline=None)
@given(answer=TEXT.filter(lambda t: CHANNEL_START not in t and CHANNEL_END not in t and "<|channel" not in t),
       thought=st.text(alphabet="abc \n", max_size=20), cut=st.integers(0, 100))
def test_reasoning_then_answer_round_trip(answer, thought, cut):
    text = f"{CHANNEL_START}thought\n{thought}{CHANNEL_END}{answer}"
    cut %= len(text) + 1
    got = iter_split([text[:cut], text[cut:]])
    assert got == split_reasoning(text)
    assert got == (answer, thought)
