"""``gateway serve`` with the benchmarks' local Alexa and Google keys: what users run.

The app is :func:`bench.voice_assistants.gateway_app` (the verifier factories trust the
local PKI of BENCH_PKI_DIR, see that module), served by :func:`gateway.cli.serve`
exactly as ``gateway serve`` serves the gateway: its logging (GATEWAY_LOG_LEVEL, INFO
by default: one line per turn), its protocol classes (deadlines, connection cap) and
its shutdown. Settings come from GATEWAY_* as for ``gateway serve``.

    BENCH_PKI_DIR=... python bench/pki_serve.py --port 8080

A checkout measured with it (first on PYTHONPATH, as bench/turn_instructions.py
``--old`` runs one) needs ``gateway.cli.serve``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # a PYTHONPATH tree comes first
from bench.voice_assistants import gateway_app
from gateway.cli import serve
from gateway.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    serve(Settings(port=port), app=gateway_app())  # the app's settings: GATEWAY_* alone


if __name__ == "__main__":
    main()
