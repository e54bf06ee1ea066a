"""The browser console: a static page at ``/console`` that talks to the bot over
Flowstorm Socket V1 (``/socket/``) like a Flowstorm client.

The page (``static/``: index.html, console.css, console.js, capture-worklet.js) is
plain HTML, CSS and JavaScript: no build step, no bundler, nothing fetched from
elsewhere. It is served by Starlette's StaticFiles; ``/console`` redirects to
``/console/``. GATEWAY_CONSOLE_ENABLED=false leaves it out (404).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

STATIC: Final = Path(__file__).parent / "static"
"""The folder of the console's files."""

PATH: Final = "/console"
"""Where the console is served."""


def mount(app: FastAPI) -> None:
    """Serve the console's files under :data:`PATH` (index.html at ``/console/``)."""
    app.mount(PATH, StaticFiles(directory=STATIC, html=True), name="console")
