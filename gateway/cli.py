"""The ``gateway`` command: ``gateway serve [--host H] [--port P] [--fd N]`` and
``gateway openapi``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError
from pydantic_settings import SettingsError

from gateway.logs import CREDENTIAL_QUERY, configure_logging, redact_query
from gateway.pipeline.base import hide_url_secrets
from gateway.settings import LOG_LEVELS, Settings, unknown_settings

if TYPE_CHECKING:
    from fastapi import FastAPI

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""The signals uvicorn stops gracefully on (uvicorn.server.HANDLED_SIGNALS, POSIX)."""
_STARTUP_FAILURE = 3
"""The exit status of a server that did not start (uvicorn.main.STARTUP_FAILURE)."""


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status: 0, 2 for wrong arguments or
    settings (one ``gateway: ...`` line each on stderr), 1 when ``openapi`` cannot
    write its file (one line), 3 when the server did not start (SystemExit)."""
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("serve", help="run the gateway (settings from GATEWAY_* env)")
    server.add_argument("--host", help="address to bind (default GATEWAY_HOST or 127.0.0.1)")
    server.add_argument("--port", type=int, help="port (default GATEWAY_PORT or 8080)")
    server.add_argument(
        "--fd",
        type=int,
        help="serve on this inherited, bound stream socket (a file descriptor) instead of "
        "binding --host/--port; --port then defaults to the socket's port",
    )
    server.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        help="default GATEWAY_LOG_LEVEL or INFO (any case)",
    )
    spec = commands.add_parser("openapi", help="write the OpenAPI document")
    spec.add_argument(
        "--out", default="openapi/openapi.json", help="file, or - for stdout (default %(default)s)"
    )
    args = parser.parse_args(argv)

    if args.command == "serve":
        overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
        if args.fd is not None:
            try:
                fd_port = inherited_socket_port(args.fd)
            except ValueError as exc:
                print(f"gateway: {exc}", file=sys.stderr)
                return 2
            if fd_port is not None and args.port is None:
                overrides["port"] = fd_port
        try:
            settings = Settings(**overrides)
        except ValidationError as exc:
            for line in setting_errors(exc):
                print(f"gateway: {line}", file=sys.stderr)
            return 2
        except SettingsError as exc:  # a complex setting's value that is not JSON
            print(f"gateway: {settings_error(exc)}", file=sys.stderr)
            return 2
        if (problem := check_pipelines(settings)) is not None:
            print(f"gateway: {problem}", file=sys.stderr)
            return 2
        serve(settings, log_level=args.log_level, fd=args.fd)
        return 0
    if args.command == "openapi":
        text = openapi_json()
        if args.out == "-":
            sys.stdout.write(text)
        else:
            try:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(text, encoding="utf-8")
            except OSError as exc:  # one line, not a traceback: a directory, no permission
                print(f"gateway: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
                return 1
        return 0
    return 2


def serve(
    settings: Settings,
    *,
    log_level: str | None = None,
    app: FastAPI | None = None,
    fd: int | None = None,
) -> None:
    """Run the gateway as ``gateway serve`` does, until it is stopped (SIGINT/SIGTERM).

    Logging goes to stderr at ``log_level`` (default GATEWAY_LOG_LEVEL) in
    GATEWAY_LOG_FORMAT; one line states the connection limits (a WARNING when
    GATEWAY_MAX_CONNECTIONS exceeds what the open-file limit leaves), one WARNING names
    the GATEWAY_* variables that are no setting (:func:`unknown_settings_warning`); uvicorn serves
    ``app`` (default ``create_app(settings, freeze_gc=True)``) on GATEWAY_HOST:PORT with
    the gateway's protocol classes (deadlines, connection cap, send deadline:
    :func:`gateway.server.uvicorn_options`) and GATEWAY_SHUTDOWN_TIMEOUT_S for a
    graceful stop, after which it returns (``gateway serve`` exits 0, a second SIGTERM
    changing nothing). Raises SystemExit(3) when the server did not start (its
    lifespan failed, the port was taken), as ``uvicorn.run`` does, and before anything
    else when GATEWAY_HOST does not resolve (one ERROR line: :func:`host_problem`). ``app`` lets a
    benchmark serve an app it prepared (local certificates injected) exactly as users
    run the gateway. ``fd`` (``--fd``): serve on that inherited, bound stream socket
    instead of binding GATEWAY_HOST:PORT (:func:`inherited_socket_port` checks it first):
    whoever bound it holds the port from then on, so no other process can take it between
    the choice of a port and the start (a supervisor, a test harness). The socket is
    handed to uvicorn as a socket of its own family (TCP connections get TCP_NODELAY, as
    on a port uvicorn binds), and this process's descriptor is closed when it stops
    accepting.
    """
    import uvicorn

    from gateway.app import create_app
    from gateway.server import GatewayServer, describe, open_file_limit, uvicorn_options

    level = (log_level or settings.log_level).lower()
    configure_logging(level, settings.log_format)
    server_log = logging.getLogger("gateway.server")
    if fd is None and (problem := host_problem(settings.host, settings.port)) is not None:
        server_log.error(problem)  # one line, as uvicorn's for a port already in use
        raise SystemExit(_STARTUP_FAILURE)
    server_log.info(describe(settings))
    for warning in startup_warnings(settings, open_file_limit()):
        server_log.warning(warning)
    if (unknown := unknown_settings_warning(os.environ)) is not None:
        server_log.warning(unknown)
    # --fd: served as a socket of its own family, not through uvicorn's fd, which wraps any
    # descriptor as AF_UNIX: asyncio then left Nagle on for every TCP connection (it sets
    # TCP_NODELAY only on AF_INET/AF_INET6 sockets), so each answer on a kept-alive
    # connection waited ~40 ms for the client's delayed ACK
    listening = [socket.socket(fileno=fd)] if fd is not None else None
    config = uvicorn.Config(
        app if app is not None else create_app(settings, freeze_gc=True),
        host=settings.host,
        port=settings.port,
        log_level=level,
        log_config=None,  # keep the handlers configure_logging set
        access_log=settings.access_log,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
        # deadlines, connection cap, send deadline, ws_max_size (gateway/server.py)
        **uvicorn_options(settings),
    )
    # uvicorn's, with the app's before_close hooks between the end of accepting and the
    # close of the open connections (the carriers move their calls to another instance there)
    server = GatewayServer(config)
    # uvicorn stops gracefully on SIGTERM/SIGINT, then raises the signal again for the
    # handler it found when it started; Python's default for SIGTERM kills the process,
    # so a clean stop ended "killed by SIGTERM" (status -15; 143 in a container, an
    # Error to Kubernetes and to Docker's on-failure restart policy). Its own handler,
    # installed first, makes that second delivery a no-op: the stop exits 0. A signal
    # before uvicorn takes over (none is lost) stops it as soon as it has started.
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in _STOP_SIGNALS}
    if listening is not None:  # uvicorn logs no start line for sockets it is handed
        server_log.info(
            "serving on the inherited socket %s (--fd %d)", listening[0].getsockname(), fd
        )
    try:
        server.run(sockets=listening)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:  # as uvicorn.run: the app's startup failed, or the bind
        raise SystemExit(_STARTUP_FAILURE)


def inherited_socket_port(fd: int) -> int | None:
    """The TCP port of the stream socket ``fd`` (``gateway serve --fd``), None for a Unix
    socket. Raises ValueError, with a one-line reason naming ``--fd``, when ``fd`` is not
    an open file descriptor, not a socket, not a stream socket, or neither TCP nor Unix,
    or when a TCP socket is not bound (it would listen on a random port)."""
    if fd < 0:
        raise ValueError(f"--fd {fd}: not a file descriptor")
    try:
        copy = os.dup(fd)
    except OSError as exc:
        raise ValueError(f"--fd {fd}: not an open file descriptor ({exc.strerror})") from None
    try:
        sock = socket.socket(fileno=copy)  # family and type read from the socket
    except OSError as exc:
        os.close(copy)
        raise ValueError(f"--fd {fd}: not a socket ({exc.strerror or exc})") from None
    with sock:
        if sock.type != socket.SOCK_STREAM:
            raise ValueError(f"--fd {fd}: not a stream socket")
        if sock.family == socket.AF_UNIX:
            return None
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            raise ValueError(f"--fd {fd}: neither a TCP nor a Unix socket")
        port: int = sock.getsockname()[1]
        if port == 0:
            raise ValueError(f"--fd {fd}: the socket is not bound to a port")
        return port


def host_problem(host: str, port: int) -> str | None:
    """Why ``gateway serve`` cannot listen on ``host`` (GATEWAY_HOST or ``--host``; ``port``
    the TCP port), or None when the name resolves to an address to bind (as uvicorn's
    ``loop.create_server`` resolves it: ``getaddrinfo``, passive, TCP). Before, a name
    that does not resolve (``no-such-host.invalid``) stopped the start with uvicorn's
    ``[Errno -2] Name or service not known``, which names neither the setting nor the
    host; binding an address that resolves is left to uvicorn (a port already in use)."""
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        reason = exc.strerror or str(exc)
    except UnicodeError as exc:  # a name IDNA cannot encode (an empty label, too long)
        reason = f"not a host name ({exc})"
    else:
        return None
    return f"cannot listen on GATEWAY_HOST (--host) {host!r}: {reason}"


def startup_warnings(settings: Settings, file_limit: int) -> list[str]:
    """What ``gateway serve`` warns of at startup for ``settings`` (with ``file_limit``
    open files, ``ulimit -n``): settings that work but fail some clients.

    - GATEWAY_MAX_CONNECTIONS over what the open-file limit leaves
      (:func:`gateway.server.auto_max_connections`): past that, connections fail
      unanswered.
    - GATEWAY_SHUTDOWN_TIMEOUT_S not longer than GATEWAY_LOCK_WAIT_S +
      GATEWAY_TURN_TIMEOUT_S (+ GATEWAY_ERROR_TURN_MIN_S with GATEWAY_ERROR_TURN:
      Settings.turn_max_s; an HTTP turn accepted just before SIGTERM may wait that
      long for its session's lock, then run): on SIGTERM a turn may still run when
      uvicorn stops waiting and cancels its request; its client gets a 500 though the
      turn goes on and its session is saved (the lifespan waits for it), so a retry
      says the same thing twice.
    """
    from gateway.server import auto_max_connections

    warnings = []
    room = auto_max_connections(file_limit, settings.redis_max_connections)
    if settings.max_connections and settings.max_connections > room:
        warnings.append(
            f"GATEWAY_MAX_CONNECTIONS={settings.max_connections} is more than the open-file "
            f"limit {file_limit} leaves ({room}): past that, connections fail unanswered; "
            "raise the limit (ulimit -n, nofile)"
        )
    if settings.shutdown_timeout_s <= settings.lock_wait_s + settings.turn_max_s:
        error_turn = (
            f" + GATEWAY_ERROR_TURN_MIN_S={settings.error_turn_min_s:g} (GATEWAY_ERROR_TURN)"
            if settings.error_turn
            else ""
        )
        warnings.append(
            f"GATEWAY_SHUTDOWN_TIMEOUT_S={settings.shutdown_timeout_s} is not longer than "
            f"GATEWAY_LOCK_WAIT_S={settings.lock_wait_s:g} + "
            f"GATEWAY_TURN_TIMEOUT_S={settings.turn_timeout_s:g}{error_turn}: on SIGTERM a "
            "turn still running when the wait ends is answered 500 though it goes on and is "
            "saved (a retry repeats it); give the shutdown more time than a turn may wait for "
            "its session and run"
        )
    return warnings


MAX_UNKNOWN_NAMED = 20
"""The most unknown GATEWAY_* names :func:`unknown_settings_warning` lists (the rest are
counted)."""


def unknown_settings_warning(environ: Mapping[str, str]) -> str | None:
    """The startup WARNING of the ``GATEWAY_*`` variables of ``environ`` that are no
    setting (:func:`gateway.settings.unknown_settings`: a typo, ignored, so a setting the
    operator believes on is not), or None when there is none: their names only (never a
    value), sorted, at most :data:`MAX_UNKNOWN_NAMED` and then ``and N more``, each with
    the closest setting when there is one: ``... GATEWAY_ADMIN_KEY (did you mean
    GATEWAY_ADMIN_KEYS?)``. The gateway still starts: the prefix is not only its own."""
    unknown = unknown_settings(environ)
    if not unknown:
        return None
    named = [
        f"{name} (did you mean {close}?)" if close else name
        for name, close in unknown[:MAX_UNKNOWN_NAMED]
    ]
    if len(unknown) > MAX_UNKNOWN_NAMED:
        named.append(f"and {len(unknown) - MAX_UNKNOWN_NAMED} more")
    return (
        f"GATEWAY_* environment variables that name no setting are ignored ({len(unknown)}): "
        + ", ".join(named)
    )


_SECRET_NAME = re.compile(r"(key|keys|token|secret|auth|password)$")
"""Settings named like a credential (GATEWAY_ADMIN_KEYS, GATEWAY_EXOTEL_API_KEY, ...)."""


def secret_setting(name: str) -> bool:
    """Whether the setting ``name`` (a Settings field) holds a credential: a SecretStr, or
    named like one. :func:`setting_errors` never shows such a value."""
    field = Settings.model_fields.get(name)
    annotation = repr(field.annotation) if field is not None else ""
    return "SecretStr" in annotation or bool(_SECRET_NAME.search(name))


def setting_errors(exc: ValidationError) -> list[str]:
    """One line per invalid setting of ``exc`` (pydantic's, from Settings()), naming it by
    its environment variable: ``GATEWAY_TURN_TIMEOUT_S: Input should be greater than
    0 (got '-1')``. The value of a credential (:func:`secret_setting`) is not shown: the
    line goes to stderr, the container's log; a URL's userinfo (``user:password@``) and
    credential query parameters (``?password=``) are written ``***`` in any value
    (:func:`~gateway.pipeline.base.hide_url_secrets`, :func:`~gateway.logs.redact_query`:
    a password holding ``&token=`` is all hidden)."""
    lines = []
    for error in exc.errors():
        where = [str(part) for part in error["loc"]]
        name = f"GATEWAY_{where[0].upper()}" if where else "the settings"
        inner = f" [{'.'.join(where[1:])}]" if len(where) > 1 else ""
        message = str(error["msg"]).removeprefix("Value error, ")
        given = None if where and secret_setting(where[0]) else error.get("input")
        if isinstance(given, str):  # a URL's password (GATEWAY_REDIS_URL=redis://:pw@h)
            given = redact_query(hide_url_secrets(given, CREDENTIAL_QUERY))
        shown = f" (got {given!r:.80})" if isinstance(given, str | int | float) else ""
        lines.append(f"{name}{inner}: {message}{shown}")
    return lines


def settings_error(exc: SettingsError) -> str:
    """The line of ``exc`` (pydantic-settings': a complex setting, such as
    GATEWAY_CALL_OVERRIDES, whose value is not JSON), naming the setting by its
    environment variable: ``GATEWAY_CALL_OVERRIDES is not valid JSON: Expecting ...``
    (the JSON parser's words name a place, never the value)."""
    named = re.search(r'field "(\w+)"', str(exc))
    if named is not None and isinstance(exc.__cause__, json.JSONDecodeError):
        return f"GATEWAY_{named[1].upper()} is not valid JSON: {exc.__cause__}"
    return re.sub(r'field "(\w+)"', lambda m: f"GATEWAY_{m[1].upper()}", str(exc))


def check_pipelines(settings: Settings) -> str | None:
    """Why the cores of ``settings`` cannot be set up (GATEWAY_PIPELINE(S), credentials),
    or None when they can: ``gateway serve`` refuses to start with that message."""
    import asyncio

    from gateway.pipeline import PipelineConfigError, make_pipeline

    try:
        pipeline = make_pipeline(settings)
    except PipelineConfigError as exc:
        return str(exc)
    asyncio.run(pipeline.aclose())
    return None


def openapi_json() -> str:
    """The OpenAPI document of the app with default settings, as stable JSON text."""
    from gateway.app import create_app

    return json.dumps(create_app(Settings()).openapi(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
