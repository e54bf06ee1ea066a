"""Every adapter's ``protocol.py`` is pure: importing it loads no event loop, store,
network client, web framework, turn engine or speech service (DESIGN.md, "Rules of
the house").

Each module found by globbing ``adapters/**/protocol.py`` (so a new adapter is covered
without editing this file) is imported in a fresh interpreter, which prints the
forbidden modules that got into ``sys.modules``. A second check reads each module's
source and refuses imports of the impure parts of the gateway anywhere in it, also
under ``if TYPE_CHECKING:`` (which the runtime check cannot see).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SANS_IO = ("adapters/flowstorm/v2/hearing.py",)
"""Other sans-I/O modules of the adapters, held to the same rules."""
PROTOCOLS = sorted([*ROOT.glob("adapters/**/protocol.py"), *(ROOT / p for p in SANS_IO)])
KNOWN = {
    "alexa",
    "exotel",
    "flowstorm/v1",
    "flowstorm/v2",
    "flowstorm/v2/hearing",
    "google",
    "plivo",
    "telnyx",
    "twilio",
    "vonage",
    "voiceflow",
}


def _name(path: Path) -> str:
    """The adapter's folder below ``adapters/`` (``flowstorm/v1``, ``twilio``), with the
    module's name when it is not ``protocol.py`` (``flowstorm/v2/hearing``)."""
    folder = path.parent.relative_to(ROOT / "adapters").as_posix()
    return folder if path.name == "protocol.py" else f"{folder}/{path.stem}"


FORBIDDEN = (
    "asyncio",
    "redis",
    "httpx",
    "fastapi",
    "starlette",
    "uvicorn",
    "socketio",
    "websockets",
    "gateway.conversation",
    "gateway.sessions",
    "gateway.speech.service",
)
"""Modules a protocol module must not load: I/O libraries and the turn engine's parts."""

IMPURE_GATEWAY = (
    "gateway.app",
    "gateway.bus",
    "gateway.conversation",
    "gateway.deps",
    "gateway.io",
    "gateway.nonces",
    "gateway.pipeline",
    "gateway.redisconn",
    "gateway.sessions",
    "gateway.sockets",
    "gateway.speech.admission",
    "gateway.speech.stage",
    "gateway.speech.service",
    "gateway.speech.stt",
    "gateway.speech.tts",
    "gateway.speech.tts_cache",
    "gateway.speech.tts_pool",
)
"""Gateway modules that run turns, speech or stores: not to be named by a protocol,
even for type hints (their value types live in gateway.turn, gateway.speech.types
and gateway.ssml)."""

_PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
forbidden = json.loads(sys.argv[2])
print(json.dumps([name for name in forbidden if name in sys.modules]))
"""


def loaded_by(module: str) -> list[str]:
    """The FORBIDDEN modules in ``sys.modules`` after a fresh interpreter imports ``module``."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, module, json.dumps(FORBIDDEN)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"importing {module} failed:\n{done.stderr}"
    loaded: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return loaded


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def test_every_known_adapter_is_found() -> None:
    """The glob finds the adapters (the checks below are not vacuous)."""
    assert {_name(p) for p in PROTOCOLS} >= KNOWN


def test_probe_sees_a_forbidden_import() -> None:
    """The probe itself works: the turn engine loads asyncio, redis and itself."""
    loaded = loaded_by("gateway.conversation")
    assert {"asyncio", "redis", "gateway.conversation", "gateway.sessions"} <= set(loaded)


@pytest.mark.parametrize("path", PROTOCOLS, ids=_name)
def test_protocol_imports_nothing_impure(path: Path) -> None:
    module = module_name(path)
    loaded = loaded_by(module)
    assert not loaded, f"importing {module} loaded {', '.join(loaded)}"


def _imported(tree: ast.AST) -> list[str]:
    """Every module an ``import``/``from ... import`` names, anywhere in ``tree``."""
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", PROTOCOLS, ids=_name)
def test_protocol_names_no_impure_gateway_module(path: Path) -> None:
    """Not even under ``if TYPE_CHECKING:`` or inside a function."""
    bad = sorted(
        {
            impure
            for name in _imported(ast.parse(path.read_text(encoding="utf-8")))
            for impure in IMPURE_GATEWAY
            if name == impure or name.startswith(impure + ".")
        }
    )
    assert not bad, f"{module_name(path)} imports {', '.join(bad)}"
