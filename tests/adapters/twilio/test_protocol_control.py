"""TwilioCall, sans I/O: an outbound call's #intro attributes, the #machine input of an
answering-machine answer, and a transfer carried out only at the final mark."""

from __future__ import annotations

import json

from adapters.twilio.protocol import (
    CallConfig,
    EndSession,
    StartTurn,
    State,
    TwilioCall,
)
from gateway.events import (
    BinaryEvent,
    Response,
    ResponseEvent,
    ResponseItem,
    ResponseItemEvent,
    transfer_item,
)
from gateway.protocol.call import MACHINE, InputsUnanswered, Interrupt, Play, Transfer
from tests.conftest import state_of

CALL = "CA" + "c" * 32
STREAM = "MZ" + "d" * 32


def start(**parameters: str) -> str:
    return json.dumps(
        {
            "event": "start",
            "sequenceNumber": "1",
            "streamSid": STREAM,
            "start": {
                "accountSid": "AC" + "0" * 32,
                "streamSid": STREAM,
                "callSid": CALL,
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                "customParameters": parameters,
            },
        }
    )


def mark(name: str) -> str:
    return json.dumps({"event": "mark", "streamSid": STREAM, "mark": {"name": name}})


DTMF_1 = json.dumps({"event": "dtmf", "streamSid": STREAM, "dtmf": {"digit": "1"}})
STOP = json.dumps(
    {
        "event": "stop",
        "streamSid": STREAM,
        "stop": {"accountSid": "AC" + "0" * 32, "callSid": CALL},
    }
)


def new_call() -> TwilioCall:
    return TwilioCall(CALL, CallConfig(key_allowed=lambda key: bool(key)))


def test_an_outbound_calls_intro_carries_direction_to_from_and_the_requests_attributes() -> None:
    call = new_call()
    (turn,) = call.receive(
        start(
            **{
                "from": "+15550199",
                "to": "+15550100",
                "appKey": "app",
                "direction": "outbound",
                "attributes": '{"campaign": "renewals", "direction": "spoofed"}',
                "answeredBy": "human",
            }
        )
    )
    assert isinstance(turn, StartTurn)
    assert turn.input.text == "#intro"
    assert turn.input.attributes == {
        "campaign": "renewals",
        "direction": "outbound",  # the gateway's own keys win
        "to": "+15550100",
        "from": "+15550199",
        "answeredBy": "human",
    }
    assert turn.ctx.config["direction"] == "outbound"


def test_an_outbound_calls_device_is_the_callee_not_the_gateways_own_number() -> None:
    """The session's device (``deviceId`` of the core's request) is the person's phone. On
    a call the gateway placed, Twilio's ``From`` is the gateway's own caller ID, the same
    for every call it places: before, every callee was that one device to the core."""
    outbound = {"from": "+15550199", "to": "+15550100", "appKey": "app", "direction": "outbound"}
    (turn,) = new_call().receive(start(**outbound))
    assert isinstance(turn, StartTurn)
    assert turn.ctx.device_id == "+15550100"
    assert (turn.ctx.config["from"], turn.ctx.config["to"]) == ("+15550199", "+15550100")


def test_an_inbound_calls_intro_is_unchanged() -> None:
    (turn,) = new_call().receive(start(**{"from": "+15550100", "appKey": "app"}))
    assert isinstance(turn, StartTurn)
    assert turn.input.attributes == {}
    assert "direction" not in turn.ctx.config
    assert turn.ctx.device_id == "+15550100"  # the caller's phone


def test_a_machine_answer_silences_the_bot_and_is_the_next_input() -> None:
    call = new_call()
    call.receive(start(appKey="app", direction="outbound"))
    # the intro is playing when the machine is detected
    played = call.turn_event(BinaryEvent(data=b"\xff" * 1600))
    assert isinstance(played[0], Play)
    actions = call.machine_answered("machine_end_beep")
    assert isinstance(actions[0], Interrupt)  # the bot falls silent at once
    assert not any(isinstance(a, StartTurn) for a in actions)  # after the running turn
    call.turn_event(ResponseEvent(response=Response()))
    (turn,) = call.turn_finished()
    assert isinstance(turn, StartTurn)
    assert (turn.input.text, turn.input.action) == (MACHINE, MACHINE)
    assert turn.input.attributes == {"answeredBy": "machine_end_beep"}
    call.turn_event(ResponseEvent(response=Response()))
    call.turn_finished()
    assert call.state is State.CALLER


def test_a_machine_answer_on_the_caller_s_floor_starts_at_once() -> None:
    call = new_call()
    call.receive(start(appKey="app", direction="outbound"))
    call.turn_event(ResponseEvent(response=Response()))
    call.turn_finished()
    assert call.state is State.CALLER
    (turn,) = call.machine_answered("machine_start")
    assert isinstance(turn, StartTurn)
    assert turn.input.attributes == {"answeredBy": "machine_start"}


def test_a_redelivered_machine_answer_is_no_second_machine_input() -> None:
    """Carriers deliver webhooks at least once: the same AMD result (or another) for a
    call that took one already gives no actions, whatever the call's state."""
    call = new_call()
    call.receive(start(appKey="app", direction="outbound"))
    call.turn_event(ResponseEvent(response=Response()))
    call.turn_finished()
    (turn,) = call.machine_answered("machine_end_beep")
    assert isinstance(turn, StartTurn)
    assert call.machine_answered("machine_end_beep") == []  # the turn runs
    call.turn_event(ResponseEvent(response=Response()))
    assert call.turn_finished() == []
    assert call.state is State.CALLER
    assert call.machine_answered("machine_end_beep") == []  # the caller's floor
    assert call.machine_answered("fax") == []
    assert call.state is State.CALLER
    assert call.machine_heard == "machine_end_beep"


def test_a_machine_answer_taken_into_the_intro_is_not_a_machine_input_again() -> None:
    call = new_call()
    assert call.machine_answered("machine_start") == []
    (turn,) = call.receive(start(appKey="app", direction="outbound"))
    assert isinstance(turn, StartTurn)
    assert turn.input.attributes["answeredBy"] == "machine_start"
    call.turn_event(ResponseEvent(response=Response()))
    call.turn_finished()
    assert call.machine_answered("machine_start") == []


def test_a_machine_answer_before_start_goes_into_the_intro() -> None:
    call = new_call()
    assert call.machine_answered("fax") == []
    (turn,) = call.receive(start(appKey="app", direction="outbound"))
    assert isinstance(turn, StartTurn)
    assert turn.input.attributes["answeredBy"] == "fax"


def test_a_transfer_waits_for_the_final_mark_after_the_audio_before_it() -> None:
    call = new_call()
    call.receive(start(appKey="app"))
    call.turn_event(ResponseItemEvent(response_item=ResponseItem(text="One moment.")))
    (play,) = call.turn_event(BinaryEvent(data=b"\xff" * 1600))
    assert isinstance(play, Play)
    item = transfer_item("sip:agent@pbx.example.com", reason="billing")
    assert call.turn_event(ResponseItemEvent(response_item=item)) == []
    # what follows the transfer in the turn is not played
    assert call.turn_event(BinaryEvent(data=b"\xff" * 1600)) == []
    call.turn_event(ResponseEvent(response=Response()))
    (final,) = call.turn_finished()  # the session ends once the carrier took the transfer
    assert isinstance(final, Play)
    assert final.final
    assert call.state is State.ENDING
    spoken_mark = json.loads(play.mark)["mark"]["name"]
    final_mark = json.loads(final.mark)["mark"]["name"]
    assert call.receive(mark(spoken_mark)) == []  # the sentence played; the end not yet
    (transfer,) = call.receive(mark(final_mark))
    assert transfer == Transfer(CALL, "sip:agent@pbx.example.com", "billing")
    assert state_of(call) is State.TRANSFERRING
    (end,) = call.transfer_finished(True)
    assert isinstance(end, EndSession)  # the core did not end it: the transfer does
    assert call.closed


def test_keys_collected_before_a_transfer_are_not_an_input_when_the_stream_stops() -> None:
    # keys the caller typed while the transfer's turn ran wait for its result (an input
    # when the turn finished); the stop while the carrier is asked (the transfer's
    # result not known yet) drops them, said in InputsUnanswered: no turn starts
    call = TwilioCall(
        CALL, CallConfig(key_allowed=lambda key: bool(key), dtmf_mode="collect", barge_in=False)
    )
    call.receive(start(appKey="app"))
    call.turn_event(ResponseItemEvent(response_item=transfer_item("+15550123")))
    assert call.receive(DTMF_1) == []  # collected (no '#', no pause)
    call.turn_event(ResponseEvent(response=Response()))
    call.turn_finished()
    assert call.final_mark_overdue() == [Transfer(CALL, "+15550123", None)]
    unanswered, end = call.receive(STOP)
    assert unanswered == InputsUnanswered("stream stopped", 1)
    assert isinstance(end, EndSession)


def test_a_transfer_in_a_turn_that_ended_the_session_is_not_ended_twice() -> None:
    call = new_call()
    call.receive(start(appKey="app"))
    call.turn_event(ResponseItemEvent(response_item=transfer_item("+15550123")))
    call.turn_event(ResponseEvent(response=Response(session_ended=True)))
    (final,) = call.turn_finished()
    assert isinstance(final, Play)
    assert call.final_mark_overdue() == [Transfer(CALL, "+15550123", None)]


def test_a_transfer_of_an_interrupted_turn_still_happens() -> None:
    """The caller cut the turn off (barge-in) before its transfer item came: the core's
    transfer stands, as it does when the item came before the barge-in (and as a session
    the turn ended stays ended): whether the announcement's synthesis or the caller was
    first does not decide whether the call is handed over. Before, the item was dropped
    with the turn's rest (a hang-up here) when it came after the barge-in."""
    call = new_call()
    call.receive(start(appKey="app"))
    call.turn_event(BinaryEvent(data=b"\xff" * 1600))
    assert call.turn is not None
    call.turn.discarded = True  # barge-in
    call.turn_event(ResponseItemEvent(response_item=transfer_item("+15550123")))
    assert call.transfer == ("+15550123", None)
    call.turn_event(ResponseEvent(response=Response(session_ended=True)))
    call.turn_finished()
    assert call.final_mark_overdue() == [Transfer(CALL, "+15550123", None)]
