"""deploy/: what can be checked without a container engine or a cluster.

Every YAML file parses; every STEPLOG_* variable set by the image, the compose
file and the Kubernetes manifests is a real setting (a field of
ingest.config.Config) with a value the service accepts; ports, probes,
selectors, names and grace periods agree with each other and with the
service's configuration; the image runs the console script pyproject.toml
defines. Where kubectl or promtool is installed, they render or check the
files too.

Security defaults: compose and Kubernetes run with tokens (auth=token) and
TLS on the gRPC port and /metrics (basic auth), their secrets (database
password, token pepper, certificates, /metrics users) come from Secrets or
deploy/.env, never from the files themselves, and nothing under deploy/
(but deploy/local, the loopback development stack) opts in to running
without authentication.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from ingest import config, healthcheck
from ingest.server import Service
from tests.support import ROOT

DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
PROMETHEUS = DEPLOY / "prometheus"
YAML_FILES = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
STEPLOG_SERVICES = ("steplog-1", "steplog-2")
ENV_EXAMPLE = DEPLOY / ".env.example"
CERT_SCRIPT = DEPLOY / "certs" / "make-dev-certs.sh"
# Manifests applied on their own, not by kustomization.yaml.
K8S_OPTIONAL = {"secret.example.yaml", "certificate.yaml"}

# Every setting the service reads: STEPLOG_<FIELD_UPPER> for each Config field.
SETTINGS = {"STEPLOG_" + f.name.upper() for f in fields(config.Config)}


def is_setting(name: str) -> bool:
    return name.startswith("STEPLOG_")


def port_of(listen: str) -> int:
    return int(listen.rpartition(":")[2])


def checked_config(env: Mapping[str, str], where: str) -> config.Config:
    """The Config the service would build from `env`: only real settings, valid values."""
    steplog = {k: str(v) for k, v in env.items() if k.startswith("STEPLOG_")}
    unknown = sorted(set(steplog) - SETTINGS)
    assert not unknown, f"{where}: not settings of ingest.config.Config: {unknown}"
    try:
        return config.from_sources(None, steplog)
    except config.ConfigError as exc:
        pytest.fail(f"{where}: the service would refuse this configuration: {exc}")


def duration_s(text: str) -> float:
    """A compose duration such as '30s', '1m30s' or '1500ms'."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


# --- YAML -------------------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path: Path) -> None:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected mappings"


def test_the_deploy_files_exist() -> None:
    for rel in (
        "compose.yaml",
        "README.md",
        "docker/Dockerfile",
        "docker/Dockerfile.dockerignore",
        "seaweedfs/s3.json",
        "prometheus/prometheus.compose.yml",
        "prometheus/prometheus.k8s.yml",
        "k8s/kustomization.yaml",
        "k8s/secret.example.yaml",
        "k8s/certificate.yaml",
        ".env.example",
        "certs/make-dev-certs.sh",
        "certs/generated/.gitignore",
    ):
        assert (DEPLOY / rel).is_file(), rel


# --- Dockerfile ---------------------------------------------------------------


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends in a continuation"
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in dockerfile_instructions():
        if ins[0] == "FROM":
            result.append([])
        assert result, "an instruction before the first FROM"
        result[-1].append(ins)
    return result


def final_stage() -> list[tuple[str, str]]:
    return stages()[-1]


def one(stage: list[tuple[str, str]], name: str) -> str:
    found = [args for ins, args in stage if ins == name]
    assert len(found) == 1, f"expected one {name} in the final stage, found {found}"
    return found[0]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for ins, args in final_stage():
        if ins == "ENV":
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                assert sep, f"use ENV KEY=VALUE: {item!r}"
                env[key] = value
    return env


def image_cmd() -> list[str]:
    cmd = json.loads(one(final_stage(), "CMD"))
    assert isinstance(cmd, list) and all(isinstance(c, str) for c in cmd)
    return cmd


def test_dockerfile_is_multi_stage_on_python_3_11_slim() -> None:
    froms = [s[0][1].split() for s in stages()]
    assert len(froms) >= 2, "expected a build stage and a runtime stage"
    for words in froms:
        assert words[0] == "python:3.11-slim" or words[0].startswith("python:3.11-slim@")
    names = [w[2] for w in froms if len(w) == 3 and w[1].upper() == "AS"]
    copies = [args for ins, args in final_stage() if ins == "COPY" and "--from=" in args]
    assert copies and all(c.split()[0].removeprefix("--from=") in names for c in copies)


def test_dockerfile_installs_the_server_extra_from_the_repo() -> None:
    build = " ".join(args for ins, args in stages()[0] if ins == "RUN")
    assert "pip install '.[server]'" in build
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "server" in pyproject["project"]["optional-dependencies"]
    # What the build copies exists in the repository, and the context filter lets it in.
    text = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text()
    ignore = [line.strip() for line in text.splitlines() if line.strip()[:1] not in ("", "#")]
    assert ignore[0] == "**", "the context filter should be an allow-list"
    for ins, args in stages()[0]:
        if ins == "COPY" and "--from=" not in args:
            *sources, _dest = shlex.split(args)
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
                allowed = "!" + src.rstrip("/") + ("/" if (ROOT / src).is_dir() else "")
                assert allowed in ignore, f"{src} is not let into the build context"
    for kept_out in (".venv", ".steplog", ".git"):
        assert not any(line.lstrip("!").startswith(kept_out) for line in ignore if line[0] == "!")


def test_dockerfile_cmd_runs_the_console_script_pyproject_defines() -> None:
    cmd = image_cmd()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert cmd[0] in scripts, f"CMD {cmd}: {cmd[0]!r} is not a console script of pyproject.toml"
    assert scripts[cmd[0]] == "ingest.__main__:main"
    assert cmd[1:] == ["serve"]
    assert not [args for ins, args in final_stage() if ins == "ENTRYPOINT"]


def test_dockerfile_runs_as_a_numeric_non_root_user() -> None:
    user = one(final_stage(), "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0, f"USER {user}: numeric, not root"
    assert not gid or (gid.isdigit() and int(gid) > 0)
    assert f"--uid {uid}" in " ".join(args for ins, args in final_stage() if ins == "RUN")


def test_dockerfile_env_exposes_and_healthcheck_agree_with_the_service() -> None:
    env = image_env()
    cfg = checked_config(env, "Dockerfile ENV")
    assert cfg.listen.startswith("0.0.0.0:"), "a container must listen on all interfaces"
    # The image itself does not opt in to running unauthenticated off loopback.
    assert not cfg.allow_unauthenticated_non_loopback
    exposed = {int(p.split("/")[0]) for p in one(final_stage(), "EXPOSE").split()}
    assert exposed == {port_of(cfg.listen), cfg.metrics_port}

    options, _, probe = one(final_stage(), "HEALTHCHECK").partition(" CMD ")
    argv = json.loads(probe)
    assert argv[:3] == ["python", "-m", "ingest.healthcheck"]
    # Without an address the probe dials STEPLOG_LISTEN on loopback.
    assert healthcheck.probe_address(cfg.listen) == f"127.0.0.1:{port_of(cfg.listen)}"
    opts = dict(o.lstrip("-").split("=", 1) for o in options.split())
    probe_timeout = float(argv[argv.index("--timeout") + 1]) if "--timeout" in argv else 3.0
    assert probe_timeout < duration_s(opts["timeout"]), "the probe answers before Docker gives up"


# --- compose ------------------------------------------------------------------


_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?[?-][^}]*)?\}")


def env_example() -> dict[str, str]:
    """The variables deploy/.env must set, with a stand-in value each."""
    names = [
        line.split("=", 1)[0]
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return {name: f"example-{name.lower()}" for name in names}


def compose() -> dict[str, Any]:
    """compose.yaml as compose reads it, with deploy/.env's variables filled in."""
    values = env_example()
    text = COMPOSE.read_text().replace("$$", "\0")

    def fill(match: re.Match[str]) -> str:
        assert match.group(1) in values, f"${{{match.group(1)}}} is not in deploy/.env.example"
        return values[match.group(1)]

    doc = yaml.safe_load(_INTERPOLATION.sub(fill, text).replace("\0", "$$"))
    assert isinstance(doc, dict)
    return doc


def test_compose_secrets_come_from_the_env_file_and_are_required() -> None:
    """The database password, the token pepper and the /metrics password are
    not in compose.yaml: `${VAR:?}` makes compose refuse to start without them."""
    text = COMPOSE.read_text()
    for name in env_example():
        assert f"${{{name}:?}}" in text, f"{name} must be required (${{{name}:?}})"
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line and not line.startswith("#"):
            assert line.endswith("="), f".env.example ships no secret value: {line}"
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def published(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(host ip, host port, container port) of a service's short-syntax ports."""
    out = []
    for item in service.get("ports", []):
        parts = str(item).split(":")
        assert len(parts) == 3, f"publish as HOST_IP:HOST_PORT:CONTAINER_PORT, not {item!r}"
        out.append((parts[0], int(parts[1]), int(parts[2])))
    return out


def test_compose_steplog_variables_are_real_settings() -> None:
    services = compose()["services"]
    with_steplog = [n for n, s in services.items() if any(map(is_setting, compose_env(s)))]
    assert set(STEPLOG_SERVICES) <= set(with_steplog)
    for name in with_steplog:
        checked_config(compose_env(services[name]), f"compose service {name}")


def test_compose_runs_two_replicas_on_their_own_host_ports() -> None:
    services = compose()["services"]
    host_ports: list[int] = []
    for name in STEPLOG_SERVICES:
        svc = services[name]
        cfg = checked_config(compose_env(svc), name)
        assert cfg.auth == "token" and not cfg.allow_unauthenticated_non_loopback
        assert cfg.token_pepper == "example-steplog_token_pepper"
        # TLS on the gRPC port and /metrics, from the certs one-shot's folder
        mounts = dict(str(v).rsplit(":", 2)[:2] for v in svc["volumes"])
        assert mounts["./certs/generated"] == "/certs"
        for path in (cfg.tls_cert, cfg.tls_key, cfg.metrics_tls_cert, cfg.metrics_tls_key):
            assert path.startswith("/certs/"), path
        assert cfg.metrics_basic_auth.startswith("/certs/")
        assert cfg.health_port and cfg.health_port != port_of(cfg.listen)
        assert svc["depends_on"]["certs"]["condition"] == "service_completed_successfully"
        assert svc["build"]["dockerfile"] == "deploy/docker/Dockerfile"
        assert (COMPOSE.parent / svc["build"]["context"] / "pyproject.toml").is_file()
        ports = published(svc)
        targets = {container for _, _, container in ports}
        assert targets == {port_of(cfg.listen), cfg.metrics_port}, name
        for host_ip, host_port, _ in ports:
            # Published on the host's loopback only, by default (README).
            assert host_ip == "127.0.0.1", f"{name} publishes {host_port} beyond loopback"
            host_ports.append(host_port)
        grace = duration_s(svc["stop_grace_period"])
        assert grace >= 2 * cfg.shutdown_grace_s + 5, "RPC grace + pipeline drain + slack"
    assert len(host_ports) == len(set(host_ports)), "two replicas cannot share a host port"


def test_compose_wiring_agrees_between_services() -> None:
    services = compose()["services"]
    env = compose_env(services["steplog-1"])
    cfg = checked_config(env, "steplog-1")
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for volume in svc.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name} mounts missing {source}"

    # The database URL names the TimescaleDB container and its user, password and database.
    db = urlsplit(cfg.database_url)
    pg = compose_env(services["timescaledb"])
    assert db.hostname == "timescaledb" and db.port == 5432
    assert (db.username, db.password, db.path.lstrip("/")) == (
        pg["POSTGRES_USER"],
        pg["POSTGRES_PASSWORD"],
        pg["POSTGRES_DB"],
    )
    assert services["timescaledb"]["image"].startswith("timescale/timescaledb")

    # S3: the endpoint is the SeaweedFS container, its keys are an identity, the bucket is made.
    s3 = urlsplit(cfg.s3_endpoint)
    weed = services["seaweedfs"]
    assert weed["image"].startswith("chrislusf/seaweedfs")
    assert s3.hostname == "seaweedfs" and f"-s3.port={s3.port}" in weed["command"]
    assert "server" in weed["command"] and "-s3" in weed["command"]
    identities = json.loads((DEPLOY / "seaweedfs" / "s3.json").read_text())["identities"]
    keys = {(c["accessKey"], c["secretKey"]) for i in identities for c in i["credentials"]}
    assert (cfg.s3_access_key, cfg.s3_secret_key) in keys
    assert compose_env(services["s3-bucket"])["BUCKET"] == cfg.s3_bucket
    assert services["steplog-1"]["depends_on"]["s3-bucket"]["condition"] == (
        "service_completed_successfully"
    )


def test_compose_prometheus_scrapes_every_replica_with_the_shipped_rules() -> None:
    services = compose()["services"]
    prom = services["prometheus"]
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in prom["volumes"]}
    flag = next(a for a in prom["command"] if a.startswith("--config.file="))
    container_path = flag.split("=", 1)[1]
    mount_dir = next(m for m in mounts if container_path.startswith(m + "/"))
    host_file = COMPOSE.parent / mounts[mount_dir] / container_path[len(mount_dir) + 1 :]
    assert host_file == PROMETHEUS / "prometheus.compose.yml"

    doc = yaml.safe_load(host_file.read_text())
    for rules in doc["rule_files"]:
        assert (host_file.parent / rules).is_file()
    # HTTPS with basic auth, with the CA and password the certs one-shot makes
    assert mounts["/certs"] == "./certs/generated"
    for job in doc["scrape_configs"]:
        assert job["scheme"] == "https"
        assert job["tls_config"]["ca_file"] == "/certs/ca.crt"
        assert job["basic_auth"]["password_file"] == "/certs/prometheus-password"
        assert "password" not in job["basic_auth"], "never a password in the file"
    certs = services["certs"]
    assert certs["entrypoint"][1] == "/work/make-dev-certs.sh"
    assert "./certs:/work" in certs["volumes"]
    static = [sc for job in doc["scrape_configs"] for sc in job["static_configs"]]
    targets = {t for sc in static for t in sc["targets"]}
    expected = set()
    for name in STEPLOG_SERVICES:
        cfg = checked_config(compose_env(services[name]), name)
        expected.add(f"{name}:{cfg.metrics_port}")
    assert targets == expected


@pytest.mark.parametrize("name", ["prometheus.compose.yml", "prometheus.yml"])
def test_promtool_accepts_the_prometheus_configs(name: str) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make setup` installs Debian's prometheus"
    out = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS / name)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


# --- Kubernetes ---------------------------------------------------------------


def k8s_docs() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def k8s(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        doc
        for _, doc in k8s_docs()
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def mounted_secrets() -> dict[str, str]:
    """Secret name -> where the container mounts it."""
    pod = k8s("Deployment")["spec"]["template"]["spec"]
    by_volume = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    return {
        by_volume[m["name"]]: m["mountPath"]
        for m in container()["volumeMounts"]
        if m["name"] in by_volume
    }


def container() -> dict[str, Any]:
    containers = k8s("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


def k8s_env() -> dict[str, str]:
    """What the container's environment would hold: ConfigMap, Secret template, env."""
    env: dict[str, str] = {}
    sources = {
        ("ConfigMap", k8s("ConfigMap")["metadata"]["name"]): k8s("ConfigMap")["data"],
        ("Secret", "steplog-ingest"): k8s("Secret", "steplog-ingest")["stringData"],
    }
    for ref in container()["envFrom"]:
        kind = "ConfigMap" if "configMapRef" in ref else "Secret"
        name = ref["configMapRef" if kind == "ConfigMap" else "secretRef"]["name"]
        assert (kind, name) in sources, f"envFrom names a missing {kind} {name}"
        env.update(sources[(kind, name)])
    for item in container().get("env", []):
        env[item["name"]] = str(item.get("value", ""))
    return env


def k8s_config() -> config.Config:
    return checked_config(k8s_env(), "deploy/k8s")


def test_k8s_manifests_have_kinds_names_and_one_namespace() -> None:
    kinds = set()
    for path, doc in k8s_docs():
        assert {"apiVersion", "kind", "metadata"} <= set(doc), path
        kinds.add(doc["kind"])
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "steplog", f"{path}: namespace"
    assert kinds == {
        "Namespace",
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "Certificate",
    }


def test_k8s_steplog_variables_are_real_settings() -> None:
    cfg = k8s_config()
    assert cfg.listen.startswith("0.0.0.0:")
    assert cfg.auth == "token" and not cfg.allow_unauthenticated_non_loopback
    # The Secret holds the secrets, the ConfigMap does not.
    data = k8s("ConfigMap")["data"]
    secret = k8s("Secret", "steplog-ingest")["stringData"]
    for name in (
        "STEPLOG_DATABASE_URL",
        "STEPLOG_S3_ACCESS_KEY",
        "STEPLOG_S3_SECRET_KEY",
        "STEPLOG_TOKEN_PEPPER",
    ):
        assert name not in data and name in secret
    assert "CHANGE-ME" in secret["STEPLOG_DATABASE_URL"], "the template holds no real password"


def test_k8s_tls_and_metrics_auth_come_from_mounted_secrets() -> None:
    cfg = k8s_config()
    mounts = mounted_secrets()
    tls_dir = mounts["steplog-ingest-tls"]
    assert cfg.tls_cert == f"{tls_dir}/tls.crt" and cfg.tls_key == f"{tls_dir}/tls.key"
    assert (cfg.metrics_tls_cert, cfg.metrics_tls_key) == (cfg.tls_cert, cfg.tls_key)
    assert cfg.metrics_basic_auth == mounts["steplog-metrics-auth"] + "/users"
    assert "users" in k8s("Secret", "steplog-metrics-auth")["stringData"]
    # mTLS is one uncommented line away, from the same Secret (cert-manager's ca.crt)
    assert f'# STEPLOG_TLS_CLIENT_CA: "{tls_dir}/ca.crt"' in (K8S / "configmap.yaml").read_text()
    pod = k8s("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    for m in container()["volumeMounts"]:
        if m["mountPath"] in mounts.values():
            assert m["readOnly"] is True and "subPath" not in m, "renewals must show up"
    # cert-manager's Certificate fills that Secret, for the names clients dial
    cert = k8s("Certificate")["spec"]
    assert cert["secretName"] == "steplog-ingest-tls"
    svc = k8s("Service")["metadata"]
    assert f"{svc['name']}.{svc['namespace']}.svc.cluster.local" in cert["dnsNames"]
    assert "server auth" in cert["usages"]


def test_k8s_ports_match_listen_and_metrics_port() -> None:
    cfg = k8s_config()
    grpc_port, metrics_port = port_of(cfg.listen), cfg.metrics_port
    c = container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": grpc_port, "metrics": metrics_port, "health": cfg.health_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # kubelet's gRPC probe speaks no TLS: the plaintext health-only port
        assert c[probe]["grpc"]["port"] == cfg.health_port, f"{probe}: native gRPC probe"
        assert "service" not in c[probe]["grpc"], "the whole server's health, as the service sets"

    svc = k8s("Service")["spec"]
    (sp,) = svc["ports"]
    target = sp["targetPort"]
    assert (ports[target] if isinstance(target, str) else target) == grpc_port
    assert sp["port"] == grpc_port

    annotations = k8s("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == metrics_port
    assert annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/scheme"] == "https"

    rules = k8s("NetworkPolicy")["spec"]["ingress"]
    allowed = {p["port"] for rule in rules for p in rule["ports"]}
    assert allowed == {grpc_port, metrics_port}, "the health port is for kubelet only"


def test_k8s_service_is_headless_and_selects_the_pods() -> None:
    labels = k8s("Deployment")["spec"]["template"]["metadata"]["labels"]

    def selects(selector: Mapping[str, str]) -> bool:
        return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

    dep = k8s("Deployment")["spec"]
    assert selects(dep["selector"]["matchLabels"])
    svc = k8s("Service")["spec"]
    assert svc["clusterIP"] == "None", "headless: clients balance gRPC calls over pod IPs"
    assert not svc.get("publishNotReadyAddresses", False)
    assert selects(svc["selector"])
    assert selects(k8s("PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    assert selects(k8s("NetworkPolicy")["spec"]["podSelector"]["matchLabels"])
    for constraint in k8s("Deployment")["spec"]["template"]["spec"]["topologySpreadConstraints"]:
        assert selects(constraint["labelSelector"]["matchLabels"])


def test_k8s_replicas_pdb_and_hpa_fit_together() -> None:
    dep = k8s("Deployment")
    hpa = k8s("HorizontalPodAutoscaler")["spec"]
    pdb = k8s("PodDisruptionBudget")["spec"]
    ref = hpa["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])
    assert 2 <= hpa["minReplicas"] <= dep["spec"]["replicas"] <= hpa["maxReplicas"]
    # A drain can always proceed, and never takes the last pod.
    assert pdb["maxUnavailable"] < hpa["minReplicas"]
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # The HPA's CPU target is relative to a request.
    assert "cpu" in container()["resources"]["requests"]
    assert "memory" in container()["resources"]["limits"]


def test_k8s_termination_grace_covers_prestop_and_shutdown_grace() -> None:
    cfg = k8s_config()
    pod = k8s("Deployment")["spec"]["template"]["spec"]
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    # On SIGTERM: in-flight RPCs get the grace, then the pipeline drains for up to as long.
    needed = pre_stop + 2 * cfg.shutdown_grace_s + 5
    assert pod["terminationGracePeriodSeconds"] >= needed
    # ... and not wildly more, so it keeps matching STEPLOG_SHUTDOWN_GRACE_S.
    assert pod["terminationGracePeriodSeconds"] <= needed + 30


def test_k8s_pod_runs_the_image_as_its_non_root_user() -> None:
    pod = k8s("Deployment")["spec"]["template"]["spec"]
    uid, _, gid = one(final_stage(), "USER").partition(":")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(uid)
    assert pod["securityContext"]["runAsGroup"] == int(gid or uid)
    c = container()
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c.get("command") is None and c["args"] == image_cmd()
    image = c["image"].rsplit(":", 1)[0]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert image in {i["name"] for i in kustomization["images"]}


def test_kustomization_lists_every_manifest_but_the_secret_template() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests - K8S_OPTIONAL


def test_kubectl_kustomize_renders_the_manifests() -> None:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing: `make setup` installs Debian's kubernetes-client"
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    kinds = {d["kind"] for d in yaml.safe_load_all(out.stdout) if d}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds


def test_prometheus_k8s_config_keeps_annotated_pods_on_their_metrics_port() -> None:
    doc = yaml.safe_load((PROMETHEUS / "prometheus.k8s.yml").read_text())
    (job,) = doc["scrape_configs"]
    for rules in doc["rule_files"]:
        assert (PROMETHEUS / rules).is_file()
    # HTTPS with basic auth; pods are scraped by IP, verified by the Service name
    assert job["scheme"] == "https"
    assert job["tls_config"]["server_name"] in k8s("Certificate")["spec"]["dnsNames"]
    assert "ca_file" in job["tls_config"] and "password_file" in job["basic_auth"]
    relabel = job["relabel_configs"]
    annotations = k8s("Deployment")["spec"]["template"]["metadata"]["annotations"]

    def meta(annotation: str) -> str:
        return "__meta_kubernetes_pod_annotation_" + re.sub(r"[^a-zA-Z0-9_]", "_", annotation)

    keep = next(r for r in relabel if r.get("action") == "keep")
    assert keep["source_labels"] == [meta("prometheus.io/scrape")]
    assert re.fullmatch(keep["regex"], annotations["prometheus.io/scrape"])
    address = next(r for r in relabel if r.get("target_label") == "__address__")
    assert address["source_labels"] == ["__address__", meta("prometheus.io/port")]
    pod_port = container()["ports"][0]["containerPort"]
    joined = f"10.1.2.3:{pod_port};{annotations['prometheus.io/port']}"
    match = re.fullmatch(address["regex"], joined)
    assert match is not None
    assert match.expand(address["replacement"].replace("$", "\\")) == "10.1.2.3:" + str(
        k8s_config().metrics_port
    )


# --- the non-loopback opt-in and the probe's address ----------------------------


def test_nothing_in_deploy_runs_without_authentication() -> None:
    """auth=none stays with the loopback development stack (deploy/local)."""
    for path in sorted(DEPLOY.rglob("*")):
        if not path.is_file() or path.is_relative_to(DEPLOY / "local") or path.suffix == ".md":
            continue
        text = path.read_text(errors="replace")
        for line in text.splitlines():
            code = line.split("#", 1)[0]
            assert "ALLOW_UNAUTHENTICATED_NON_LOOPBACK" not in code, f"{path}: {line}"
            assert not re.search(r"STEPLOG_AUTH\W+none", code), f"{path}: {line}"


def test_the_dev_certificate_script_makes_what_the_service_and_prometheus_use(
    tmp_path: Path,
) -> None:
    from ingest import tls
    from ingest.observe.metrics_http import parse_basic_auth

    assert shutil.which("openssl"), "openssl is missing (Debian: openssl)"
    out = tmp_path / "generated"
    env = {"PATH": "/usr/bin:/bin", "METRICS_PASSWORD": "a-long-random-password"}
    done = subprocess.run(["sh", str(CERT_SCRIPT), str(out)], env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    cfg = config.Config(tls_cert=str(out / "server.crt"), tls_key=str(out / "server.key"))
    assert tls.server_credentials(cfg) is not None
    users = parse_basic_auth(str(out / "metrics-users"))
    assert users["prometheus"].matches((out / "prometheus-password").read_text())
    text = (out / "server.crt").read_bytes()
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(out / "ca.crt"), str(out / "server.crt")],
        capture_output=True,
    )
    assert verify.returncode == 0 and text
    names = subprocess.run(
        ["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", str(out / "server.crt")],
        capture_output=True,
        text=True,
    ).stdout
    for name in (*STEPLOG_SERVICES, "localhost", "127.0.0.1"):
        assert name in names
    # a second run keeps what exists
    before = (out / "server.crt").read_bytes()
    assert subprocess.run(["sh", str(CERT_SCRIPT), str(out)], env=env).returncode == 0
    assert (out / "server.crt").read_bytes() == before


def test_unauthenticated_non_loopback_is_off_unless_asked_for() -> None:
    assert config.Config().allow_unauthenticated_non_loopback is False
    name = "STEPLOG_ALLOW_UNAUTHENTICATED_NON_LOOPBACK"
    for text, value in (("true", True), ("1", True), ("On", True), ("false", False), ("0", False)):
        assert config.from_sources(None, {name: text}).allow_unauthenticated_non_loopback is value
    with pytest.raises(config.ConfigError, match=name):
        config.from_sources(None, {name: "sure"})


def test_the_service_refuses_a_public_address_without_the_opt_in() -> None:
    cfg = config.Config(listen="0.0.0.0:50051")
    with pytest.raises(SystemExit, match="STEPLOG_ALLOW_UNAUTHENTICATED_NON_LOOPBACK"):
        asyncio.run(Service(cfg).start())


@pytest.mark.parametrize(
    "listen,address",
    [
        ("0.0.0.0:50051", "127.0.0.1:50051"),
        ("[::]:7000", "[::1]:7000"),
        (":7000", "127.0.0.1:7000"),
        ("127.0.0.1:7000", "127.0.0.1:7000"),
        ("steplog-1:50051", "steplog-1:50051"),
    ],
)
def test_healthcheck_dials_wildcards_on_loopback(listen: str, address: str) -> None:
    assert healthcheck.probe_address(listen) == address


def test_healthcheck_dials_the_health_port_when_there_is_one() -> None:
    env = {"STEPLOG_LISTEN": "0.0.0.0:50051", "STEPLOG_HEALTH_PORT": "50052"}
    assert healthcheck.default_address(env) == "127.0.0.1:50052"
    assert healthcheck.default_address({"STEPLOG_LISTEN": "0.0.0.0:50051"}) == "127.0.0.1:50051"
    assert healthcheck.default_address({**env, "STEPLOG_HEALTH_PORT": "0"}) == "127.0.0.1:50051"


def test_healthcheck_rejects_a_bad_listen_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEPLOG_LISTEN", "nowhere")
    with pytest.raises(SystemExit) as exc:
        healthcheck.main([])
    assert exc.value.code == 2


def test_deploy_sweeps_unreferenced_blobs() -> None:
    """deploy/ gives each database its own bucket, so the sweep of blobs no row
    references is on there (it is off by default: a bucket shared by several
    databases would lose blobs the other databases reference)."""
    assert k8s_config().blob_sweep_interval_s > 0
    for name in STEPLOG_SERVICES:
        cfg = checked_config(compose_env(compose()["services"][name]), f"compose service {name}")
        assert cfg.blob_sweep_interval_s > 0
