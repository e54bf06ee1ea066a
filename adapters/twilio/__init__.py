"""Twilio Media Streams: phone calls (TwiML webhook, verified media WebSocket, barge-in, DTMF)."""
