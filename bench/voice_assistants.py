"""Voice-assistant webhooks under load: /alexa and /google against a bare FastAPI baseline.

Starts, one after the other, each as its own uvicorn process pinned to one core when
possible: (1) a bare FastAPI app answering ``POST /alexa`` and ``POST /google`` with a
fixed JSON body (:data:`baseline_app`), (2) the gateway with Redis sessions and the demo
pipeline (:func:`gateway_app`). It drives N concurrent conversations of 4 turns each
(one keep-alive connection each, from a minimal asyncio HTTP/1.1 client on the other
core: httpx's connection pool, not the servers, limits the load at this concurrency)
against each endpoint and prints requests per second, p50/p99 latency, and the
gateway's throughput as a ratio of the baseline's. Every gateway answer is checked
(the demo must remember each user's name), so lost or crossed turns count as failures.

Verification is ON for both endpoints, with local keys injected the way tests do:

- Alexa: this script makes a root CA, an intermediate and a leaf (SAN
  echo-api.amazon.com) and writes the root and the chain to a temporary folder named
  by ``BENCH_PKI_DIR``. :func:`gateway_app` (``uvicorn --factory``) builds the normal
  app and sets ``app.state.alexa_verifier_factory`` to an AlexaVerifier trusting that
  root, whose fetcher returns the chain file for the request's SignatureCertChainUrl.
  The chain is fetched and verified once, then cached (as Amazon's is in production),
  so each request costs the cheap checks plus one RSA signature verification. Request
  bodies are signed with the leaf key before the clock starts.
- Google: a local RSA key and self-signed certificate; the gateway's
  ``app.state.google_verifier_factory`` gives a GoogleVerifier with a StaticCertSource
  holding it; every request carries one JWT (aud = the project id) made up front.

    python bench/voice_assistants.py [--conversations 200] [--redis redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fastapi import FastAPI
from fastapi.responses import JSONResponse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.loadgen import Connection, free_port, report, start

ROOT = Path(__file__).resolve().parents[1]
SKILL_ID = "amzn1.ask.skill.bench-0000-0000-0000-000000000000"
PROJECT = "gateway-bench"
KID = "bench-key"
CERT_URL = "https://s3.amazonaws.com/echo.api/echo-api-cert-bench.pem"

# --------------------------------------------------------------------- the servers

baseline_app = FastAPI()
_ALEXA_ANSWER = {
    "version": "1.0",
    "response": {"outputSpeech": {"type": "SSML", "ssml": "<speak>Hello.</speak>"}},
}
_GOOGLE_ANSWER = {"prompt": {"firstSimple": {"speech": "<speak>Hello.</speak>", "text": "Hello."}}}


@baseline_app.post("/alexa")
async def baseline_alexa() -> JSONResponse:
    return JSONResponse(_ALEXA_ANSWER)


@baseline_app.post("/google")
async def baseline_google() -> JSONResponse:
    return JSONResponse(_GOOGLE_ANSWER)


@baseline_app.get("/healthz")
async def baseline_health() -> dict[str, str]:
    return {"status": "ok"}


class _FileFetcher:
    """Serves the local chain for CERT_URL (adapters.alexa.verify.CertChainFetcher)."""

    def __init__(self, chain: bytes) -> None:
        self.chain = chain

    async def fetch(self, url: str) -> bytes:
        if url != CERT_URL:
            raise OSError(f"no chain at {url}")
        return self.chain


def gateway_app() -> FastAPI:
    """The gateway (settings from GATEWAY_* env) with the local PKI of BENCH_PKI_DIR injected."""
    from cryptography.x509.verification import Store

    from adapters.alexa.verify import AlexaVerifier
    from adapters.google.verify import GoogleVerifier, StaticCertSource
    from gateway.app import create_app

    folder = Path(os.environ["BENCH_PKI_DIR"])
    root = x509.load_pem_x509_certificate((folder / "root.pem").read_bytes())
    chain = (folder / "chain.pem").read_bytes()
    google_cert = (folder / "google.pem").read_text()
    app = create_app(freeze_gc=True)  # as gateway serve makes it
    app.state.alexa_verifier_factory = lambda s: AlexaVerifier(
        s.alexa_skill_ids, trust_store=Store([root]), fetcher=_FileFetcher(chain)
    )
    app.state.google_verifier_factory = lambda s: GoogleVerifier(
        s.google_project_ids, StaticCertSource({KID: google_cert})
    )
    return app


# ------------------------------------------------------------------------ the keys


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _cert(
    subject: str,
    key: rsa.RSAPrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: rsa.RSAPrivateKey,
    *,
    ca: bool,
    san: str | None = None,
) -> x509.Certificate:
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    usage = dict.fromkeys(
        (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    usage.update(digital_signature=True, key_cert_sign=ca, crl_sign=ca, key_encipherment=not ca)
    builder = builder.add_extension(x509.KeyUsage(**usage), critical=True)
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class Keys:
    """The local Alexa PKI and Google key, written to ``folder`` for the gateway process."""

    def __init__(self, folder: Path) -> None:
        root_key, inter_key, self.leaf_key, self.google_key = _key(), _key(), _key(), _key()
        root = _cert("Bench Root CA", root_key, None, root_key, ca=True)
        inter = _cert("Bench Server CA", inter_key, root, root_key, ca=True)
        san = "echo-api.amazon.com"
        leaf = _cert(san, self.leaf_key, inter, inter_key, ca=False, san=san)
        google = _cert("accounts.google.bench", self.google_key, None, self.google_key, ca=False)
        (folder / "root.pem").write_bytes(_pem(root))
        (folder / "chain.pem").write_bytes(_pem(leaf) + _pem(inter))
        (folder / "google.pem").write_bytes(_pem(google))

    def alexa_headers(self, body: bytes) -> dict[str, str]:
        signature = self.leaf_key.sign(body, padding.PKCS1v15(), hashes.SHA256())
        return {
            "Content-Type": "application/json",
            "SignatureCertChainUrl": CERT_URL,
            "Signature-256": base64.b64encode(signature).decode(),
        }

    def google_token(self) -> str:
        from google.auth import crypt, jwt

        private = self.google_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        signer = crypt.RSASigner.from_string(private, KID)
        now = int(time.time())
        claims = {
            "iss": "https://accounts.google.com",
            "aud": PROJECT,
            "iat": now,
            "nbf": now - 10,
            "exp": now + 3600,
        }
        token: bytes = jwt.encode(signer, claims)
        return token.decode()


# --------------------------------------------------------------------- the requests

Turn = tuple[bytes, dict[str, str], str | None]
"""(body, headers, the text the answer must say or None for any)."""


def alexa_conversation(keys: Keys, i: int) -> list[Turn]:
    session = f"amzn1.echo-api.session.bench-{secrets.token_hex(6)}-{i}"

    def request(kind: str, intent: str | None = None, text: str | None = None) -> bytes:
        req: dict[str, Any] = {
            "type": kind,
            "requestId": f"amzn1.echo-api.request.{secrets.token_hex(8)}",
            "timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "locale": "en-US",
        }
        if intent:
            slots = {"query": {"name": "query", "value": text}} if text else {}
            req["intent"] = {"name": intent, "slots": slots}
        envelope = {
            "version": "1.0",
            "session": {
                "new": kind == "LaunchRequest",
                "sessionId": session,
                "application": {"applicationId": SKILL_ID},
                "user": {"userId": f"amzn1.ask.account.bench{i}"},
            },
            "context": {"System": {"application": {"applicationId": SKILL_ID}}},
            "request": req,
        }
        return json.dumps(envelope).encode()

    catch_all = "CatchAllIntent"
    turns = [
        (request("LaunchRequest"), None),
        (request("IntentRequest", catch_all, f"my name is User{i}"), f"Nice to meet you, User{i}."),
        (request("IntentRequest", catch_all, "what is my name"), f"Your name is User{i}."),
        (request("IntentRequest", "AMAZON.StopIntent"), f"Goodbye, User{i}!"),
    ]
    return [(body, keys.alexa_headers(body), want) for body, want in turns]


def google_conversation(token: str, i: int) -> list[Turn]:
    session = f"bench-{secrets.token_hex(6)}-{i}"
    headers = {"Content-Type": "application/json", "Google-Assistant-Signature": token}

    def request(intent: str, query: str = "") -> bytes:
        return json.dumps(
            {
                "handler": {"name": "gateway"},
                "intent": {"name": intent, "params": {}, "query": query},
                "scene": {"name": "Conversation"},
                "session": {"id": session, "params": {}},
                "user": {"locale": "en-US"},
            }
        ).encode()

    return [
        (request("actions.intent.MAIN"), headers, None),
        (request("FreeText", f"my name is User{i}"), headers, f"Nice to meet you, User{i}."),
        (request("FreeText", "what is my name"), headers, f"Your name is User{i}."),
        (request("actions.intent.CANCEL", "cancel"), headers, f"Goodbye, User{i}!"),
    ]


def _alexa_says(data: dict[str, Any]) -> str:
    ssml = data["response"]["outputSpeech"]["ssml"]
    return str(ssml).removeprefix("<speak>").removesuffix("</speak>")


def _google_says(data: dict[str, Any]) -> str:
    return str(data["prompt"]["firstSimple"]["text"])


# ------------------------------------------------------------------------ driving


async def drive(
    port: int,
    path: str,
    conversations: list[list[Turn]],
    says: Callable[[dict[str, Any]], str],
    *,
    check: bool,
) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    failures = 0

    async def conversation(turns: list[Turn]) -> None:
        nonlocal failures
        connection = await Connection.open("127.0.0.1", port)
        try:
            for body, headers, want in turns:
                t0 = time.perf_counter()
                status, answer = await connection.post(path, body, headers)
                latencies.append(time.perf_counter() - t0)
                good = status == 200
                if good and check and want is not None:
                    good = says(json.loads(answer)) == want
                failures += not good
        finally:
            await connection.close()

    t0 = time.perf_counter()
    jobs: list[Awaitable[None]] = [conversation(c) for c in conversations]
    await asyncio.gather(*jobs)
    return time.perf_counter() - t0, latencies, failures


def run(
    name: str, cmd: list[str], env: dict[str, str], keys: Keys, n: int, *, check: bool
) -> dict[str, float]:
    port = free_port()
    proc = start([*cmd, "--port", str(port)], env, port)
    rates: dict[str, float] = {}
    try:
        token = keys.google_token()
        for endpoint, make, says in (
            ("alexa", lambda i: alexa_conversation(keys, i), _alexa_says),
            ("google", lambda i: google_conversation(token, i), _google_says),
        ):
            warm = [make(i) for i in range(20)]
            asyncio.run(drive(port, f"/{endpoint}", warm, says, check=check))
            conversations = [make(i) for i in range(n)]  # signed before the clock starts
            elapsed, lat, failures = asyncio.run(
                drive(port, f"/{endpoint}", conversations, says, check=check)
            )
            rates[endpoint] = report(f"{name}: /{endpoint}", elapsed, lat, failures)
    finally:
        proc.terminate()
        proc.wait(10)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument(
        "--redis", default=os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    args = parser.parse_args()
    n = args.conversations
    if sys.platform == "linux" and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})  # the load generator stays off the server's core
    print(
        f"{n} concurrent conversations x 4 turns per endpoint; verification ON (local keys, "
        "chain cached); demo pipeline, Redis sessions; each server on one core (taskset -c 0)"
    )
    uvicorn = [sys.executable, "-m", "uvicorn", "--log-level", "warning"]
    with tempfile.TemporaryDirectory() as folder:
        keys = Keys(Path(folder))
        base = run(
            "bare FastAPI baseline",
            [*uvicorn, "bench.voice_assistants:baseline_app"],
            {},
            keys,
            n,
            check=False,
        )
        env = {
            "BENCH_PKI_DIR": folder,
            "GATEWAY_REDIS_URL": args.redis,
            "GATEWAY_REDIS_PREFIX": f"bench-{secrets.token_hex(4)}",
            "GATEWAY_ALEXA_SKILL_IDS": SKILL_ID,
            "GATEWAY_GOOGLE_PROJECT_IDS": PROJECT,
        }
        gw = run(
            "gateway, Redis",
            [*uvicorn, "--factory", "bench.voice_assistants:gateway_app"],
            env,
            keys,
            n,
            check=True,
        )
    print(
        f"ratio to baseline: /alexa {gw['alexa'] / base['alexa']:.2f}, "
        f"/google {gw['google'] / base['google']:.2f}"
    )


if __name__ == "__main__":
    main()
