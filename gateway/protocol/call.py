"""The shared phone-call engine, sans I/O: any carrier's stream, through its codec (issue 14).

Spec: shared/specs/CARRIERS.md ("Comparison summary", "Design hint"), DESIGN.md
(session id = the carrier's call id, ``#intro`` starts the conversation,
``#silence`` when the caller says nothing). The carrier's wire is a
:class:`~gateway.callcodec.CarrierCodec` (``adapters/<carrier>/protocol.py``); what is
left is here: :class:`CarrierCall`, fed the codec's :data:`~gateway.callcodec.CallEvent` s,
the speech stage's verdicts and the turn engine's events, returns actions for the
runner (gateway/io/call.py).

The flow is Twilio's (adapters/twilio/protocol.py, whose module doc describes it in
full; :data:`TRANSITIONS` is the same state machine):

1. ``connected`` then the codec's :class:`~gateway.callcodec.Started` -> the ``#intro``
   turn [bot]; the start must name the call its token was issued for (when the
   carrier names it) and an allowed application key (``appKey`` parameter). A start
   in a media format the gateway cannot take (the codec's
   :class:`~gateway.callcodec.UnsupportedMediaFormat`) closes the stream at once with
   :data:`CLOSE_UNSUPPORTED`, its reason the codec's text; one the codec cannot read
   (:class:`~gateway.callcodec.InvalidStart`) with :data:`CLOSE_POLICY`, likewise.
2. Each response item's speech goes out through ``codec.audio`` followed by
   ``codec.mark``: :class:`Play`; the floor passes to the caller when the turn is
   over and every mark (:class:`~gateway.callcodec.Played`) has come back. Speech is
   **streamed**: asked for in a headerless format close to the wire's
   (:func:`speech_request`: μ-law for PCMU 8 kHz, 16-bit PCM at 8 or 16 kHz for A-law
   and L16), so each synthesized piece (a sentence or clause) is played as soon as it
   is made, not the whole item after its synthesis (WAV only for other rates). A
   codec whose chunks are long (:class:`~gateway.callcodec.ChunkingCodec`: Exotel's,
   200 ms at least) carries each piece's tail into the next piece's first chunk (a
   piece's mark follows its whole chunks) and pads only the turn's last tail, sent
   unmarked at its Response (or before the error text), so no silence falls between
   the pieces; the padding sent counts as audio played.
3. Every inbound audio chunk (16-bit PCM at the stream's rate) goes to the call's
   speech stage (:class:`FeedAudio`); its verdict comes back through
   :meth:`CarrierCall.voice`: onset -> StartListening; final text -> the next input;
   no speech for ``silence_timeout_ms`` -> ``#silence``.
4. Barge-in without false stops (issue 16): the caller's speech over the bot lasting
   ``barge_in_min_speech_ms`` -> :class:`PausePlayback` (no new audio is sent; the
   carrier plays out only the little it holds, GATEWAY_TWILIO_SEND_AHEAD_MS) and the
   utterance is recognised [holding]. A real interruption -- content words in its
   transcript (not in ``barge_in_backchannels``, no filler, no function word; see
   :class:`CallConfig`), or voiced speech longer than ``barge_in_max_backchannel_ms``
   -> :class:`Interrupt` (``codec.clear()``, queued audio dropped, the turn's rest
   too) [hearing]; the next input carries what the caller heard
   (:data:`~gateway.events.HEARD`). A backchannel, filler or noise (no content words)
   -> :class:`ResumePlayback` once the caller has been quiet ``barge_in_resume_ms``:
   the audio goes on where it paused, nothing lost [bot]; its final transcript is
   still judged (an interruption then interrupts). Speech the endpointer ended first
   (its short end of turn, or a pause within a sentence: "hold on, | that is...")
   resumes only at its final, if that holds no interruption. ``barge_in_max_backchannel_ms`` 0:
   every such speech interrupts at once. A carrier that is sent the whole answer at
   once (codec not ``realtime``: Plivo, Exotel) cannot be paused: its speech over the
   bot is judged the same way while the bot plays on (no PausePlayback or
   ResumePlayback, :attr:`CarrierCall.pauses`), so a cough or a backchannel does not
   cut the answer off, and a real interruption clears it once judged (its ``heard``
   counts to the clear). Before, any such speech cleared it at once: a cough just
   after the caller's words (before their final) cut their answer off before a word of
   it played, and the core got ``#fallback``.

   **Speech begun before a final.** The speech stage listens to one utterance at a
   time; the caller may speak again after the endpointer ended the utterance heard and
   before its final came (a recognizer behind the caller). That speech is placed by
   when the utterance *ended*, not by when its final came: until that final it is not
   judged (only the final decides), and once the final is taken the speech, if it goes
   on, is heard from its onset (its own StartListening, the stage's kept audio giving
   its start; :meth:`CarrierCall._heard_next`):

   - the final made an input (a real interruption that cleared the bot, or any
     utterance on the caller's floor): the bot's floor counts from the utterance's end,
     so the speech is speech over the answer to it, paused and judged as any
     (:meth:`CarrierCall._commit` ``since``): a real interruption cuts that answer off
     and is the input after it (its ``heard`` is what the caller heard of the answer);
     when that answer had not started (the input waits for the turn cut off before),
     its words are joined to that input ("Inputs that wait" below); a backchannel lets
     it play. Speech the endpointer confirms only after the final
     (it began just before) is treated the same way;
   - the final was a backchannel, filler or noise over the bot: the bot is not resumed
     over the caller speaking again; it stays paused and the new speech is judged;
   - the final held no words on the caller's floor: the new speech is the next
     utterance.

   Speech that began and also ended before that final (a quick "yes" ... "no wait", a
   recognizer a whole short phrase behind) is heard the same way, from its onset to its
   end: the endpointer's onsets and ends are followed while the final is awaited, and
   the utterance opened is the stage's kept audio alone (StartListening ``until_ms``),
   recognised at once; speech from that end on follows it in turn. Several such speeches,
   or one and speech going on at the final, are one utterance from the first onset (its
   words joined; one input, as one utterance would be). However late the final comes,
   such speech is heard whole: the stage keeps its audio from before its onset until
   the next utterance opens (:class:`~gateway.speech.stage.SpeechStage`, bounded by the
   utterance limit GATEWAY_MAX_AUDIO_S), except over the paused bot after a backchannel's
   or a noise's final: ended speech whose voice ended more than :attr:`CarrierCall.keep_ms`
   before that final is let go and the bot resumes (holding it on would keep it silent
   for a second final of a recognizer that far behind; a bot that cannot be paused,
   Plivo's or Exotel's, plays on meanwhile: such speech over it is heard and judged).
   Before, the stage kept only
   :attr:`CarrierCall.keep_ms` (2.45 s), and a final later than :data:`FINAL_LAG_MS`
   after that speech began (a loaded machine's recognizer, several seconds behind) lost
   its start, or all of it.
5. DTMF (:class:`~gateway.callcodec.Digit`): ``digit`` or ``collect`` mode, as Twilio.
   Keys collected when the stream ends (no ``#`` or pause yet) are still the caller's
   input, as Twilio's ``<Gather>`` submits the digits typed before a hang-up (step 6).
   A key pressed while the caller speaks (an utterance open: its onset heard, no final
   yet) does not cancel the utterance: it is heard out and its words are an input, the
   keys after it ("Inputs that wait" below). Over the paused bot (held, or resumed early
   and judged) the key cuts the bot off and the utterance's final is judged as speech
   over the bot: a real interruption is an input, a backchannel or noise is not.
6. The end: a final mark after the last audio; its echo -> :class:`HangUp` (or
   :class:`Transfer` when a response item asked for one). The carrier's ``stop`` (the
   caller hung up) or a lost connection (:meth:`CarrierCall.connection_lost`: the
   socket closed or failed without a ``stop``) ends the session (:class:`EndSession`)
   unless the core ended it; an input of the caller's still waiting then (a key pressed
   just before, while the bot's turn ran or its audio played; keys collected in
   ``collect`` mode; "Inputs that wait" below: each in turn; not ``#silence``,
   ``#fallback`` or ``#machine``, dropped: no words of the caller's, nobody to answer)
   gets its turn first, its output dropped: at
   once, or once the running turn finished (:meth:`CarrierCall.turn_finished`; not when
   that turn ended the session: :class:`InputsUnanswered` says so; nor once the
   runner's EndSession waits no longer, :meth:`CarrierCall.drop_waiting`). The turn
   running at the end is likewise discarded: it finishes and is saved, but nothing of it
   is played, marked or spoken (no error text) after the stream ended.
7. A transfer [transferring] the carrier refused (or could not be asked for) is not
   the end: :meth:`CarrierCall.transfer_finished` gives the core the input
   :data:`TRANSFER_FAILED` (attributes ``target``, ``reason``, ``error``) on the
   bot's floor, and the call goes on in the same session; a transfer that happened
   ends the session (unless the core ended it already). The core's transfer stands once
   its turn asked for it, as a session it ended does, whether the caller cut the turn
   off (barge-in) before or after its transfer item came (not a race with the
   synthesis of the announcement), but not once the caller hung up (its item before or
   after the hang-up: the caller's inputs waiting still reach the core), nor when an
   answering machine was detected before the turn finished (``#machine`` is the next
   input, its item taken or still to come: the callee is no person; detected after, the
   transfer goes on, the speech kept for it is the machine's: dropped, no more heard, and
   a refusal gives ``#machine`` after :data:`TRANSFER_FAILED` and the keys). The caller's
   words and keys over the announcement wait for the transfer's result: the inputs waiting
   when its turn finishes (keys held or being collected then are inputs of their own, as
   at a hang-up; ``#silence`` and ``#fallback`` dropped), and the words and keys after it,
   in ENDING and TRANSFERRING (collected as any; the bounds of "Inputs that wait"). The
   caller's audio is still fed to the speech stage then (audio time goes on): the
   utterance being heard when the turn finishes is heard out, and speech begun after it
   (lasting ``barge_in_min_speech_ms``) opens an utterance
   (:meth:`CarrierCall._heard_after_turn`): its words wait likewise, the keys pressed
   during it after them. Speech over the bot's audio (held or judged when the turn
   finished, or begun while the announcement's rest plays, ENDING) counts only as a real
   interruption (a backchannel is no input); the announcement's rest is said all the same
   (no barge-in once its turn finished). A transfer that happened (the carrier took it)
   drops them, and cancels the utterance being heard: the person the call goes to hears
   the caller, nobody would answer them here; said in one :class:`InputsUnanswered` (the
   runner logs it at DEBUG). The stream's end once the carrier was asked, before its
   answer, drops them too (nobody could be answered on it), said with the reason
   ``"stream stopped"`` (the carrier's ``stop``: its transfer ends the stream, but so does
   the caller hanging up, and the carrier may then refuse the transfer) or ``"stream
   closed"`` (lost without a ``stop``): whether the carrier took the transfer is not known
   then (the runner's transfer logs its answer on its own), so the log does not say the
   call was transferred.
   A refused one gives the core :data:`TRANSFER_FAILED` first (it learns it is still in
   charge; it carries the cut-off announcement's :data:`~gateway.events.HEARD` attributes,
   the input after the interruption), then each of them its turn in the order said: the
   caller is still on the line. An utterance still awaiting its final then is one of them,
   its words waiting once recognised (the bot's floor waits for them; speech after it is
   speech over the bot, heard at that final); speech going on at the refusal is speech
   over the bot from its onset, held and judged as any (a real interruption cuts off the
   answer to :data:`TRANSFER_FAILED`, its words the input after it; keys pressed during
   it are keys over the paused bot, step 5: they cut it off and come after its words). A
   hang-up before the carrier was asked (ENDING) means no transfer: they reach the core
   as at any hang-up (step 6; the utterance being heard is cancelled, as at any hang-up).

   The core's farewell (a turn that ended the session) likewise: the caller's inputs
   waiting when it finishes (or when it finishes after a hang-up), the utterance being
   heard then (cancelled), and keys pressed while its last audio plays (said at the
   hang-up or the stream's end, not per key), get no turn, said in
   :class:`InputsUnanswered` (``"session ended"``). Speech begun while its last audio
   plays is not recognised (nobody would answer it; only the speech stage's VAD runs),
   but counted there (``utterances``).
8. Moving (a gateway instance shutting down hands its calls to another:
   :meth:`CarrierCall.move`): no turn starts any more, and the stream's end leaves the
   session open (no EndSession, an input waiting is dropped); the call's next stream, started
   with the parameter :data:`RESUMED` ``"1"``, continues the session: no ``#intro``,
   the caller's floor.

**Inputs that wait.** An input made while a turn runs (the interrupted one finishing,
or the answer's) or its audio plays waits for the bot's floor (:meth:`CarrierCall._wait`,
:attr:`CarrierCall.waiting`); none is replaced by a later one, so everything the caller
said reaches the core:

- the caller's words said while their words before wait (the interrupted turn has not
  finished: "Book a table for two" ... "at seven", the second a real interruption over
  the silent bot) are **joined** into that input, in the order said with a space
  between: the core hears "Book a table for two at seven" as one input (with the
  interruption's :data:`~gateway.events.HEARD` attributes of the first). Past
  :data:`MAX_JOINED_CHARS` the oldest words are dropped (never the newest utterance),
  and past :data:`MAX_WAITING_INPUTS` inputs the oldest input: the
  :class:`InputsDropped` action, logged by the runner;
- keys (DTMF) are **an input of their own**: the core reads a key's text as a key (a
  menu choice, ``"5"``; keys collected in ``collect`` mode, ``"1234"``), which joined
  to words, or keys to keys, would change it. Each waits its turn in the order pressed
  (the keys pressed ahead of a menu reach it one by one), and words said after them
  wait after them: keys still being collected in ``collect`` mode (no ``#`` or pause
  yet) when words after them are taken are an input then, before the words, as the
  pause would have made them; when the pause ends while the caller speaks, the keys are
  an input then and the utterance is heard out, its words the input after them (the
  keys' turn starts once it is over: the bot does not answer over the caller). Keys
  pressed while the caller speaks come after the utterance's words (the words began
  first): held until its result, then each an input of its own after them (at most
  :data:`MAX_WAITING_INPUTS` held; keys pressed while the caller speaks again after the
  utterance ended, before its final, come after that next speech's words, a key over
  the bot cutting it off as below); keys begun then and still being collected at its
  final are not cut short: the words wait on the caller's floor until ``#`` or the
  pause, then the words' turn, the keys after it. ``#machine`` comes after the keys a
  human pressed (waiting, held or being collected, in that order) and drops the words
  waiting (the answering machine's words are not the caller's);
- ``#silence`` and ``#fallback`` (no words came) never wait beside an input: dropped
  when one waits, replaced by the next.

Speech over the bot that is no real interruption (a backchannel) is still no input,
and a turn that started is the core's: speech interrupting it is the input after it, as
before. An input waiting when a key cuts the bot in ``collect`` mode goes when the keys
are done (or at once for ``#`` alone).

**Time is the caller's audio time** (ms of inbound audio received), so timeouts do
not depend on how fast a peer sends.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final, Literal

from gateway.callcodec import (
    CallEvent,
    CarrierCodec,
    CarrierError,
    ChunkingCodec,
    Cleared,
    Connected,
    Digit,
    InvalidStart,
    Media,
    MediaFormat,
    Played,
    Started,
    Stopped,
    UnsupportedMediaFormat,
    WireFrame,
)
from gateway.events import (
    ACTION_PREFIX,
    FALLBACK,
    HEARD,
    INTERRUPTED,
    INTRO,
    SILENCE,
    TRANSFER_FAILED,
    UNHEARD,
    BinaryEvent,
    ErrorEvent,
    Input,
    ResponseEvent,
    ResponseItem,
    ResponseItemEvent,
    TurnEvent,
    is_command,
    transfer_target,
)
from gateway.protocol import Expected, ProtocolError, StateMachine, load_json
from gateway.protocol.actions import (
    CancelListening,
    Close,
    EndSession,
    FeedAudio,
    StartListening,
    StartTurn,
)
from gateway.speech.audio import AudioFormat, Pcm, decode_wav, mulaw_to_pcm
from gateway.speech.endofturn import BACKCHANNELS, content_words
from gateway.speech.types import TtsRequest
from gateway.ssml import loose_text, ssml_to_text
from gateway.turn import TurnContext, TurnRejected

CLOSE_NORMAL: Final = 1000
"""Close code when the call ends."""
CLOSE_UNSUPPORTED: Final = 1003
"""Close code for a media format the gateway cannot take."""
CLOSE_POLICY: Final = 1008
"""Close code for a stream that is not the call its token was issued for (or no start)."""
PREROLL_MS: Final = 300
"""Audio before a voice onset handed to the listener (word beginnings are soft)."""
FINAL_LAG_MS: Final = 2000
"""Audio (ms) the speech stage keeps past the preroll (:attr:`CarrierCall.keep_ms`; 2.45 s
at the defaults, ~40-80 KB a call at 8 kHz): speech begun just after an utterance's final
came, before the engine opened the next utterance, is heard from its onset. Speech
begun before that final (module doc step 4, "Speech begun before a final") is kept
whole by the stage until the next utterance opens, however late the final; this was
its bound before."""
TTS: Final = TtsRequest("audio", "wav")
"""What a call asks of the turn engine before its media format is known: each item's
speech as WAV after it (decoded to PCM, then encoded by the codec)."""
_PCM_RATES: Final[dict[str, int]] = {"mulaw": 8000, "pcm8k": 8000, "pcm16k": 16000}


def speech_request(fmt: MediaFormat | None) -> TtsRequest:
    """What a call on a wire of ``fmt`` asks of the turn engine: speech that streams
    (a chunk per synthesized piece) in a headerless format the codec encodes without
    a second resampling: ``mulaw`` for PCMU at 8 kHz (μ-law -> PCM -> μ-law is exact),
    ``pcm8k`` / ``pcm16k`` (16-bit PCM) for any encoding at 8 / 16 kHz, else WAV (in
    one chunk at the item's end). None (format not known yet): WAV."""
    if fmt is None:
        return TTS
    if fmt.encoding == "PCMU" and fmt.sample_rate == 8000:
        return TtsRequest("audio", "mulaw")
    if fmt.sample_rate == 8000:
        return TtsRequest("audio", "pcm8k")
    if fmt.sample_rate == 16000:
        return TtsRequest("audio", "pcm16k")
    return TTS


_MARK_END: Final = "end"
MACHINE: Final = "#machine"
"""The input of an answering-machine answer (:meth:`CarrierCall.machine_answered`)."""
RESUMED: Final = "resumed"
"""The stream parameter (value ``"1"``) of a call moved here from an instance that shut
down (gateway/io/call.py ``move_calls``; Twilio's ``<Parameter>``, Plivo's
``extraHeaders``, Telnyx's stream URL; README "Shutdown"): its start continues the call's
session, no ``#intro``: the caller has the floor (:meth:`CarrierCall.move`)."""
MAX_ATTRIBUTES_CHARS: Final = 4000
"""Longest JSON ``attributes`` parameter of an outbound call that is read."""
KEPT_ERRORS: Final = 20
"""How many of the errors a carrier reported a call keeps (:attr:`CarrierCall.errors`)."""
MAX_JOINED_CHARS: Final = 2000
"""Longest input that the caller's speech waiting for the bot's floor is joined into
(module doc, "Inputs that wait"): past it the oldest words are dropped
(:class:`InputsDropped`), never the newest utterance (one utterance is bounded by the
speech stage, GATEWAY_MAX_AUDIO_S). About two minutes of speech."""
MAX_WAITING_INPUTS: Final = 16
"""Most inputs that wait at once (speech joined counts as one; keys pressed ahead are
each their own): past it the oldest is dropped (:class:`InputsDropped`)."""
_NO_WORDS: Final = frozenset({SILENCE, FALLBACK})
"""Inputs saying that no words came: they never wait beside the caller's words."""
_NOT_THE_CALLER: Final = _NO_WORDS | {MACHINE}
"""Inputs waiting that carry none of the caller's words or keys: dropped when the caller
hangs up (:meth:`CarrierCall._last_input`): nobody is left to answer."""


# ------------------------------------------------------------------ state machine


class State(StrEnum):
    """Where a call is."""

    AWAIT_CONNECTED = "await-connected"
    """The socket is open; nothing received yet."""
    AWAIT_START = "await-start"
    """``connected`` came; ``start`` (the call's metadata) has not."""
    BOT = "bot"
    """The bot has the floor: a turn runs and/or its audio plays (marks pending)."""
    CALLER = "caller"
    """The caller has the floor: waiting for speech, a key or the silence timeout."""
    HOLDING = "holding"
    """The caller speaks over the bot: its audio is paused while the utterance is
    recognised (a backchannel resumes it, a real interruption clears it)."""
    HEARING = "hearing"
    """The caller speaks: a listener recognises the utterance."""
    ENDING = "ending"
    """The session ended: the last audio plays; the final mark is awaited."""
    TRANSFERRING = "transferring"
    """The audio before a transfer item played: the carrier is asked to hand the call over."""
    CLOSED = "closed"
    """Hung up, stopped or disconnected."""


# Events besides the inbound messages (connected, start, media, dtmf, mark, stop):
INPUT = "input"  # an input is committed: it becomes the next turn
INTERRUPT = "interrupt"  # a key interrupted the bot (collect mode: more keys to come)
BARGE_IN = "barge-in"  # the caller's speech interrupted the bot
HOLD = "hold"  # the caller's speech over the bot: its audio pauses until it is judged
RESUME = "resume"  # that speech was a backchannel or noise: the bot's audio goes on
SPEECH = "speech"  # a voice onset on the caller's floor
NOISE = "noise"  # the utterance held no words and nothing is to be answered
FLOOR = "floor"  # the bot's turn is over and its audio played
SESSION_END = "session-end"  # a Response ended the session
FINAL_MARK = "final-mark"  # the final mark came back (or its wait ran out)
DISCONNECT = "disconnect"  # the socket is gone
TRANSFER = "transfer"  # the final mark of a transfer came back: the carrier is asked
TRANSFERRED = "transferred"  # the carrier took the transfer
TRANSFER_REFUSED = "transfer-refused"  # it did not: the call goes on, the bot's floor
INBOUND: Final = ("connected", "start", "media", "dtmf", "mark", "stop")


def _build_transitions() -> dict[tuple[State, str], State]:
    s = State
    table: dict[tuple[State, str], State] = {
        (s.AWAIT_CONNECTED, "connected"): s.AWAIT_START,
        (s.AWAIT_CONNECTED, "start"): s.BOT,  # a missing `connected` carries nothing we need
        (s.AWAIT_START, "start"): s.BOT,
        # the bot's floor
        (s.BOT, INPUT): s.BOT,  # a waiting input starts its turn
        (s.BOT, INTERRUPT): s.CALLER,
        (s.BOT, BARGE_IN): s.HEARING,
        (s.BOT, HOLD): s.HOLDING,
        # the caller speaks over the paused bot
        (s.HOLDING, BARGE_IN): s.HEARING,
        (s.HOLDING, RESUME): s.BOT,
        (s.HOLDING, INTERRUPT): s.CALLER,  # a key
        (s.HOLDING, INPUT): s.BOT,  # an answering machine
        (s.HOLDING, SESSION_END): s.ENDING,
        (s.BOT, FLOOR): s.CALLER,
        (s.BOT, SESSION_END): s.ENDING,
        # the caller's floor
        (s.CALLER, SPEECH): s.HEARING,
        (s.CALLER, INPUT): s.BOT,
        (s.CALLER, SESSION_END): s.ENDING,  # an interrupted turn ended the session
        (s.HEARING, INPUT): s.BOT,
        (s.HEARING, NOISE): s.CALLER,
        (s.HEARING, SESSION_END): s.ENDING,
        # the end
        (s.ENDING, FINAL_MARK): s.CLOSED,
        (s.ENDING, TRANSFER): s.TRANSFERRING,
        (s.TRANSFERRING, TRANSFERRED): s.CLOSED,
        (s.TRANSFERRING, TRANSFER_REFUSED): s.BOT,
    }
    for state in (s.BOT, s.HOLDING, s.CALLER, s.HEARING, s.ENDING, s.TRANSFERRING):
        for event in ("media", "dtmf", "mark"):
            table[(state, event)] = state
    for state in s:
        table[(state, "stop")] = s.CLOSED
        table[(state, DISCONNECT)] = s.CLOSED
    for event in INBOUND:  # late frames after the end are ignored
        table[(s.CLOSED, event)] = s.CLOSED
    return table


TRANSITIONS: dict[tuple[State, str], State] = _build_transitions()
"""(state, event) -> next state for everything that may happen to a call.

Events are the inbound messages (``connected``, ``start``, ``media``, ``dtmf``,
``mark``, ``stop``) and the call's own (``input``, ``interrupt``, ``barge-in``,
``hold``, ``resume``, ``speech``, ``noise``, ``floor``, ``session-end``, ``final-mark``,
``transfer``, ``transferred``, ``transfer-refused``, ``disconnect``).
Anything else is a ProtocolError (e.g. ``media`` before ``start``).
"""

_FRAMES = "media, dtmf, mark or stop"
_EXPECTED: dict[State, Expected] = {
    state: Expected(f"Unexpected event in state {state}", expected)
    for state, expected in (
        (State.AWAIT_CONNECTED, "connected or start"),
        (State.AWAIT_START, "start"),
        (State.BOT, _FRAMES),
        (State.HOLDING, _FRAMES),
        (State.CALLER, _FRAMES),
        (State.HEARING, _FRAMES),
        (State.ENDING, _FRAMES),
        (State.TRANSFERRING, _FRAMES),
        (State.CLOSED, "nothing more"),
    )
}


class CallStateMachine(StateMachine[State, str]):
    """The order of events of one call, checked against :data:`TRANSITIONS` (the kit's
    StateMachine): inbound messages are fed (RemoteProtocolError), the call's own
    events advance it (LocalProtocolError)."""

    def __init__(self) -> None:
        super().__init__(TRANSITIONS, State.AWAIT_CONNECTED, _EXPECTED)


# ------------------------------------------------------------------ DTMF


DtmfMode = Literal["digit", "collect"]
MAX_DTMF_DIGITS: Final = 64
"""``collect`` mode: the most keys one input collects; the key that reaches it ends the
input as ``#`` would (it is included). A stream sending endless keys without ``#`` or a
pause (time is the caller's audio: a stream that sends none never pauses) does not grow
the call, and the core gets inputs of at most this many characters."""


class DtmfCollector:
    """Key presses -> input text.

    ``digit`` mode: every key is an input of its own. ``collect`` mode: keys
    accumulate until ``#`` (which ends them and is not included), until
    ``timeout_ms`` of audio pass after the last key, or until ``max_digits``
    (:data:`MAX_DTMF_DIGITS`) are collected. ``#`` alone is no input.
    Times are audio ms (see the module doc).
    """

    def __init__(self, mode: DtmfMode, timeout_ms: int, max_digits: int = MAX_DTMF_DIGITS) -> None:
        self.mode = mode
        self.timeout_ms = timeout_ms
        self.max_digits = max_digits
        self._digits = ""
        self._last_ms = 0

    @property
    def collecting(self) -> bool:
        """Whether keys are waiting for ``#`` or the pause."""
        return bool(self._digits)

    def press(self, digit: str, now_ms: int) -> str | None:
        """Take one key at audio time ``now_ms``; the finished input, if any."""
        if self.mode == "digit":
            return digit
        if digit == "#":
            return self.flush()
        self._digits += digit
        self._last_ms = now_ms
        return self.flush() if len(self._digits) >= self.max_digits else None

    def poll(self, now_ms: int) -> str | None:
        """The collected keys once ``timeout_ms`` passed since the last one, else None."""
        if self._digits and now_ms - self._last_ms >= self.timeout_ms:
            return self.flush()
        return None

    def reset(self) -> None:
        """Forget keys collected so far."""
        self._digits = ""

    def flush(self) -> str | None:
        """The keys collected so far, forgotten: the call ended before ``#``, the pause or
        ``max_digits`` (they are the caller's input all the same, as Twilio's
        ``<Gather>`` submits the digits typed before a hang-up); None when none."""
        done, self._digits = self._digits, ""
        return done or None


# ------------------------------------------------------------------ marks


class MarkBook:
    """The marks sent and not yet echoed, in order (spec: outbound ``mark``).

    Twilio plays audio in order and echoes each mark when the audio before it
    has played, so an echo settles its mark and every mark before it. After
    ``clear`` Twilio echoes every pending mark: :meth:`forget` drops them first,
    and their late echoes are unknown names, ignored. Names are ``<n>`` for
    response items and ``end-<n>`` for the final mark.
    """

    def __init__(self) -> None:
        self._pending: OrderedDict[str, bool] = OrderedDict()  # name -> final
        self._count = 0

    @property
    def outstanding(self) -> int:
        """Marks sent and not echoed: > 0 while the bot's audio plays."""
        return len(self._pending)

    def new(self, *, final: bool = False) -> str:
        """Name and register the next mark."""
        self._count += 1
        name = f"{_MARK_END}-{self._count}" if final else str(self._count)
        self._pending[name] = final
        return name

    def echo(self, name: str) -> bool | None:
        """Settle ``name`` and the marks before it; whether it was the final mark, or None
        for a name not pending (already settled, or forgotten at a clear)."""
        if name not in self._pending:
            return None
        while self._pending:
            settled, final = self._pending.popitem(last=False)
            if settled == name:
                return final
        return None  # pragma: no cover - name was in the dict

    def forget(self) -> None:
        """Drop every pending mark (the audio was cleared)."""
        self._pending.clear()


SPEECH_MS_PER_CHAR: Final = 60
"""Audio ms per character of an item's text, assumed by :class:`Playout` for an item
whose audio is still coming until the call's complete items tell their own rate (Piper's
joe voice: 51-65 ms per character in sentences, up to 90 in short ones with numbers)."""

_RATE_MIN_CHARS: Final = 40
"""Characters of complete items :class:`Playout` needs before it uses their rate."""


@dataclass
class _Spoken:
    """One response item's speech: its text, its audio queued and played (ms), and whether
    all of its audio was queued (``done``)."""

    text: str
    total_ms: int = 0
    played_ms: int = 0
    done: bool = False


@dataclass
class _Chunk:
    """One Play of an item's audio: its mark, item, length and when it was queued (audio ms)."""

    mark: str
    item: _Spoken
    audio_ms: int
    queued_ms: int


class Playout:
    """What of the bot's speech the caller has heard, from the marks (issue 16).

    Each response item with speech is announced (:meth:`item`), then each Play of its
    audio (streamed speech: several) is :meth:`queued`; a mark's echo (:meth:`echoed`)
    says that audio and everything before it played out. :meth:`cut` at an interruption
    splits the turn's speech into heard and unheard text: per item, the whole words of
    the share of its characters its played audio covers (all of it when every chunk's
    mark came back). The chunk playing at the cut is estimated: it started when it was
    queued or when the mark before it came back, whichever is later. Times are the
    call's audio time (ms). An item still being synthesized (streamed speech: its first
    piece may be a short first clause, "Okay," of "Okay, done.") is taken to last at
    least its characters at the call's speaking rate (that of its complete items, else
    :data:`SPEECH_MS_PER_CHAR`), so the share of its text heard is not that of the
    audio so far; an item is complete once the next is announced or :meth:`done`.
    """

    def __init__(self) -> None:
        self._items: list[_Spoken] = []
        self._chunks: deque[_Chunk] = deque()
        self._since_ms = 0
        self._rate_chars = 0
        self._rate_ms = 0

    def reset(self) -> None:
        """Forget the turn's speech (a new turn); the speaking rate learnt is kept."""
        self._items = []
        self._chunks.clear()

    def item(self, text: str) -> None:
        """A response item whose speech (``text``) comes next; the one before is complete."""
        self.done()
        self._items.append(_Spoken(text))

    def done(self) -> None:
        """All of the announced items' audio was queued (the turn's Response came)."""
        for item in self._items:
            if not item.done:
                item.done = True
                if item.text and item.total_ms:
                    self._rate_chars += len(item.text)
                    self._rate_ms += item.total_ms

    def _expected_ms(self, item: _Spoken) -> int:
        """The audio ``item`` has, or will have when it is still coming (class doc)."""
        if item.done:
            return item.total_ms
        rate = (
            self._rate_ms / self._rate_chars
            if self._rate_chars >= _RATE_MIN_CHARS
            else SPEECH_MS_PER_CHAR
        )
        return max(item.total_ms, round(len(item.text) * rate))

    def queued(self, mark: str, audio_ms: int, now_ms: int) -> None:
        """A Play of ``audio_ms`` of the latest item's speech, marked ``mark``, queued at
        ``now_ms``."""
        if not self._items:
            self._items.append(_Spoken(""))
        item = self._items[-1]
        item.total_ms += audio_ms
        self._chunks.append(_Chunk(mark, item, audio_ms, now_ms))

    def queued_more(self, audio_ms: int) -> None:
        """``audio_ms`` more of the latest Play's audio, sent after its mark (a tail the
        codec held back, :meth:`CarrierCall._flush`); nothing when no Play waits for
        its mark (its audio was all heard: so is this)."""
        if self._chunks:
            chunk = self._chunks[-1]
            chunk.audio_ms += audio_ms
            chunk.item.total_ms += audio_ms

    def echoed(self, mark: str, now_ms: int) -> None:
        """``mark`` came back at ``now_ms``: its audio and all before it were heard."""
        if all(chunk.mark != mark for chunk in self._chunks):
            return
        while self._chunks:
            chunk = self._chunks.popleft()
            chunk.item.played_ms += chunk.audio_ms
            if chunk.mark == mark:
                break
        self._since_ms = now_ms

    def paused(self, pause_ms: int) -> None:
        """The audio was paused for ``pause_ms`` and resumed: what plays started that much later."""
        self._since_ms += pause_ms
        for chunk in self._chunks:
            chunk.queued_ms += pause_ms

    def cut(self, at_ms: int, unsent_ms: int = 0) -> tuple[str, str]:
        """``(heard, unheard)`` text when the audio stopped at ``at_ms``; then forgets all.
        ``unsent_ms``: the last ms of the speech queued never went out (a
        :class:`~gateway.callcodec.ChunkingCodec` held them back, the clear dropped them):
        none of them was heard, whatever the marks or the time say (a piece held back
        whole has its mark sent before its audio)."""
        if self._chunks:
            head = self._chunks[0]
            start = max(head.queued_ms, self._since_ms)
            head.item.played_ms += min(max(at_ms - start, 0), head.audio_ms)
        if unsent_ms > 0:  # the latest speech first: it is what was held back
            sent_ms = sum(item.total_ms for item in self._items) - unsent_ms
            excess = sum(item.played_ms for item in self._items) - max(sent_ms, 0)
            for item in reversed(self._items):
                if excess <= 0:
                    break
                less = min(item.played_ms, excess)
                item.played_ms -= less
                excess -= less
        heard: list[str] = []
        unheard: list[str] = []
        for item in self._items:
            if not item.text:
                continue
            total_ms = self._expected_ms(item)
            share = min(item.played_ms / total_ms, 1.0) if total_ms else 0.0
            said, rest = _split_words(item.text, share)
            heard += [said] if said else []
            unheard += [rest] if rest else []
        self.reset()
        return " ".join(heard), " ".join(unheard)


def spoken_words(item: ResponseItem) -> str:
    """The words of ``item`` the caller hears, as :class:`Playout` counts them (issue 16):
    its text (stripped) or, when it has none, the words of its ``ssml`` (the speech says
    its SSML: :func:`gateway.ssml.ssml_to_text`, or :func:`gateway.ssml.loose_text` for
    SSML that is not well-formed, as :func:`gateway.ssml.display_text` shows them); ``""``
    for a command item (:func:`gateway.events.is_command`: no speech) or one with neither.
    Never raises. Before, an item with ``ssml`` and no text counted as ``""``: its words
    were in neither ``heard`` nor ``unheard`` after an interruption."""
    if is_command(item):
        return ""
    text = (item.text or "").strip()
    if text or not item.ssml:
        return text
    words = ssml_to_text(item.ssml)
    return loose_text(item.ssml) if words is None else words


def _join(older: str, newer: str, max_chars: int) -> tuple[str, int]:
    """``older`` and ``newer`` (the caller's words waiting, and the words said next) as
    one input, a space between, and how many characters were dropped: past ``max_chars``
    characters the oldest whole words of ``older`` go first, all of it if need be
    (``newer`` is kept whole, however long)."""
    joined = f"{older} {newer}"
    excess = len(joined) - max_chars
    if excess <= 0:
        return joined, 0
    # dropping older[:cut] and the space after it leaves len(joined) - cut - 1 characters
    cut = older.find(" ", max(excess - 1, 0))
    kept = newer if cut < 0 else f"{older[cut + 1 :].lstrip()} {newer}"
    return kept, len(joined) - len(kept)


def _split_words(text: str, fraction: float) -> tuple[str, str]:
    """``text`` split after the last whole word within its first ``fraction`` of characters."""
    cut = round(len(text) * fraction)
    if cut >= len(text):
        return text, ""
    if cut > 0 and text[cut].isspace():
        head = text[:cut]
    else:
        head = text[:cut].rsplit(None, 1)[0] if " " in text[:cut].strip() else ""
    return head.strip(), text[len(head) :].strip()


# ------------------------------------------------------------------ actions


@dataclass(frozen=True)
class Play:
    """Queue ``messages`` (the codec's audio frames, paced when it is real-time), then
    ``mark``. ``final`` marks the last audio of the call: hang up when its mark comes
    back. ``audio_ms`` is the audio in ``messages`` (padding included); with a
    :class:`~gateway.callcodec.ChunkingCodec`, the piece's own, what of it the codec held
    back sent with the next Play or :class:`PlayTail`."""

    messages: tuple[WireFrame, ...]
    mark: WireFrame
    audio_ms: int
    final: bool = False


@dataclass(frozen=True)
class PlayTail:
    """Queue ``messages`` after the turn's last :class:`Play`, without a mark: the tail of
    the turn's audio a :class:`~gateway.callcodec.ChunkingCodec` held back, padded
    (:meth:`CarrierCall._flush`; the mark before it stands for it). ``audio_ms`` is its
    padding: the speech in ``messages`` was counted with the Plays of its pieces."""

    messages: tuple[WireFrame, ...]
    audio_ms: int


@dataclass(frozen=True)
class Interrupt:
    """Drop the audio not yet sent and send ``clear`` (the codec's) at once: barge-in."""

    clear: WireFrame


@dataclass(frozen=True)
class PausePlayback:
    """Send no more of the bot's audio for now (queued audio and marks wait): the caller
    speaks over the bot. The carrier plays out only what it already holds (at most the
    sender's send-ahead, GATEWAY_TWILIO_SEND_AHEAD_MS), so for the caller the bot falls
    silent within that much of the pause."""


@dataclass(frozen=True)
class ResumePlayback:
    """Send the bot's audio again from where it paused: the speech over it was a
    backchannel, a filler or noise (nothing is lost)."""


@dataclass(frozen=True)
class Speak:
    """Synthesize ``text`` (WAV) and hand it to :meth:`CarrierCall.spoken`."""

    text: str


@dataclass(frozen=True)
class InputsDropped:
    """Inputs waiting for the bot's floor outgrew their bounds and the oldest part was
    dropped (module doc, "Inputs that wait"): ``chars`` characters of the oldest words of
    the joined speech (:data:`MAX_JOINED_CHARS`), ``inputs`` whole waiting inputs
    (:data:`MAX_WAITING_INPUTS`). The runner logs it (WARNING); nothing else changes."""

    chars: int = 0
    inputs: int = 0


UnansweredReason = Literal["transfer", "stream stopped", "stream closed", "session ended"]
"""Why the caller's inputs get no turn (:class:`InputsUnanswered`)."""


@dataclass(frozen=True)
class InputsUnanswered:
    """The caller's inputs get no turn (module doc, step 7): ``inputs`` of theirs (words,
    keys; waiting, held or being collected) are dropped, and the utterance being heard
    (``listening``) is cancelled; ``utterances``: speeches the caller began once the
    farewell's turn finished, not recognised (nobody would answer them), counted.
    ``reason`` ``"transfer"``: the inputs (and the utterance being heard) kept for the
    transfer's result once it happened (the carrier took it); ``"stream stopped"``: the
    carrier's ``stop`` ended the stream while the carrier was asked, before its answer
    (its transfer ends the stream, but so does the caller hanging up, after which it may
    refuse the transfer), ``"stream closed"``: the stream was lost (no ``stop``) then;
    either way its result is not known then (it is logged on its own);
    ``"session ended"``: the turn that ended the session finished (on the line or after
    a hang-up), or the call hung up after its farewell with keys pressed or speech
    meanwhile. The core decided: the call is handed over (the person it goes to hears
    the caller) or ended, so nobody would answer them. The runner logs it (DEBUG);
    nothing else changes."""

    reason: UnansweredReason
    inputs: int = 0
    listening: bool = False
    utterances: int = 0


@dataclass(frozen=True)
class HangUp:
    """End the call ``call_id``: the carrier's REST hang-up, or close the stream."""

    call_id: str


@dataclass(frozen=True)
class Transfer:
    """Hand the call to ``target`` (E.164 number or SIP URI) once the audio before the
    transfer item has played; ``reason`` for the record."""

    call_id: str
    target: str
    reason: str | None = None


CallAction = (
    Play
    | PlayTail
    | Interrupt
    | PausePlayback
    | ResumePlayback
    | StartTurn
    | StartListening
    | FeedAudio
    | CancelListening
    | Speak
    | InputsDropped
    | InputsUnanswered
    | HangUp
    | Transfer
    | EndSession
    | Close
)
"""The engine's own actions (Play, Interrupt, PausePlayback, ResumePlayback, Speak,
InputsDropped, InputsUnanswered, HangUp, Transfer) and the kit's."""


# ------------------------------------------------------------------ the call


@dataclass(frozen=True)
class CallConfig:
    """How calls behave (from Settings, see gateway/settings.py "Twilio" and "Speech").

    ``channel`` names the carrier (session keys are ``<channel>:<call id>``).

    ``key_allowed`` decides whether an application key may open sessions;
    ``default_app_key`` is used when the stream's ``appKey`` parameter is missing.
    Times are ms of audio. ``vad_min_speech_ms`` (the speech stage's) sizes the audio
    kept for a StartListening's ``from_ms``. ``error_text`` is said when a turn fails.

    Barge-in (module doc, step 4): speech over the bot lasting ``barge_in_min_speech_ms``
    pauses it (a carrier that cannot be paused plays on) while it is judged. It is a
    real interruption when its voiced part lasts
    ``barge_in_max_backchannel_ms`` (0: every such speech interrupts at once, the
    behaviour before issue 16), when an interim transcript holds two content words
    (:func:`~gateway.speech.endofturn.content_words`: not in ``barge_in_backchannels``,
    no filler or hum, no function word), or when the final one holds one with a
    confidence of at least ``barge_in_min_confidence`` (what a recognizer makes of a hum
    or a cough is function words or low-confidence guesses). Otherwise the bot's audio
    resumes once the caller has been quiet for ``barge_in_resume_ms`` (when the interim
    transcript has no content word so far and the endpointer has not ended the speech
    yet; else at the final); a final that turns out to hold an interruption still
    interrupts then.
    """

    key_allowed: Callable[[str | None], bool]
    channel: str = "twilio"
    default_app_key: str = "twilio"
    barge_in: bool = True
    barge_in_min_speech_ms: int = 150
    barge_in_backchannels: tuple[str, ...] = BACKCHANNELS
    barge_in_max_backchannel_ms: int = 1000
    barge_in_resume_ms: int = 300
    barge_in_min_confidence: float = 0.3
    dtmf_mode: DtmfMode = "digit"
    dtmf_timeout_ms: int = 2000
    frame_ms: int = 20
    silence_timeout_ms: int = 5000
    vad_min_speech_ms: int = 150
    error_text: str = "Sorry, something went wrong. Please try again."


@dataclass
class _Turn:
    """The turn of this call that is running."""

    discarded: bool = False  # interrupted: its output is dropped
    ended: bool = False  # its Response ended the session
    transfer: bool = False  # it holds a transfer item: the call is handed over after its audio
    failed: bool = False  # it gave an ErrorEvent (said as error_text)
    machine: bool = False  # an answering machine cut it off (#machine): no transfer of it


@dataclass
class CallInfo:
    """What the start said about the call: the carrier's ids and parameters."""

    stream_id: str
    call_id: str
    account_id: str
    parameters: dict[str, str] = field(default_factory=dict)


class CarrierCall:
    """One phone call's stream on any carrier, sans I/O (see the module doc).

    ``codec`` is the carrier's wire (:class:`~gateway.callcodec.CarrierCodec`);
    ``call_id`` the call the stream was admitted for (None: the carrier's start names
    it and it is taken as is); ``config`` the behaviour. Feed it :meth:`receive`
    (frames), :meth:`voice` (the speech stage's verdicts), :meth:`heard` /
    :meth:`listener_failed`, :meth:`turn_event` / :meth:`turn_rejected` /
    :meth:`turn_finished`, :meth:`spoken`, :meth:`final_mark_overdue`,
    :meth:`machine_answered` and :meth:`connection_lost`; each returns the
    :data:`CallAction` s to carry out, in order.
    """

    tts: TtsRequest = TTS
    """What the call asks of the turn engine for speech: set at the start from the
    codec's outbound format (:meth:`speech_request`; a carrier may take its own
    encoding as is, see :meth:`_frames`)."""
    stream_config_key = "streamId"
    """The session config key naming the stream's id."""
    other_call_reason = "The stream was admitted for another call."
    """The Close reason for a start naming another call than the admitted one."""

    def __init__(self, codec: CarrierCodec, call_id: str | None, config: CallConfig) -> None:
        self.codec = codec
        self.expected_call_id = call_id
        self.config = config
        self.machine = CallStateMachine()
        self.info: CallInfo | None = None
        self.ctx: TurnContext | None = None
        self.marks = MarkBook()
        self.dtmf = DtmfCollector(config.dtmf_mode, config.dtmf_timeout_ms)
        self.received = 0
        """Samples of the caller's audio received (audio time, see the module doc)."""
        self.rate = 8000
        """The inbound sample rate (Hz), known at the start."""
        self.onset_ms: int | None = None
        """Audio time the caller's current speech began, as the speech stage last said."""
        self.turn: _Turn | None = None
        self._waiting: deque[tuple[str, bool]] = deque()
        """Inputs waiting for the running turn to end (or the bot's audio to play out), in
        the order said: ``(text, speech)``; speech said while one waits is joined into it
        (:meth:`_wait`, module doc "Inputs that wait")."""
        self.session_started = False
        self.session_over = False
        self.stopped = False
        """Whether the carrier stopped the stream (nothing more comes)."""
        self.disconnected = False
        """Whether the stream is gone without the carrier's stop (:meth:`connection_lost`:
        the socket closed or failed, or the call was torn down; nothing more comes)."""
        self.errors: deque[CarrierError] = deque(maxlen=KEPT_ERRORS)
        """The latest errors the carrier reported (the call goes on), at most
        :data:`KEPT_ERRORS`: a carrier repeating one does not grow the call."""
        self.error_count = 0
        """How many errors the carrier reported (the runner logs each new one)."""
        self._silence_at: int | None = None
        self._bot_since = 0
        self._interrupted = False
        self._streams = itertools.count(1)
        self.stream = 0
        """The number of the latest utterance (StartListening.stream)."""
        self.transfer: tuple[str, str | None] | None = None
        """``(target, reason)`` of the turn's transfer item: carried out at the final mark."""
        self.answered_by: str | None = None
        """Who answered an outbound call (``human``, ``machine``...), when known."""
        self.machine_heard: str | None = None
        """The answering-machine result (:meth:`machine_answered`) the call has taken (in
        the ``#intro`` attributes or as ``#machine``), None before one; later results of
        the call (a carrier's redelivery of its webhook) are ignored."""
        self._input_attributes: dict[str, dict[str, Any]] = {}
        self.playout = Playout()
        """What of the bot's speech the caller heard (from the marks)."""
        self._held_ms = 0
        """The ms of speech a :class:`~gateway.callcodec.ChunkingCodec` holds back, already
        counted with the Plays of their pieces (:meth:`_frames`, :meth:`_flush`)."""
        self.interruption: dict[str, Any] | None = None
        """The attributes of the input after an interruption (:data:`~gateway.events.HEARD`):
        set when the bot is cut off, given to the next turn's input."""
        self.voiced_ms = 0
        """How long the caller's current speech has been voiced (the speech stage's)."""
        self.partial = ""
        """The latest interim transcript of the utterance being heard."""
        self.heard_to_ms: int | None = None
        """Stream time (ms) up to which the utterance's audio has been recognised, so
        :attr:`partial` covers the speech up to there (None: unknown, taken as now)."""
        self._held_at: int | None = None
        self._heard_end: int | None = None
        """Audio time the endpointer ended the utterance listened to last (None: not yet):
        speech with an onset from then on is the caller's next speech (:meth:`_heard_next`)."""
        self._next_onset: int | None = None
        """The onset (audio ms) of the caller's first speech begun after the utterance
        listened to ended, before its final (None: none yet); from there that speech is
        heard once the final is taken (:meth:`_heard_next`)."""
        self._next_end: int | None = None
        """When such speech ended (the latest one, audio ms; None: none ended): speech
        that began and also ended before the final is heard up to there."""
        self._next_voiced_end: int | None = None
        """The end of the last voiced frame of that ended speech (audio ms)."""
        self._keys_stream: int | None = None
        """The utterance (:attr:`stream`) open when the keys being collected began (digit
        mode: the latest key), None: none was open. Keys begun during an utterance come
        after its words (:meth:`_keys_during`)."""
        self._held_keys: deque[str] = deque()
        """Keys pressed while the caller speaks (an utterance open), done before its
        result came: they wait after its words (:meth:`_release_keys`), in the order
        pressed; at most :data:`MAX_WAITING_INPUTS`."""
        self._next_keys: deque[str] = deque()
        """Keys pressed while the caller speaks again after the utterance heard ended,
        before its final (:attr:`_next_onset`): they come after the words of that next
        speech, held for it once it is heard (:meth:`_heard_next`); at most
        :data:`MAX_WAITING_INPUTS`."""
        self._keys_next = False
        """Whether the keys being collected (``digit`` mode: the latest key) began during
        such next speech."""
        self._key_cut_in = False
        """Whether a key cut the bot off while the utterance heard was speech over it (held
        or judged): its final is judged as such (:meth:`_utterance_result`)."""
        self._judging = False  # resumed early: the utterance's final is still judged
        self._after_open = False
        """Whether an utterance is heard once the turn that asked for a transfer finished
        (ENDING, TRANSFERRING; BOT after a refusal, until its result): its words are kept
        for the transfer's result (:meth:`_heard_after_turn`, module doc step 7)."""
        self._after_judged = False
        """Whether that utterance's words count only as a real interruption: speech over
        the bot's audio (held or judged when the turn finished, or begun while the
        announcement's rest plays, ENDING)."""
        self._listened_onset: int | None = None
        """The onset (audio ms) of the speech the latest utterance was opened for (or the
        latest speech counted after a farewell): not heard twice after the turn."""
        self._unheard_speech = 0
        """Speeches begun once the farewell's turn finished (not recognised: nobody would
        answer them), said in :class:`InputsUnanswered` at the end."""
        self._asked_at = 0
        """Audio time (ms) the carrier was asked for the latest transfer (its final mark
        came back): speech begun before it was over the announcement
        (:meth:`_listen_after_turn`)."""
        self._machine_kept = False
        """Whether an answering machine was detected once a transfer's turn finished: its
        ``#machine`` follows ``#transfer-failed`` at a refusal (:meth:`_machine_over_transfer`)."""
        self._judged: tuple[int, int] | None = None  # (onset, voiced end) when it resumed
        self.extra_parameters: dict[str, str] = {}
        """Parameters the adapter learnt outside the codec's start: the ``appKey`` of the
        stream URL (Telnyx's, the gateway wrote it; Exotel's, from the applet's URL), an
        outbound call's data (Telnyx ``client_state``, the gateway's own). Over the start's
        own: a custom parameter (Telnyx's and Exotel's ``custom_parameters``) is taken only
        for a name these do not give, so it cannot move the call to another application."""
        self.moved = False
        """Whether the call is being handed to another instance (:meth:`move`): the
        stream's end then does not end the session."""

    # -------------------------------------------------------------- queries

    @property
    def state(self) -> State:
        """The state of :attr:`machine`."""
        return self.machine.state

    @property
    def pending(self) -> str | None:
        """The input whose turn starts next (the first of :attr:`waiting`), None when none."""
        return self._waiting[0][0] if self._waiting else None

    @property
    def waiting(self) -> tuple[str, ...]:
        """The inputs waiting for the bot's floor, in the order said (module doc, "Inputs
        that wait"): each a turn of its own, the first :attr:`pending`."""
        return tuple(text for text, _ in self._waiting)

    @property
    def closed(self) -> bool:
        """Whether the call is over."""
        return self.state is State.CLOSED

    @property
    def now_ms(self) -> int:
        """Audio time: ms of the caller's audio received."""
        return self.received * 1000 // self.rate

    @property
    def speech_ms(self) -> int:
        """How long the caller's current speech has lasted (0 when not speaking)."""
        return 0 if self.onset_ms is None else self.now_ms - self.onset_ms

    @property
    def holds(self) -> bool:
        """Whether speech over the bot is judged before it interrupts (module doc step 4):
        with ``barge_in_max_backchannel_ms`` set (0: every such speech interrupts at
        once), on every carrier; whether the bot is also paused meanwhile is
        :attr:`pauses`."""
        return bool(self.config.barge_in_max_backchannel_ms)

    @property
    def pauses(self) -> bool:
        """Whether holding for speech over the bot pauses its audio: a paced codec
        (``realtime``: the carrier holds only the send-ahead). A carrier given the whole
        answer at once (Plivo, Exotel) cannot be paused: its bot plays on while the
        speech is judged, and is cleared once it is a real interruption (a cough or a
        backchannel does not cut it off)."""
        return self.codec.realtime

    @property
    def keep_ms(self) -> int:
        """Audio the speech stage must keep for a StartListening's ``from_ms`` (ms)."""
        cfg = self.config
        return max(cfg.barge_in_min_speech_ms, cfg.vad_min_speech_ms) + PREROLL_MS + FINAL_LAG_MS

    @property
    def listen_format(self) -> AudioFormat:
        """The format of FeedAudio's data: 16-bit PCM at the stream's rate."""
        return AudioFormat("LINEAR16", self.rate)

    # -------------------------------------------------------------- inbound

    def receive(self, frame: WireFrame) -> list[CallAction]:
        """Handle one inbound frame (text or binary) through the codec.

        Raises ProtocolError (the codec's: malformed, unknown, invalid, out of order):
        the state is then unchanged and the frame should be dropped (and logged).
        A start for another call than the admitted one, or for an application key
        not allowed, returns ``[Close(CLOSE_POLICY, ...)]``; one in a media format
        the gateway cannot take (UnsupportedMediaFormat) ``[Close(CLOSE_UNSUPPORTED,
        <the codec's text>)]``, one the codec cannot read (InvalidStart: a field missing,
        empty or invalid) ``[Close(CLOSE_POLICY, <the codec's text>)]``; once the stream
        started, either is raised (a second start).
        """
        codec = self.codec
        try:
            if isinstance(frame, str):
                event = codec.receive_text(frame)
            else:
                event = codec.receive_binary(frame)
        except UnsupportedMediaFormat as exc:
            return self._refuse_start(CLOSE_UNSUPPORTED, exc)
        except InvalidStart as exc:
            return self._refuse_start(CLOSE_POLICY, exc)
        return self.event(event)

    def _refuse_start(self, code: int, exc: ProtocolError) -> list[CallAction]:
        """A start the stream cannot be served with (``exc``: its format, or unreadable):
        ``[Close(code, <exc's text>)]`` before the stream started; raises ``exc`` after
        (a second start)."""
        if not self.machine.allows("start"):
            raise exc
        return self._disconnect(code, exc.text)

    def _disconnect(self, code: int, reason: str) -> list[CallAction]:
        """End the call at its start: ``[Close(code, reason)]``, nothing else."""
        self.machine.advance(DISCONNECT)
        return [Close(code, reason)]

    def event(self, event: CallEvent) -> list[CallAction]:
        """Handle one decoded event (see :meth:`receive`)."""
        if isinstance(event, Media):
            return self._media(event)
        if self.state is State.CLOSED:
            return []
        if isinstance(event, Connected):
            self.machine.feed("connected")
            return []
        if isinstance(event, Started):
            return self._start(event)
        if isinstance(event, Digit):
            self.machine.feed("dtmf")
            return self._dtmf(event.digit)
        if isinstance(event, Played):
            self.machine.feed("mark")
            return self._mark(event.name)
        if isinstance(event, Cleared):
            return []
        if isinstance(event, CarrierError):
            self.errors.append(event)
            self.error_count += 1
            return []
        assert isinstance(event, Stopped)
        was = self.state
        self.machine.feed("stop")
        self.stopped = True
        return self._stream_ended(was)

    def _start(self, info: Started) -> list[CallAction]:
        if not self.machine.allows("start"):
            self.machine.feed("start")  # raises: a second start
        if self.expected_call_id is not None and info.call_id != self.expected_call_id:
            return self._disconnect(CLOSE_POLICY, self.other_call_reason)
        params = {**info.parameters, **self.extra_parameters}
        app_key = params.get("appKey") or self.config.default_app_key
        if not self.config.key_allowed(app_key):
            return self._disconnect(CLOSE_POLICY, "Unknown application key.")
        self.machine.feed("start")
        call_id = info.call_id or self.expected_call_id or info.stream_id
        self.rate = info.media_format.sample_rate
        self.tts = self.speech_request()
        self.info = CallInfo(info.stream_id, call_id, info.account_id, params)
        caller = params.get("from") or info.caller
        callee = params.get("to") or info.callee
        outbound = params.get("direction") == "outbound"
        # the session's device is the person's phone: the callee of a call the gateway
        # placed (its caller is the gateway's own number, the same for every such call)
        person = callee if outbound else caller
        channel = self.config.channel
        self.ctx = TurnContext(
            channel=channel,
            namespace=channel,
            session_id=call_id,
            app_key=app_key,
            device_id=person or None,
            locale=params.get("locale") or None,
            create=True,
            config={
                "from": caller,
                "to": callee,
                self.stream_config_key: info.stream_id,
                **({"direction": "outbound"} if outbound else {}),
            },
            tts=self.tts,
        )
        self._bot_since = self.now_ms
        if params.get(RESUMED) == "1":
            # a call moved from an instance that shut down (move): its session goes on,
            # no #intro; the caller has the floor
            self.session_started = True
            return self._advance()
        if outbound:
            self.answered_by = self.answered_by or params.get("answeredBy") or None
            self._input_attributes[INTRO] = self._outbound_attributes(params)
        return self._start_turn(INTRO)

    def _outbound_attributes(self, params: Mapping[str, str]) -> dict[str, Any]:
        """The ``#intro`` attributes of an outbound call: the request's ``attributes``
        (a JSON object parameter, read within :func:`~gateway.protocol.load_json`'s
        bounds: one malformed, too long or nested too deep is left out) under
        ``direction`` ``outbound``, ``to``, ``from`` and ``answeredBy`` (when known)."""
        attributes: dict[str, Any] = {}
        raw = params.get("attributes", "")
        if raw and len(raw) <= MAX_ATTRIBUTES_CHARS:
            try:
                given = load_json(raw, what="The attributes")
            except ProtocolError:
                given = None
            if isinstance(given, dict):
                attributes.update(given)
        attributes.update(direction="outbound", to=params.get("to", ""))
        attributes["from"] = params.get("from", "")
        if self.answered_by:
            attributes["answeredBy"] = self.answered_by
        return attributes

    def machine_answered(self, answered_by: str) -> list[CallAction]:
        """An answering machine (or fax) took the call (``AnsweredBy``, asynchronous AMD):
        the bot falls silent and ``#machine`` (attributes ``answeredBy``) is the next
        input, for the core to leave a message or hang up. Words waiting (the machine's
        greeting heard as speech) are dropped; keys a human pressed are not: those
        waiting, held (pressed while an utterance was heard, now cancelled) and being
        collected (``collect`` mode, no ``#`` or pause yet: an input now, as the pause
        would have made them, as for words committed then) go first, each an input of
        its own. The turn running is cut off and its transfer is not carried out, whether
        its transfer item came before or comes after (the callee is a machine; module doc
        step 7). Before ``start`` it only goes into the ``#intro`` attributes; once the
        call is ending (the farewell's turn finished) it is ignored. Once the turn that
        asked for a transfer finished (ENDING, TRANSFERRING) the transfer goes on (the
        call is handed over), but the result is kept for its refusal
        (:meth:`_machine_over_transfer`).

        Only the call's first result is taken (:attr:`machine_heard`): carriers deliver
        webhooks at least once (Telnyx's retries, Twilio's on a timeout), so a second
        result is a redelivery and gives no actions (one ``#machine`` per call)."""
        if self.machine_heard is not None:
            return []
        state = self.state
        if state in (State.ENDING, State.TRANSFERRING) and self.transfer is not None:
            return self._machine_over_transfer(answered_by)
        if state in (State.ENDING, State.TRANSFERRING, State.CLOSED):
            return []
        self.answered_by = answered_by
        self.machine_heard = answered_by
        if self.info is None:
            return []  # into the #intro attributes
        self._input_attributes[MACHINE] = {"answeredBy": answered_by}
        if (turn := self.turn) is not None:
            # the machine cut the turn off, not the caller: its transfer (taken, or its
            # item still to come) is not carried out (a person would be handed a
            # voicemail); #machine lets the core decide (module doc step 7)
            turn.machine = True
            if turn.transfer:
                turn.transfer, self.transfer = False, None
        actions: list[CallAction] = []
        if state is State.HEARING:
            actions += self._stop_listening()
        elif state is State.HOLDING:
            actions += [*self._stop_listening(), *self._silence_the_bot()]
        elif state is State.BOT:
            actions += [*self._stop_judging(), *self._stop_after(), *self._silence_the_bot()]
        self.interruption = None  # not the caller's interruption
        # nor the caller's words: words waiting (the machine's greeting heard as speech)
        # are dropped, #machine is the next input after the keys a human pressed (waiting,
        # held or being collected: _commit), which are no machine's
        self._waiting = deque(
            (text, speech)
            for text, speech in self._waiting
            if not speech and text not in _NOT_THE_CALLER
        )
        return [*actions, *self._commit(MACHINE)]

    def _machine_over_transfer(self, answered_by: str) -> list[CallAction]:
        """:meth:`machine_answered` once the turn that asked for a transfer finished: the
        transfer goes on, and the caller's speech kept for its result is the machine's (no
        caller's words): the words waiting are dropped, the utterance heard after the turn
        cancelled (``[CancelListening]``; keys pressed during it wait now, a person's) and
        no more speech is heard (:meth:`_hear_after_turn`). A refusal gives the core
        ``#machine`` after ``#transfer-failed`` and the keys (:meth:`transfer_finished`);
        a transfer that happened drops nothing more. ``[]`` when no utterance was open."""
        self.answered_by = self.machine_heard = answered_by
        self._input_attributes[MACHINE] = {"answeredBy": answered_by}
        self._machine_kept = True
        actions = [*self._stop_after(), *self._release_keys()]
        self._waiting = deque(
            (text, speech)
            for text, speech in self._waiting
            if not speech and text not in _NOT_THE_CALLER
        )
        return actions

    def _media(self, message: Media) -> list[CallAction]:
        pcm = message.pcm
        # a carrier changing rate mid-stream: not heard
        heard = pcm.sample_rate == self.rate
        return self._feed(message.track, pcm.data, len(pcm.data) // 2, heard=heard)

    def _feed(
        self, track: str, data: bytes, samples: int, *, heard: bool = True
    ) -> list[CallAction]:
        """Inbound audio ``data`` (``samples`` long, in :attr:`listen_format`) of ``track``:
        FeedAudio for the caller's track once started (``heard``), also while the call ends
        or transfers (ENDING, TRANSFERRING: the caller's speech then is heard or counted,
        module doc step 7; the speech stage runs its VAD, a recognizer only for an
        utterance opened).

        Raises ProtocolError before the start."""
        state = self.state
        if state is State.CLOSED or track != "inbound":
            return []
        self.machine.feed("media")  # raises before start
        if not heard:
            return []
        self.received += samples
        return [FeedAudio(self.stream, data)]

    def voice(
        self,
        onset_ms: int | None,
        *,
        started: bool,
        voiced_ms: int | None = None,
        heard_to_ms: int | None = None,
    ) -> list[CallAction]:
        """What the speech stage's endpointer says after the latest FeedAudio: the current
        speech's onset (None: nobody speaks), whether that audio ``started`` it, how
        long it has been voiced (ms from the onset to the end of its last voiced frame;
        None: counted as the whole time since the onset) and up to which stream time
        (ms) the recognizer has heard the utterance (:attr:`heard_to_ms`; None: unknown).

        An onset on the caller's floor opens an utterance (StartListening); speech on
        the bot's floor lasting ``barge_in_min_speech_ms`` pauses the bot (or barges in,
        module doc step 4), and interrupts it once voiced for
        ``barge_in_max_backchannel_ms``; the silence timeout and the DTMF pause are
        checked here too (once per inbound frame).
        """
        if self._heard_end is not None and self._awaits_final():
            self._track_next(onset_ms)
        if self.onset_ms is not None and onset_ms is None and self._heard_end is None:
            self._heard_end = self.now_ms  # the utterance listened to ended: its final comes
        self.onset_ms = onset_ms
        self.voiced_ms = (
            0 if onset_ms is None else self.speech_ms if voiced_ms is None else voiced_ms
        )
        self.heard_to_ms = heard_to_ms
        state = self.state
        now = self.now_ms
        actions: list[CallAction] = []
        if state in (State.ENDING, State.TRANSFERRING):
            actions += self._hear_after_turn()
            if self.dtmf.collecting and (digits := self.dtmf.poll(now)) is not None:
                actions += self._after_turn_keys(digits)
            return actions
        if state not in (State.BOT, State.HOLDING, State.CALLER, State.HEARING):
            return []
        if state is State.HOLDING:
            actions += self._judge_holding()
        elif state is State.BOT and self._judging:
            actions += self._judge_resumed()
        elif state is State.CALLER:
            if started:
                actions += self._hear(interrupted=False)
            elif self._silence_due(now):
                actions += self._commit(SILENCE)
        elif state is State.BOT and not self._after_open and self._may_barge_in():
            # (speech after the words heard after a refused transfer: heard at their final)
            actions += self._hold() if self.holds else self._barge_in()
        if self.dtmf.collecting and (digits := self.dtmf.poll(now)) is not None:
            after = self._after_open  # keys begun while its words are awaited: after them
            actions += self._keys_done_after_turn(digits) if after else self._digits(digits)
        return actions

    def _awaits_final(self) -> bool:
        """Whether an utterance is being recognised: its final (or silence) is to come."""
        state = self.state
        return (
            state in (State.HEARING, State.HOLDING)
            or (state is State.BOT and self._judging)
            or self._after_open
        )

    def _track_next(self, onset_ms: int | None) -> None:
        """The endpointer's onset now (``onset_ms``) while the final of an utterance it
        ended is awaited: the caller's next speech begins (its first onset is kept) or
        ends (its end and voiced end are kept), module doc step 4."""
        ended = self._heard_end
        assert ended is not None
        if onset_ms is not None and onset_ms >= ended and self._next_onset is None:
            self._next_onset = onset_ms
        elif onset_ms is None and self.onset_ms is not None and self._next_onset is not None:
            self._next_end = self.now_ms
            self._next_voiced_end = self.onset_ms + self.voiced_ms

    def _silence_due(self, now_ms: int) -> bool:
        due = self._silence_at
        return due is not None and now_ms >= due and not self.dtmf.collecting

    def _may_barge_in(self) -> bool:
        cfg = self.config
        return (
            cfg.barge_in
            and self.onset_ms is not None
            and self.speech_ms >= cfg.barge_in_min_speech_ms
            and self.onset_ms >= self._bot_since
        )

    def _hold(self, *, listen: bool = True, following: bool = False) -> list[CallAction]:
        """Speech over the bot: pause its audio and hear the utterance out (HOLDING);
        ``listen`` False: its utterance is open already (the caller went on);
        ``following``: the speech is the one that followed a final (:meth:`_listen`)."""
        self.machine.advance(HOLD)
        # the bot's audio stops here (its playout too), unless it cannot be paused
        self._held_at = self.now_ms if self.pauses else None
        self._judging = False
        pause: list[CallAction] = [PausePlayback()] if self.pauses else []
        if not listen:
            return pause
        self.partial = ""
        return [*pause, *self._listen(interrupted=True, following=following)]

    def _judge_holding(self) -> list[CallAction]:
        """HOLDING, after each inbound frame: voiced too long for a backchannel -> barge-in;
        quiet for ``barge_in_resume_ms`` with no content word heard -> resume early.

        "No content word" is judged only on a partial that covers the speech (the
        recognizer has heard up to its voiced end, :attr:`heard_to_ms`): a recognizer
        behind the caller (a loaded machine) has an empty or stale partial, and resuming
        on it would play the bot on over "wait, | I want..." until the words show.

        Once the endpointer has ended the utterance (no onset any more) only its final
        decides (:meth:`heard`: resume or clear): the partial may lag the speech that
        ended it, and the end may be a pause within a sentence ("hold on, | that is not
        what I asked" ends at the comma on the short end of turn, its partial "although",
        its final "all gone"): resuming there played the bot over the caller until the
        final cleared it. Speech the caller begins then (before that final) is not this
        utterance: it is neither judged nor resumed on here (its voiced length, the old
        partial), but heard once the final decided (:meth:`heard`)."""
        cfg = self.config
        onset = self.onset_ms
        if onset is None or self._heard_end is not None:
            # the utterance ended: its final is on its way; speech begun since is the
            # caller's next, heard once that final decided (_heard_next), not judged as it
            return []
        if self.voiced_ms >= cfg.barge_in_max_backchannel_ms:
            return self._barge_in()
        voiced_end = onset + self.voiced_ms
        quiet = self.now_ms - voiced_end >= cfg.barge_in_resume_ms
        heard = self.heard_to_ms
        fresh = heard is None or heard >= voiced_end
        if quiet and fresh and not content_words(self.partial, cfg.barge_in_backchannels):
            self._judged = (onset, voiced_end)
            self._judging = True  # its final is still to come
            return self._resume()
        return []

    def _judge_resumed(self) -> list[CallAction]:
        """BOT, resumed early: the caller speaking on in the same speech holds the bot
        again (the utterance is still open); a new speech starts over."""
        onset = self.onset_ms
        if onset is None:
            return []
        if self._judged is not None and onset == self._judged[0]:
            if onset + self.voiced_ms > self._judged[1]:
                return self._hold(listen=False)
            return []
        if self._may_barge_in():  # a new speech: a new utterance (the old one is dropped)
            self._judging = False
            return self._hold()
        return []

    def _is_interruption(self, text: str, *, final: bool, confidence: float = 1.0) -> bool:
        """Whether a transcript of the speech over the bot is a real interruption (interim:
        two content words; final: one, heard with ``barge_in_min_confidence``)."""
        found = content_words(text, self.config.barge_in_backchannels)
        if not final:
            return len(found) >= 2
        return bool(found) and confidence >= self.config.barge_in_min_confidence

    def _barge_in(self, *, following: bool = False, listen: bool = True) -> list[CallAction]:
        """A real interruption: clear the bot (HEARING); the utterance is heard on (opened
        now unless the bot was holding for it or judging it, or ``listen`` is False: it
        is open already; ``following``: as :meth:`_listen`). When the bot had finished
        meanwhile (no turn runs, every mark back: a bot that cannot be paused plays on
        while judged) nothing is cut off: the utterance is the caller's, no ``#fallback``
        when it has no words (as on the caller's floor)."""
        held = self.state is State.HOLDING or self._judging or not listen
        self._judging = False
        self._interrupted = self.turn is not None or bool(self.marks.outstanding)
        self.machine.advance(BARGE_IN)
        actions = self._silence_the_bot()
        if held:
            return actions
        return [*actions, *self._listen(interrupted=True, following=following)]

    def _resume(self) -> list[CallAction]:
        """The speech over the bot was a backchannel or noise: its audio goes on (BOT)."""
        self.machine.advance(RESUME)
        if self._held_at is not None:
            self.playout.paused(self.now_ms - self._held_at)
        self._held_at = None
        self._interrupted = False
        resume: list[CallAction] = [ResumePlayback()] if self.pauses else []
        return [*resume, *self._advance()]

    def _silence_the_bot(self) -> list[CallAction]:
        """Drop the bot's queued audio and the rest of its turn's output; the next input
        says what of it was heard (:data:`~gateway.events.HEARD`)."""
        cut = (self.turn is not None and not self.turn.discarded) or self.marks.outstanding
        if self.turn is not None:
            self.turn.discarded = True
        if cut:  # (a turn cut off before, by the caller's speech just before: as it was)
            stop = self.now_ms if self._held_at is None else self._held_at
            heard, unheard = self.playout.cut(stop, unsent_ms=self._held_ms)
            self.interruption = {INTERRUPTED: True, HEARD: heard, UNHEARD: unheard}
        self._held_at = None
        self.marks.forget()
        self._held_ms = 0  # the codec's clear drops what it holds back
        # the inputs waiting never reached the core: they stay (the caller's next words
        # join them, _wait), they are not the bot's to drop
        return [Interrupt(self.codec.clear())]

    def interim(self, text: str) -> list[CallAction]:
        """The latest interim transcript of the utterance being heard. While the bot holds
        for it (or resumed early): two content words are a real interruption."""
        self.partial = text
        judged = self.state is State.HOLDING or (self.state is State.BOT and self._judging)
        if judged and self._is_interruption(text, final=False):
            return self._barge_in()
        return []

    def _stop_judging(self) -> list[CallAction]:
        """Drop the utterance judged after an early resume (the bot was cut off otherwise)."""
        if not self._judging:
            return []
        self._judging = False
        return self._stop_listening()

    def _hear(self, *, interrupted: bool, following: bool = False) -> list[CallAction]:
        self.machine.advance(SPEECH)
        return self._listen(interrupted=interrupted, following=following)

    def _listen(self, *, interrupted: bool, following: bool = False) -> list[CallAction]:
        """Open the next utterance (StartListening) from the caller's speech's onset
        (less :data:`PREROLL_MS`). ``following``: the speech begun after the utterance
        before ended and before its final (:meth:`_heard_next`): from its first onset;
        when the caller no longer speaks, it is over: the utterance is the stage's kept
        audio up to its end (``until_ms``), and speech from then on follows it."""
        self._silence_at = None
        self._interrupted = interrupted
        self._key_cut_in = False
        self._heard_end = None
        onset = self.now_ms if self.onset_ms is None else self.onset_ms
        until = None
        if following and self._next_onset is not None:
            onset = self._next_onset
            if self.onset_ms is None:  # over already: it ended where it ended
                until = self._heard_end = self._next_end
        self._next_onset = self._next_end = self._next_voiced_end = None
        self._listened_onset = onset
        self._after_judged = False
        self.stream = next(self._streams)
        start = StartListening(
            self.stream, self.listen_format, from_ms=onset - PREROLL_MS, until_ms=until
        )
        return [start]

    def _stop_listening(self) -> list[CallAction]:
        """CancelListening for the utterance being heard (in HEARING)."""
        return [CancelListening(self.stream)]

    def _dtmf(self, digit: str) -> list[CallAction]:
        state = self.state
        if state in (State.ENDING, State.TRANSFERRING) or self._after_open:
            return self._key_after_turn(digit)
        actions: list[CallAction] = []
        if state is State.HOLDING or (state is State.BOT and self._judging):
            # a key over the bot is a real interruption: the bot is cut off and the
            # utterance held (or judged) is heard out, its final judged as speech over the
            # bot (a backchannel is no input, _utterance_result)
            actions += self._barge_in()
            self._key_cut_in = True
        elif state is State.BOT and self.config.barge_in:
            actions += self._silence_the_bot()
            self.machine.advance(INTERRUPT)
        if not self.dtmf.collecting:  # the first key of an input: pressed while one speaks?
            self._keys_stream = self.stream if self.state is State.HEARING else None
            self._keys_next = self._keys_stream is not None and self._next_onset is not None
        done = self.dtmf.press(digit, self.now_ms)
        if done is not None:
            actions += self._digits(done)
        elif self.state is State.CALLER:
            # no input yet (keys collected: the timeout waits for them, _silence_due), or
            # none at all ('#' alone): the silence timeout runs again from the key; an
            # input waiting (said before the key interrupted the bot) then goes
            self._silence_at = self.now_ms + self.config.silence_timeout_ms
            actions += self._waiting_goes()
        return actions

    def _key_after_turn(self, digit: str) -> list[CallAction]:
        """A key pressed once the turn that ended the session or asked for a transfer
        finished (ENDING, TRANSFERRING; or while the words heard then are awaited after a
        refusal, BOT): collected and kept as an input waiting (nothing is cut off;
        :meth:`_after_turn_keys`) until the call's end is known: after a refused transfer
        it is answered after ``#transfer-failed`` (:meth:`transfer_finished`); a transfer
        that happened or the hang-up after a farewell drops it, said in one
        :class:`InputsUnanswered` (module doc step 7), so the DEBUG log says so: no
        action, nor log, per key. Keys pressed while the caller speaks (an utterance
        heard after the turn) come after its words."""
        if not self.dtmf.collecting:  # the first key of an input: pressed while one speaks?
            self._keys_stream = self.stream if self._after_open else None
            self._keys_next = self._after_open and self._next_onset is not None
        done = self.dtmf.press(digit, self.now_ms)
        return [] if done is None else self._keys_done_after_turn(done)

    def _after_turn_keys(self, text: str) -> list[CallAction]:
        """Keys done (``text``) once a transfer's or farewell's turn finished: held after
        the words of the utterance heard then when they began during it
        (:meth:`_hold_keys`), else waiting (:meth:`_wait`); ``[InputsDropped]`` past the
        bounds, else ``[]``. No turn starts."""
        if self._after_open and self._keys_stream == self.stream:
            return self._hold_keys(text)
        return self._wait(text, speech=False)

    def _keys_done_after_turn(self, text: str) -> list[CallAction]:
        """:meth:`_after_turn_keys`, then on the bot's floor (after a refusal) the next
        waiting input's turn when nothing runs."""
        actions = self._after_turn_keys(text)
        return [*actions, *self._advance()] if self.state is State.BOT else actions

    def _digits(self, text: str) -> list[CallAction]:
        """Keys done (``text``: a key in ``digit`` mode; ``collect`` mode: ``#``, the pause
        or ``max_digits``): the next input. In HEARING, keys begun while the utterance was
        open (:meth:`_keys_during`: pressed while the caller speaks) are held until its
        result: they wait after its words (:meth:`_release_keys`), the order the caller
        used (the words began first). Keys begun before the utterance (the pause ran out
        while the caller speaks) wait now (an input then, as the pause made them) and
        the utterance is heard out, its words the input after them; the keys' turn
        starts once the utterance is over (its final, no words, or the listener's
        failure), so the bot does not answer them over the caller (module doc, "Inputs
        that wait"). The call stays HEARING. In BOT (without barge-in: keys collected over
        the bot's audio, their pause ended) or HOLDING they wait likewise, for the bot's
        floor; the bot is not cut off."""
        if self._keys_during():
            return self._hold_keys(text)
        if self.state in (State.BOT, State.HOLDING, State.HEARING):
            return [*self._wait(text, speech=False), *self._advance()]
        if self.state is State.CALLER:
            return self._commit(text, keys=True)
        return []

    def _keys_during(self) -> bool:
        """Whether the keys being collected (``digit`` mode: the key just pressed) began
        while the utterance being heard was open (HEARING): they come after its words."""
        return self.state is State.HEARING and self._keys_stream == self.stream

    def _hold_keys(self, text: str) -> list[CallAction]:
        """Keys done while the caller speaks (:meth:`_keys_during`): held until the
        utterance's result, then they wait after its words (:meth:`_release_keys`). At
        most :data:`MAX_WAITING_INPUTS` are held: past it the oldest is dropped
        (``[InputsDropped]``), else ``[]``. Keys begun while the caller spoke again after
        the utterance ended (before its final) are held for that next speech
        (:attr:`_next_keys`)."""
        held = self._next_keys if self._keys_next else self._held_keys
        held.append(text)
        if len(held) > MAX_WAITING_INPUTS:
            held.popleft()
            return [InputsDropped(inputs=1)]
        return []

    def _release_keys(self, *, next_keys: bool = True) -> list[CallAction]:
        """The keys held while the utterance was heard (:meth:`_hold_keys`) wait now, each
        an input of its own in the order pressed (:meth:`_wait`, its bounds: one
        ``InputsDropped`` for all drops, else ``[]``). ``next_keys``: those held for
        the caller's next speech too, after them (the utterance's result with no next
        speech heard, a hang-up, ``#machine``)."""
        inputs = chars = 0
        if next_keys:
            self._held_keys.extend(self._next_keys)
            self._next_keys.clear()
            self._keys_next = False
        while self._held_keys:
            for action in self._wait(self._held_keys.popleft(), speech=False):
                if isinstance(action, InputsDropped):
                    inputs += action.inputs
                    chars += action.chars
        return [InputsDropped(chars, inputs)] if inputs or chars else []

    def _mark(self, name: str) -> list[CallAction]:
        self.playout.echoed(name, self.now_ms)
        final = self.marks.echo(name)
        if final:
            return self._final_mark()
        return self._advance()

    def _final_mark(self) -> list[CallAction]:
        if self.state is not State.ENDING:
            return []
        assert self.info is not None
        if self.transfer is not None:  # the audio before the transfer item has played
            self._asked_at = self.now_ms
            self.machine.advance(TRANSFER)
            return [Transfer(self.info.call_id, *self.transfer)]
        self.machine.advance(FINAL_MARK)
        # keys pressed while the farewell's last audio played: nobody answers them
        return [*self._drop_unanswered("session ended"), HangUp(self.info.call_id)]

    def final_mark_overdue(self) -> list[CallAction]:
        """The final mark did not come back in time: hang up all the same."""
        return self._final_mark()

    # -------------------------------------------------------------- the floor

    def _commit(
        self, text: str, *, since: int | None = None, keys: bool = False
    ) -> list[CallAction]:
        """Make ``text`` the next input (state -> bot): it waits behind the inputs waiting
        (:meth:`_wait`; speech joins the caller's words waiting, ``keys`` are their own
        input) and starts when nothing runs. Keys still being collected (``collect``
        mode, no ``#`` or pause yet) were pressed before the words (or ``#fallback``)
        committed now: they are committed first, as an input of their own, as the pause
        would have made them (module doc, "Inputs that wait": words said after keys wait
        after them). Keys pressed while the utterance committed now was heard (held,
        :meth:`_hold_keys`) wait after its words; when keys begun during it are still
        being collected, the words wait for them on the caller's floor (the bot does not
        answer while the caller types; their turn starts once the keys are done). For
        ``#machine`` every key of the caller's goes first: held, then collected, as the
        pause would have made them (a human pressed them before the machine was heard).
        The bot's floor counts from ``since`` (audio ms; None: now): speech
        begun from then on is speech over the bot (:meth:`_may_barge_in`), heard when the
        floor passes."""
        typing = not keys and text != MACHINE and self.dtmf.collecting and self._keys_during()
        self.machine.advance(NOISE if typing else INPUT)  # typing: the caller's floor still
        self._bot_since = self.now_ms if since is None else since
        self._silence_at = None
        speech = not keys and not text.startswith(ACTION_PREFIX)
        actions: list[CallAction] = []
        if text == MACHINE:
            actions += self._release_keys()
        if not keys and not typing and (digits := self.dtmf.flush()) is not None:
            actions += self._wait(digits, speech=False)
        actions += self._wait(text, speech=speech)
        if text != MACHINE:
            actions += self._release_keys(next_keys=False)  # those: _heard_next
        return [*actions, *self._advance()]

    def _wait(self, text: str, *, speech: bool) -> list[CallAction]:
        """``text`` waits for the bot's floor (module doc, "Inputs that wait"). ``speech``
        (the caller's words) is joined into the input waiting last when that is words
        too (a space between, in the order said): one input, so the core hears all of it;
        anything else (keys, an action such as ``#machine``), or words after such an
        input, is an input of its own after those waiting. ``#silence`` and
        ``#fallback`` (no words came) never wait beside an input: dropped when one
        waits, replaced by the next (words, keys or another of them). Bounds: the
        joined speech keeps at most :data:`MAX_JOINED_CHARS` (oldest words dropped
        first), at most :data:`MAX_WAITING_INPUTS` inputs wait (the oldest dropped
        first); a drop is ``[InputsDropped]`` (for the runner's log), else ``[]``."""
        waiting = self._waiting
        if text in _NO_WORDS:
            if waiting and waiting[-1][0] in _NO_WORDS:
                waiting.pop()  # (alone) the latest of them says it
            if not waiting:
                waiting.append((text, False))
            return []
        if waiting and waiting[-1][0] in _NO_WORDS:
            waiting.pop()  # words (or keys) came after all
        chars = inputs = 0
        if speech and waiting and waiting[-1][1]:
            joined, chars = _join(waiting[-1][0], text, MAX_JOINED_CHARS)
            waiting[-1] = (joined, True)
        else:
            waiting.append((text, speech))
        while len(waiting) > MAX_WAITING_INPUTS:
            waiting.popleft()
            inputs += 1
        return [InputsDropped(chars, inputs)] if chars or inputs else []

    def _waiting_goes(self, since: int | None = None) -> list[CallAction]:
        """On the caller's floor with inputs waiting (said before a key interrupted the
        bot; keys whose pause ended while the caller spoke) and no keys being collected
        (``#`` alone, a noise): the bot's floor again, for their turn (once the running
        one finished). The floor counts from ``since`` (audio ms; None: now) as in
        :meth:`_commit`: after a wordless final, from the utterance's end, so speech
        begun before that final is speech over the bot (:meth:`_heard_next`). Else ``[]``."""
        if self.state is not State.CALLER or not self._waiting or self.dtmf.collecting:
            return []
        self.machine.advance(INPUT)
        self._bot_since = self.now_ms if since is None else since
        self._silence_at = None
        return self._advance()

    def _advance(self) -> list[CallAction]:
        """On the bot's floor with no turn running and every mark back: the first waiting
        input's turn (the rest wait for it), or the floor goes to the caller."""
        if self.state is not State.BOT or self.turn is not None or self.marks.outstanding:
            return []
        if self._waiting:
            if self.moved:  # no turn starts for a call moving away (move): nobody hears it
                return []
            text, _ = self._waiting.popleft()
            return self._start_turn(text)
        if self._after_open:  # the words heard while a refused transfer was asked: awaited
            return []
        self.machine.advance(FLOOR)
        self._silence_at = self.now_ms + self.config.silence_timeout_ms
        if self._judging:  # the bot finished while its final was judged: that is the input
            self._judging = False
            self._interrupted = False
            self.machine.advance(SPEECH)
            return []
        if self.onset_ms is not None and self.onset_ms >= self._bot_since:
            return self._hear(interrupted=False)  # the caller started before the bot finished
        return []

    def _start_turn(self, text: str) -> list[CallAction]:
        assert self.ctx is not None
        self.turn = _Turn()
        self.session_started = True
        attributes = self._input_attributes.pop(text, None) or {}
        if self.interruption is not None:
            attributes = {**attributes, **self.interruption}
            self.interruption = None
        self.playout.reset()
        return [StartTurn(self.ctx, Input.of(text, locale=self.ctx.locale, attributes=attributes))]

    # -------------------------------------------------------------- listener

    def heard(self, kind: str, text: str, confidence: float = 1.0) -> list[CallAction]:
        """The listener's result: ``kind`` ``final`` (with ``text`` and its ``confidence``,
        0..1) or ``silence``. Ignored unless the call is hearing, holding or judging.

        A final text is the next input (:meth:`_commit`; it waits on the caller's floor
        while keys begun during the utterance are still being collected, and keys pressed
        during it come after it). No words: ``#fallback`` when the utterance cut the bot
        off (the bot fell silent and must answer; not when a key cut it off: the keys are
        the input), else the caller's floor again with a fresh silence timeout (a cough is
        not an input; keys pressed during it are the inputs). Speech over the bot that is
        no real interruption (module doc step 4) resumes it (or, judged after an early
        resume, is forgotten); after a key cut the bot off, it is no input.

        Speech the caller began after the endpointer ended this utterance (before this
        result came), still going or ended since, is heard now, from its onset (module
        doc step 4, "Speech begun before a final"): over the bot's answer when the result
        made an input, held on (no ResumePlayback) when it was no interruption over the
        bot, the next utterance when it was nothing on the caller's floor.
        """
        state = self.state
        text = text.strip() if kind == "final" else ""
        if self._after_open:
            return self._heard_after_turn(text, confidence)
        judging = state is State.BOT and self._judging
        ended = self._heard_end  # speech begun since then is the caller's next (_heard_next)
        if state is State.HOLDING or judging:
            if self._is_interruption(text, final=True, confidence=confidence):
                actions = [*self._barge_in(), *self._commit(text, since=ended)]
                return [*actions, *self._heard_next()]
            self._judging = False
            if judging:
                return []
            # over the bot still: held on, the next judged (over a paused bot only speech
            # ended lately: holding it silent for a second slow final costs the caller)
            if self._speaks_on(recent=self.pauses):
                self.partial = ""
                return self._listen(interrupted=True, following=True)
            return self._resume()
        if state is not State.HEARING:
            return []
        if self._key_cut_in and not self._is_interruption(text, final=True, confidence=confidence):
            text = ""  # a backchannel or noise over the bot: the key, not it, cut the bot off
        return self._utterance_result(text, since=ended)

    # ---------------------------------------------------------- after the turn

    def _hear_after_turn(self) -> list[CallAction]:
        """ENDING, TRANSFERRING, after each inbound frame: speech the caller begins (lasting
        ``barge_in_min_speech_ms``, not heard before) while a transfer is under way opens an
        utterance (:meth:`_listen_after_turn`) whose words are kept for its result; after
        the core's farewell it is only counted (nobody would answer it: no recognition),
        said in :class:`InputsUnanswered` at the end (module doc step 7)."""
        onset = self.onset_ms
        if (
            onset is None
            or self._after_open
            or self._machine_kept  # the machine's speech: no caller's words
            or onset == self._listened_onset
            or onset < self._bot_since
            or self.speech_ms < self.config.barge_in_min_speech_ms
        ):
            return []
        if self.transfer is None:  # the core's farewell
            self._listened_onset = onset
            self._unheard_speech += 1
            return []
        return self._listen_after_turn()

    def _listen_after_turn(self, *, following: bool = False) -> list[CallAction]:
        """Open an utterance after a transfer's turn (:meth:`_listen`): its words count
        only as a real interruption when it began while the announcement's rest played
        (ENDING; opened later, ``following``: its onset before the final mark)."""
        actions = self._listen(interrupted=False, following=following)
        onset = self._listened_onset
        over_the_bot = onset is not None and onset < self._asked_at
        self._after_open = True
        self._after_judged = self.state is State.ENDING or over_the_bot
        return actions

    def _heard_after_turn(self, text: str, confidence: float) -> list[CallAction]:
        """The result of the utterance heard after a transfer's turn (``text``: its words,
        "" none or the listener failed): the words wait for the transfer's result (module
        doc step 7; over the bot's audio only a real interruption), the keys pressed
        during it after them. Then speech begun after it ended, before this result, is
        heard from its onset: the next such utterance while the transfer is under way;
        after a refusal (BOT), as :meth:`_heard_next` (speech over the bot)."""
        self._after_open = False
        judged, self._after_judged = self._after_judged, False
        if text and judged and not self._is_interruption(text, final=True, confidence=confidence):
            text = ""  # a backchannel over the announcement: no input
        actions = self._wait(text, speech=True) if text else []
        actions += self._release_keys(next_keys=False)
        if self.state is State.BOT:  # the transfer was refused meanwhile
            return [*actions, *self._heard_next(), *self._advance()]
        if not self._speaks_on():
            return [*actions, *self._release_keys()]
        actions += self._listen_after_turn(following=True)
        self._held_keys.extend(self._next_keys)  # pressed during that speech: after it
        self._next_keys.clear()
        if self._keys_next and self.dtmf.collecting:
            self._keys_stream = self.stream
        self._keys_next = False
        return actions

    def _utterance_result(self, text: str, *, since: int | None) -> list[CallAction]:
        """HEARING: the utterance is over, ``text`` its words ("": none). Words are the next
        input (:meth:`_commit`, from ``since``: the utterance's end), ``#fallback`` when
        it cut the bot off with none (not when a key did: the keys are the input); else
        the caller's floor again, a fresh silence timeout, the keys pressed meanwhile and
        inputs waiting going (:meth:`_waiting_goes`). Then the caller's speech begun
        since the utterance ended (:meth:`_heard_next`)."""
        if text or (self._interrupted and not self._key_cut_in):
            return [*self._commit(text or FALLBACK, since=since), *self._heard_next()]
        self.machine.advance(NOISE)
        self._silence_at = self.now_ms + self.config.silence_timeout_ms
        released = self._release_keys(next_keys=False)  # those of the next speech: _heard_next
        return [*released, *self._waiting_goes(since=since), *self._heard_next()]

    def _speaks_on(self, *, recent: bool = False) -> bool:
        """Whether the caller spoke again after the utterance listened to ended, before its
        final: speech that goes on now, long enough to be speech over the bot, or speech
        that was that long and ended meanwhile (the speech stage keeps its audio from
        before its onset until the next utterance opens, however late the final:
        :class:`~gateway.speech.stage.SpeechStage` ``_pin``). ``recent``: ended speech
        only while its voice ended within :attr:`keep_ms` (over the paused bot after a
        backchannel's or a noise's final: holding the bot on for speech a recognizer that
        far behind has still to hear would keep it silent for a second final; it resumes,
        as before; a bot that cannot be paused, :attr:`pauses`, plays on meanwhile: such
        speech is heard however late, as anywhere else)."""
        onset, ended, first = self.onset_ms, self._heard_end, self._next_onset
        if ended is None or first is None:
            return False
        least = self.config.barge_in_min_speech_ms
        if onset is not None and onset >= ended and self.speech_ms >= least:
            return True
        end, voiced_end = self._next_end, self._next_voiced_end
        return (
            end is not None
            and voiced_end is not None
            and end - first >= least
            and (not recent or voiced_end > self.now_ms - self.keep_ms)
        )

    def _heard_next(self) -> list[CallAction]:
        """After an utterance's final was taken: the caller's speech begun after the
        endpointer ended that utterance (before its final came), still going or over
        (:meth:`_speaks_on`), is heard now, from its onset (module doc step 4): on the
        bot's floor as speech over the bot (the floor counts from the utterance's end,
        :meth:`_commit`), on the caller's as the next utterance. Keys pressed during that
        speech (:attr:`_next_keys`) come after its words: held for it once it is heard
        (over the bot a key is a real interruption: it cuts the bot off, the speech judged
        as over it, as for a key over the paused bot), else they wait now."""
        stream = self.stream
        actions = self._hear_next()
        keys = bool(self._next_keys) or (self._keys_next and self.dtmf.collecting)
        if not keys:
            self._keys_next = False
            return actions
        if self.state is State.HEARING and self.stream != stream:  # heard: held for it
            # (those of the utterance before were released with its result: none left)
            self._held_keys.extend(self._next_keys)
            self._next_keys.clear()
            if self._keys_next and self.dtmf.collecting:
                self._keys_stream = self.stream
            self._keys_next = False
            return actions
        released = self._release_keys()
        if self.state is State.CALLER:
            return [*actions, *released, *self._waiting_goes()]
        return [*actions, *released, *self._advance()]

    def _hear_next(self) -> list[CallAction]:
        """:meth:`_heard_next`'s speech: heard from its onset, ``[]`` when none."""
        if not self._speaks_on():
            return []
        first = self._next_onset
        assert first is not None
        if self.state is State.CALLER:
            return self._hear(interrupted=False, following=True)
        if self.state is State.BOT and self.config.barge_in and first >= self._bot_since:
            if self._next_keys or (self._keys_next and self.dtmf.collecting):
                actions = self._barge_in(following=True)  # a key over the bot
                self._key_cut_in = True
                return actions
            return self._hold(following=True) if self.holds else self._barge_in(following=True)
        return []

    def listener_failed(self) -> list[CallAction]:
        """The listener failed (recognizer error, utterance too long): ``#fallback`` (keys
        pressed during the utterance replace it: they are the inputs; none when a key cut
        the bot off, :meth:`_utterance_result`); while the bot holds for the utterance,
        its audio goes on (a longer one interrupted it). One heard after a transfer's turn
        brings no words (:meth:`_heard_after_turn`)."""
        if self._after_open:
            return self._heard_after_turn("", 0.0)
        if self.state is State.HOLDING:
            return self._resume()
        if self.state is State.BOT and self._judging:
            self._judging = False
            return []
        if self.state is not State.HEARING:
            return []
        if self._key_cut_in:  # a key cut the bot off: the keys are the input
            return self._utterance_result("", since=self._heard_end)
        return [*self._commit(FALLBACK, since=self._heard_end), *self._heard_next()]

    # -------------------------------------------------------------- turns

    def turn_event(self, event: TurnEvent) -> list[CallAction]:
        """One event of the running turn: each item's audio (BinaryEvent) is played and
        marked; the Response says whether the session ended; an Error is spoken."""
        turn = self.turn
        if turn is None or self.info is None:
            return []
        if isinstance(event, ResponseEvent):
            tail = [] if turn.discarded else self._flush()  # the turn's audio is all out
            self.playout.done()
            if event.response.session_ended:
                turn.ended = True
            return tail
        if isinstance(event, ErrorEvent):
            turn.failed = True
            return [] if turn.discarded else [*self._flush(), Speak(self.config.error_text)]
        if isinstance(event, ResponseItemEvent) and self.transfer is None:
            target = transfer_target(event.response_item)
            if not turn.discarded:
                self.playout.item(spoken_words(event.response_item))
            # what follows it in the turn is not played. The core's transfer stands when
            # the caller cut the turn off before this item came (module doc step 7), as it
            # does once it came: not a race with the synthesis of the announcement before
            # it; not once the caller is gone (their inputs waiting still reach the core),
            # nor once an answering machine cut it off (machine_answered)
            taken = not turn.discarded or self.state is not State.CLOSED
            if target is not None and taken and not turn.machine:
                self.transfer, turn.transfer = target, True
            return []
        if isinstance(event, BinaryEvent) and not turn.discarded and not turn.transfer:
            return [self._play(event.data)]
        return []

    def speech_request(self) -> TtsRequest:
        """What to ask of the turn engine once the stream started: :func:`speech_request`
        of the codec's outbound format (a carrier's call may override it)."""
        return speech_request(self.codec.outbound_format)

    def _play(self, audio: bytes, *, final: bool = False) -> Play:
        """``audio`` (a chunk in :attr:`tts`'s format) as the codec's frames and a mark.

        Raises AudioFormatError for audio not in that format."""
        messages, audio_ms = self._frames(audio) if audio else ((), 0)
        name = self.marks.new(final=final)
        if not final:
            self.playout.queued(name, audio_ms, self.now_ms)
        return Play(messages, self.codec.mark(name), audio_ms, final)

    def _frames(self, audio: bytes) -> tuple[tuple[WireFrame, ...], int]:
        """``audio`` (as :attr:`tts` asks: a WAV file, or a chunk of μ-law or 16-bit PCM
        without header) as the codec's frames, and its ms.

        A :class:`~gateway.callcodec.ChunkingCodec` sends the whole chunks it fills (its
        tail waits for the next piece or :meth:`_flush`); the ms are still the piece's
        own, so each item's speech counts its own audio in the heard/unheard split (a
        piece shorter than a chunk, held back whole, is not 0 ms, its ms the next
        item's); what is held back is :attr:`_held_ms`.

        Raises AudioFormatError for a WAV that is not one, or PCM of an odd length."""
        rate = _PCM_RATES.get(self.tts.file_type)
        if rate is None:
            pcm = decode_wav(audio)
        elif self.tts.file_type == "mulaw":
            pcm = mulaw_to_pcm(audio, rate)
        else:
            pcm = Pcm(audio, rate)
        audio_ms = len(pcm.data) * 500 // pcm.sample_rate
        if isinstance(self.codec, ChunkingCodec):
            frames, sent_ms = self.codec.carry(pcm)
            self._held_ms += audio_ms - sent_ms
            return tuple(frames), audio_ms
        return tuple(self.codec.audio(pcm)), audio_ms

    def _flush(self) -> list[CallAction]:
        """The audio a :class:`~gateway.callcodec.ChunkingCodec` holds back, padded, as a
        :class:`PlayTail` without a mark of its own (less than a chunk's unit of speech,
        then silence: the piece's mark before it stands for it, so a turn sends a mark
        per piece as on every carrier), its padding's ms counted with that piece's
        (:meth:`Playout.queued_more`; the speech held back was counted with its pieces:
        :meth:`_frames`); ``[]`` when none is held (or the codec holds none back). At the
        end of the turn's audio (its Response; before the error text)."""
        if not isinstance(self.codec, ChunkingCodec):
            return []
        frames, sent_ms = self.codec.flush()
        audio_ms, self._held_ms = max(sent_ms - self._held_ms, 0), 0  # the padding
        if not frames:
            return []
        self.playout.queued_more(audio_ms)
        return [PlayTail(tuple(frames), audio_ms)]

    def spoken(self, audio: bytes | None) -> list[CallAction]:
        """The audio of a Speak (None: synthesis failed; nothing is played)."""
        if not audio or self.turn is None or self.turn.discarded or self.info is None:
            return []
        if self.state not in (State.BOT, State.HOLDING, State.CALLER, State.HEARING):
            return []
        self.playout.item(self.config.error_text)
        play = self._play(audio)
        tail = self._flush()  # the error text's audio comes whole
        self.playout.done()
        return [play, *tail]

    def turn_rejected(self, exc: TurnRejected) -> list[CallAction]:
        """The engine refused the turn (session busy, store down, ...): say the error text;
        :meth:`turn_finished` follows."""
        if self.turn is None:
            return []
        self.turn.failed = True
        return [] if self.turn.discarded else [Speak(self.config.error_text)]

    def turn_finished(self) -> list[CallAction]:
        """The running turn's events have ended: the session's end (a final mark after
        the audio), the waiting input's turn, or the caller's floor. When the turn ended
        the session, the caller's inputs are dropped (``[InputsUnanswered]`` before the
        final mark; after a hang-up, alone) and the utterance being heard is cancelled;
        when it asked for a transfer they are kept for its result
        (:meth:`transfer_finished`, module doc step 7), and the utterance being heard is
        heard out, its words kept likewise (:meth:`_heard_after_turn`)."""
        turn, self.turn = self.turn, None
        self.playout.done()
        if turn is None:
            return []
        if self.state is State.CLOSED:
            if turn.ended:  # the core ended the session: theirs is no turn (said)
                return self._drop_unanswered("session ended")
            # a transfer asked for is not carried out once the caller hung up (module doc
            # step 7): their inputs waiting reach the core, as for any turn
            self.transfer = None
            return self._last_input()
        if turn.ended or turn.transfer:
            # a transfer ends the session once the carrier took it (transfer_finished)
            self.session_over = turn.ended
            state = self.state
            hearing = state in (State.HEARING, State.HOLDING) or self._judging or self._after_open
            # speech over the bot (held, judged) counts only as a real interruption
            judged = (
                state is State.HOLDING
                or self._judging
                or (state is State.HEARING and self._key_cut_in)
                or (self._after_open and self._after_judged)
            )
            resume: list[CallAction] = []
            if state is State.HOLDING:  # the farewell (announcement) is said all the same
                resume = [ResumePlayback()] if self.pauses else []
                self._held_at = None
            self._judging = False
            self.machine.advance(SESSION_END)
            if turn.transfer:
                # the caller's inputs wait for the transfer's result (transfer_finished:
                # answered after #transfer-failed when the carrier refuses it, dropped
                # when it happened); the utterance being heard is heard out, its words
                # kept likewise (_heard_after_turn)
                kept = self._keep_for_transfer(utterance=hearing)
                self._after_open, self._after_judged = hearing, judged
                return [*resume, *kept, self._play(b"", final=True)]
            # the core's farewell: nobody would answer the utterance: cancelled, said
            stop = self._stop_listening() if hearing else []
            self._after_open = self._after_judged = False
            unanswered = self._drop_unanswered("session ended", listening=hearing)
            return [*stop, *resume, *unanswered, self._play(b"", final=True)]
        return self._advance()

    def _keep_for_transfer(self, *, utterance: bool) -> list[CallAction]:
        """The turn that asked for a transfer finished: the caller's inputs said over its
        announcement wait for the transfer's result (module doc step 7), in the order
        said: those waiting (``#silence``, ``#fallback`` dropped: no words of the
        caller's), then keys being collected (an input now, as the pause would have made
        them). The ``utterance`` being heard goes on (:meth:`_heard_after_turn`): keys
        pressed during it (held, or still being collected) come after its words; with
        none, the keys held are released now. ``[InputsDropped]`` past the bounds
        (:meth:`_wait`), else ``[]``."""
        self._waiting = deque(item for item in self._waiting if item[0] not in _NOT_THE_CALLER)
        actions = [] if utterance else self._release_keys()
        during = utterance and self._keys_stream == self.stream
        if not during and (digits := self.dtmf.flush()) is not None:
            actions += self._wait(digits, speech=False)
        return actions

    def _drop_unanswered(
        self, reason: UnansweredReason, *, listening: bool = False
    ) -> list[CallAction]:
        """Drop the caller's inputs (waiting, held or being collected: none gets a turn)
        because of ``reason`` (the call was transferred, the core ended the session):
        ``[InputsUnanswered]`` when there were any (``#silence``, ``#fallback`` and
        ``#machine`` not counted), the utterance heard was cancelled (``listening``; one
        heard after a transfer's turn counts: the call's end, :meth:`_ending_actions`,
        cancels it) or speech after a farewell was counted, else ``[]``."""
        listening = listening or self._after_open
        utterances, self._unheard_speech = self._unheard_speech, 0
        inputs = sum(1 for text, _ in self._waiting if text not in _NOT_THE_CALLER)
        inputs += len(self._held_keys) + len(self._next_keys) + self.dtmf.collecting
        self._waiting.clear()
        self._held_keys.clear()
        self._next_keys.clear()
        self._keys_next = False
        self.dtmf.reset()
        if not (inputs or listening or utterances):
            return []
        return [InputsUnanswered(reason, inputs, listening, utterances)]

    def _stop_after(self) -> list[CallAction]:
        """CancelListening for the utterance heard after a transfer's turn (when one is)."""
        if not self._after_open:
            return []
        self._after_open = self._after_judged = False
        return self._stop_listening()

    # -------------------------------------------------------------- the end

    def transfer_finished(self, ok: bool, error: str | None = None) -> list[CallAction]:
        """The carrier's answer to the :class:`Transfer`: ``ok`` (it took the call) ends
        the session unless the core ended it, the caller's inputs kept for the result
        dropped (``[InputsUnanswered]`` first when any); a refusal (``error``: what went
        wrong) gives the bot the floor back with the input :data:`TRANSFER_FAILED`, those
        inputs waiting after it (module doc step 7; keys being collected an input now,
        ``[InputsDropped]`` first past the bounds). The utterance heard while the carrier
        was asked: when it ended, its words (still to be recognised) wait likewise; when
        the caller still speaks, it is speech over the bot from now on, held and judged
        as any (``PausePlayback`` after the ``StartTurn``; a bot that cannot be paused,
        :attr:`pauses`, plays on while it is judged; without judging,
        ``barge_in_max_backchannel_ms`` 0: cut at once; keys pressed during it: cut at
        once, as keys over the paused bot, and held for after its words). Speech begun
        then and too short to be heard yet is speech over the bot from its onset. Ignored
        unless a transfer is under way (the stream may have stopped meanwhile)."""
        if self.state is not State.TRANSFERRING:
            return []
        if ok:
            self.machine.advance(TRANSFERRED)
            dropped = self._drop_unanswered("transfer")  # kept for a refusal: none came
            return [*dropped, *self._ending_actions(State.TRANSFERRING)]
        self.machine.advance(TRANSFER_REFUSED)
        assert self.transfer is not None
        target, reason = self.transfer
        self.transfer = None
        self.session_over = False  # a session the core ended is opened again by the turn
        self.marks.forget()  # a final mark given up on (final_mark_overdue) is not awaited
        # the caller's inputs kept since the transfer's turn (_keep_for_transfer, keys
        # pressed after it: _key_after_turn) wait after #transfer-failed, each its turn
        flushed = [] if (digits := self.dtmf.flush()) is None else self._after_turn_keys(digits)
        self._silence_at = None
        onset = self.onset_ms
        # the utterance heard while the carrier was asked: the caller still speaks it?
        speaking = (
            self._after_open
            and onset is not None
            and self._heard_end is None
            and self.config.barge_in
        )
        if self._machine_kept:  # the machine's speech going on is no speech over the bot
            self._bot_since = self.now_ms
        elif self._after_open and not speaking and self._heard_end is not None:
            # it ended: its words wait after #transfer-failed once recognised; speech
            # after it is speech over the bot (heard at its final, _heard_after_turn)
            self._bot_since = self._heard_end
        elif (
            not self._after_open
            and onset is not None
            and onset != self._listened_onset
            and onset >= self._bot_since
        ):
            self._bot_since = onset  # speech just begun, not heard yet: over the bot
        else:
            self._bot_since = self.now_ms
        self._input_attributes[TRANSFER_FAILED] = {
            "target": target,
            "reason": reason,
            "error": error or "refused",
        }
        actions = [*flushed, *self._start_turn(TRANSFER_FAILED)]
        if self._machine_kept:  # detected while the transfer was under way: after the keys
            self._machine_kept = False
            actions += self._wait(MACHINE, speech=False)
        if speaking:  # speech over the bot now, from its onset: held and judged as any
            self._after_open = self._after_judged = False
            if self._held_keys:
                # keys pressed during it (held for after its words): as keys over the
                # paused bot (module doc step 5), they cut it off and the speech is judged
                # as over it; the keys stay held, after its words (the order said)
                actions += self._barge_in(listen=False)
                self._key_cut_in = True
            else:
                actions += self._hold(listen=False) if self.holds else self._barge_in(listen=False)
        return actions

    @property
    def movable(self) -> bool:
        """Whether the call is live (started, not ending, transferring or over): it can be
        handed to another instance (:meth:`move`)."""
        return self.info is not None and self.state not in (
            State.ENDING,
            State.TRANSFERRING,
            State.CLOSED,
        )

    def move(self) -> bool:
        """The call is being handed to another instance: the gateway shuts down and asked
        the carrier to fetch the call's instructions anew (gateway/io/call.py
        ``move_calls``: Twilio's redirect, Plivo's transfer; or to stream it anew:
        Telnyx's ``streaming_start``), so
        the call goes on in a new stream elsewhere (started with :data:`RESUMED`). From
        now no turn starts (an input waits), and the stream's end (the carrier's ``stop``,
        a lost connection) does not end the session, nor give the input waiting its turn
        (the caller would not hear its answer: the input is dropped); a turn running
        then still finishes and saves.
        Whether the call can move: False (nothing changed) before the start, while it
        ends or transfers, or once it is over."""
        if not self.movable:
            return False
        self.moved = True
        return True

    def move_failed(self) -> list[CallAction]:
        """The carrier did not take the move (:meth:`move`): the call goes on here as any
        call, its stream's end ending the session: the turn of an input that waited (else
        ``[]``); when the stream ended meanwhile, the session's end now (``[EndSession]``,
        unless the core ended it)."""
        self.moved = False
        return self._ending_actions(State.CLOSED) if self.closed else self._advance()

    def _last_input(self) -> list[CallAction]:
        """The stream ended (the carrier's ``stop`` or a lost connection) while inputs
        were waiting (:attr:`waiting`: a key pressed as the caller hung up, words said
        while the bot's turn ran or its audio played; keys collected in ``collect`` mode,
        :meth:`_stream_ended`): the first one's turn, so the caller's last inputs reach
        the core before the session ends (the runner's EndSession waits for them:
        gateway/io/call.py ``CallRunner.end_session``); the next one's when it finished
        (:meth:`turn_finished`), unless it ended the session. Nothing of them is played
        (the turn is discarded). ``#silence``, ``#fallback`` and ``#machine`` waiting
        are dropped (none of the caller's words or keys: no muted turn after the caller
        is gone). ``[]`` when no other input waits or the stream has not ended (its
        callers check that the core did not end the session) or the call moved
        (:meth:`move`): the inputs waiting are dropped."""
        ended = self.stopped or self.disconnected
        if ended:
            kept = [(text, speech) for text, speech in self._waiting if text not in _NOT_THE_CALLER]
            self._waiting = deque(kept)
        if not self._waiting or not ended or self.ctx is None or self.moved:
            self._waiting.clear()
            return []
        text, _ = self._waiting.popleft()  # the others follow it (turn_finished)
        actions = self._start_turn(text)
        assert self.turn is not None
        self.turn.discarded = True
        return actions

    def drop_waiting(self) -> int:
        """The call is over and the session's end waits no longer for the turns of the
        inputs that waited at the stream's end (the runner's EndSession: its
        GATEWAY_LOCK_WAIT_S ran out, gateway/io/call.py ``CallRunner.end_session``): the
        inputs still waiting are dropped, so none starts a turn once the session is ended
        (it would make the session anew, left behind the call). How many were dropped
        (0 when none waited, or the call is not over: nothing is dropped then)."""
        if not self.closed:
            return 0
        dropped = len(self._waiting)
        self._waiting.clear()
        return dropped

    def connection_lost(self) -> list[CallAction]:
        """The socket is gone (or the call is being torn down) without the carrier's
        ``stop``: as a ``stop`` (:meth:`_stream_ended`), the caller's last input reaches
        the core, then the session ends unless the core ended it; the listener is
        cancelled. Again after the end (the call closed): ``[]``."""
        was = self.state
        self.machine.advance(DISCONNECT)
        self.disconnected = True
        return self._stream_ended(was)

    def _stream_ended(self, was: State) -> list[CallAction]:
        """The stream ended in state ``was`` (``stop`` or :meth:`connection_lost`; the
        call is now CLOSED). Unless the call was over already or the core ended the
        session: keys held while the utterance was heard (:meth:`_hold_keys`; its words
        are lost with it), then keys collected in ``collect`` mode (no ``#`` or pause yet),
        become inputs, waiting after those waiting (:meth:`_wait`: keys are an input of
        their own, as the pause would have made them), and the inputs waiting are the
        core's before the end, one turn each in the order said: the first at once when no
        turn runs, else once the running one finished (:meth:`turn_finished`, which drops
        them when that turn ended the session). The turn running now is discarded as the last
        input's is (:meth:`_last_input`): it finishes and saves (the runner's EndSession
        waits for it), but none of its audio is played, no mark sent (the carrier's
        socket may still be open after its ``stop``: frames then are a protocol error to
        it) and its error text is not synthesized. Then the ending actions (EndSession).

        Ended while a transfer was asked (TRANSFERRING: the carrier's transfer ends the
        stream), or after the core's farewell (ENDING, the session over): the caller's
        inputs kept then are dropped (``[InputsUnanswered]``, module doc step 7; reason
        ``"stream stopped"`` at the carrier's ``stop``, ``"stream closed"`` when the stream
        was lost: the carrier's answer has not come, it may still refuse the transfer (a
        caller who hung up), and nobody could be answered on this stream any more); ended
        in ENDING before a transfer was asked, they reach the core as above."""
        if self.turn is not None:  # the caller is gone: nothing of it is played or said
            self.turn.discarded = True
        last: list[CallAction] = []
        if was is State.TRANSFERRING:  # the transfer was asked (the stream's end is its own)
            reason: UnansweredReason = "stream closed" if self.disconnected else "stream stopped"
            last += self._drop_unanswered(reason)
        elif was is State.ENDING and self.session_over:  # after the core's farewell
            last += self._drop_unanswered("session ended")
        elif was is not State.CLOSED and not self.session_over:
            last += self._release_keys()  # pressed while the caller spoke: after those waiting
            digits = self.dtmf.flush()
            if digits is not None:
                last += self._wait(digits, speech=False)
            if self.turn is None:
                last += self._last_input()
        return [*last, *self._ending_actions(was)]

    def _ending_actions(self, was: State) -> list[CallAction]:
        actions: list[CallAction] = []
        if was in (State.HEARING, State.HOLDING) or self._judging:
            self._judging = False
            actions += self._stop_listening()
        # the utterance heard after a transfer's turn: cancelled last (the runner may carry
        # these out in the transfer's task, which the stream's end cancels: the session's
        # end, which the runner lets outlast that, goes first)
        after = self._stop_after()
        if self.moved:  # the session goes on in the call's next stream (move)
            return [*actions, *after]
        if self.ctx is not None and self.session_started and not self.session_over:
            self.session_over = True
            actions.append(EndSession(self.ctx))
        return [*actions, *after]
