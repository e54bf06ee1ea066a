"""I/O drivers, one per transport kind: the I/O every adapter of that kind shares.

An adapter's ``protocol.py`` holds what is particular to its wire (pure); its
``routes.py`` wires it to the driver of its transport (:mod:`gateway.io.websocket`
for WebSocket protocols, :mod:`gateway.io.webhook` for webhook channels). Drivers do
the I/O: read and bound what comes in, run turns through the turn engine, send what
goes out.
"""
