"""One action vocabulary: the adapters use the kit's actions and define none of the same ideas."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from gateway.protocol import actions

ROOT = Path(__file__).resolve().parents[3]
SANS_IO = ("adapters/flowstorm/v2/hearing.py",)
"""Other sans-I/O modules of the adapters (as in tests/test_protocol_purity.py)."""
PROTOCOLS = sorted([*ROOT.glob("adapters/**/protocol.py"), *(ROOT / p for p in SANS_IO)])
SHARED = set(actions.__all__)
OTHER_NAMES = {"Hear", "Listen", "StopListening"}
"""Names the same ideas had before the kit (Twilio's), refused as well."""


def _classes(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}


@pytest.mark.parametrize("path", PROTOCOLS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_adapter_defines_a_shared_action_again(path: Path) -> None:
    again = _classes(path) & (SHARED | OTHER_NAMES)
    assert not again, (
        f"{path.relative_to(ROOT)} defines {sorted(again)}: use gateway.protocol.actions"
    )


def test_the_adapters_actions_are_the_kits() -> None:
    from adapters.flowstorm.v1 import protocol as v1
    from adapters.flowstorm.v2 import hearing
    from adapters.twilio import protocol as twilio
    from adapters.voiceflow import protocol as voiceflow

    assert v1.Send is actions.Send
    assert hearing.FeedAudio is actions.FeedAudio
    assert hearing.CancelListening is actions.CancelListening
    assert v1.StartListening is actions.StartListening
    assert twilio.StartTurn is actions.StartTurn
    assert twilio.EndSession is actions.EndSession
    assert voiceflow.StartTurn is actions.StartTurn


def test_actions_are_frozen_values() -> None:
    send = actions.Send("hi")
    assert send == actions.Send("hi")
    with pytest.raises(AttributeError):
        send.text = "changed"  # type: ignore[misc]
    assert actions.StartListening(1, None).from_ms is None  # type: ignore[arg-type]
