"""Twilio calls under load: ``bench/carrier_calls.py`` with ``--carriers twilio``.

How many concurrent Twilio calls (μ-law 8 kHz, JSON + base64 frames) one gateway
process carries on one core, beside a bare relay; every option of carrier_calls.py
applies (``--old /work/main``, ``--carriers twilio,vonage``, ...).

    python bench/twilio_calls.py [--calls 25,50,75,100,150] [--seconds 15] [--stt-cpu-ms 10]
        [--old /work/main]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from carrier_calls import main

if __name__ == "__main__":
    main(carriers="twilio")
