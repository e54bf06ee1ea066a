"""The demo dialogue's farewells: what a speech recogniser hears still ends the demo."""

from __future__ import annotations

import pytest

from gateway.events import Input, Response
from gateway.pipeline.demo import DemoPipeline, is_farewell
from gateway.sessions import Session

ENDS = [
    "goodbye",
    "Goodbye!",
    "good bye",
    "bye",
    "  Bye.  ",
    "okay goodbye",
    "thanks, bye",
    "bye bye now",
    "bye-bye",
    "ok bye then",
    "thank you goodbye",
    "alright see you later",
    "that's all, bye for now",
    "um goodbye everyone",
    "stop",
    "quit",
    "Exit!",
]

GOES_ON = [
    "goodbye is a sad word",
    "what does goodbye mean",
    "don't say goodbye",
    "never say bye",
    "goodbyes are hard",
    "buy a car",
    "stop the music",
    "byebye hotel",
    "hello",
    "",
]


@pytest.mark.parametrize("text", ENDS)
def test_a_farewell_at_the_end_of_the_utterance_ends(text: str) -> None:
    assert is_farewell(text)


@pytest.mark.parametrize("text", GOES_ON)
def test_other_utterances_do_not_end(text: str) -> None:
    assert not is_farewell(text)


def _session() -> Session:
    return Session(id="s", key="c:s", channel="c", app_key="app", attributes={"name": "Ada"})


async def _answer(text: str) -> Response:
    outputs = [o async for o in DemoPipeline().process(_session(), Input.of(text))]
    response = outputs[-1]
    assert isinstance(response, Response)
    return response


@pytest.mark.parametrize("text", ["okay goodbye", "thanks, bye", "bye bye now"])
async def test_the_demo_says_farewell_and_ends_the_session(text: str) -> None:
    response = await _answer(text)
    assert response.session_ended
    assert [item.text for item in response.items] == ["Goodbye, Ada!"]


async def test_the_demo_goes_on_after_a_farewell_word_in_the_middle() -> None:
    response = await _answer("goodbye is a sad word")
    assert not response.session_ended
    assert [item.text for item in response.items] == ["You said: goodbye is a sad word"]
