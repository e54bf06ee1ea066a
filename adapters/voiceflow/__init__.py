"""Voiceflow-compatible socket.io interact endpoint (``/v4/interact/socket``).

``protocol.py`` is the pure, sans-I/O part (state machine, payloads, actions ->
Inputs, turn events -> traces, sessionKey tokens); ``routes.py`` serves it with a
python-socketio AsyncServer mounted into the FastAPI app.
Spec: shared/specs/voiceflow-socket-interact.md.
"""
