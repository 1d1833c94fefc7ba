#!/usr/bin/env python3
"""Offline checks of the jobbroker Helm chart, run by broker/tests/helm_chart.rs (no cluster, no helm binary).

    chart_check.py check            lint, schema, render, Kubernetes 1.30 validation, properties, Dockerfile
    chart_check.py render VALUES    the manifests rendered with a values file (or `default`), as JSON on stdout
    chart_check.py certs DIR NAME…  a CA, a server certificate for NAME… and a client certificate, as PEM files

`check` reports every failure it finds, then exits 1. The Deployments' behaviour with the real binaries is the Rust
test's part; this script checks what the rendered objects say.
"""

import datetime
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pydeps

pydeps.ensure()

import helm_python as helm  # noqa: E402
import kubernetes_validate  # noqa: E402
import yaml  # noqa: E402

try:
    import tomllib  # noqa: E402
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # noqa: E402

from crd_checks import CRD_CHECKS  # noqa: E402

HERE = Path(__file__).resolve().parent
CHART = HERE.parent / "jobbroker"
REPO = HERE.parents[1]
KUBERNETES = "1.30.0"
RELEASE, NAMESPACE = "rel", "jobs"
# Values files every check runs with: the defaults and each file of ci/.
VALUE_SETS = ["default"] + sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
BUILD_COMMAND = "cargo build --release --locked -p broker -p worker-agent -p jobctl"

failures: list[str] = []


def fail(message: str) -> None:
    failures.append(message)


def load_values(name: str) -> dict:
    if name == "default":
        return {}
    path = Path(name) if Path(name).is_absolute() else CHART / "ci" / name
    return helm.values_from_yaml(path.read_text())


def render(values: dict) -> list[dict]:
    """Every object the chart renders with `values` (hooks and tests included), in template order."""
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values)
        rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for template, text in sorted(rendered.items()):
        if template.endswith("NOTES.txt"):
            continue
        for obj in yaml.safe_load_all(text):
            if obj:
                obj.setdefault("metadata", {}).setdefault("annotations", {})
                obj["metadata"]["annotations"].setdefault("jobbroker.test/template", template)
                objects.append(obj)
    return objects


def template_of(obj: dict) -> str:
    return obj["metadata"]["annotations"]["jobbroker.test/template"]


def strip_test_annotation(obj: dict) -> dict:
    clean = json.loads(json.dumps(obj))
    annotations = clean["metadata"]["annotations"]
    del annotations["jobbroker.test/template"]
    if not annotations:
        del clean["metadata"]["annotations"]
    return clean


def pod_spec(obj: dict) -> dict | None:
    if obj["kind"] == "Pod":
        return obj["spec"]
    if obj["kind"] in ("Deployment", "Job"):
        return obj["spec"]["template"]["spec"]
    return None


def env_of(container: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def seconds(duration: str) -> int:
    match = re.fullmatch(r"(\d+)s", duration)
    if not match:
        raise ValueError(f"expected a duration in whole seconds like 10s, got {duration!r}")
    return int(match.group(1))


def lint() -> None:
    for name in VALUE_SETS:
        report = helm.lint(CHART, load_values(name), strict=True, kube_version=f"v{KUBERNETES}")
        for message in report["messages"]:
            if message["severity"] >= 2:
                fail(f"helm lint --strict ({name}): {message['path']}: {message['error']}")
        for error in report["errors"]:
            fail(f"helm lint --strict ({name}): {error}")


def validate(name: str, objects: list[dict]) -> None:
    """Kubernetes 1.30 schemas (strict: unknown fields fail); the CRDs, which have none there, by hand."""
    for obj in objects:
        where = f"{name}: {obj['kind']}/{obj['metadata'].get('name')} ({template_of(obj)})"
        clean = strip_test_annotation(obj)
        if obj["kind"] in CRD_CHECKS:
            for problem in CRD_CHECKS[obj["kind"]](clean):
                fail(f"{where}: {problem}")
            continue
        try:
            kubernetes_validate.validate(clean, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            fail(f"{where}: invalid for Kubernetes {KUBERNETES}: {path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError:
            fail(f"{where}: no Kubernetes {KUBERNETES} schema and no hand check for {obj['apiVersion']}")


def check_labels(name: str, objects: list[dict]) -> None:
    required = ["app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                "app.kubernetes.io/managed-by", "app.kubernetes.io/component", "helm.sh/chart"]
    for obj in objects:
        spec = pod_spec(obj)
        labelled = [("", obj["metadata"].get("labels", {}))]
        if obj["kind"] in ("Deployment", "Job"):
            labelled.append(("pod template ", obj["spec"]["template"]["metadata"].get("labels", {})))
        for what, labels in labelled:
            missing = [key for key in required if key not in labels]
            if missing:
                fail(f"{name}: {obj['kind']}/{obj['metadata']['name']}: {what}labels lack {missing}")
        if spec is not None and spec.get("automountServiceAccountToken") is not False:
            fail(f"{name}: {obj['kind']}/{obj['metadata']['name']}: mounts a service account token it never uses")


def check_pods(name: str, objects: list[dict], values: dict) -> None:
    """Non-root, read-only root filesystem, no capabilities, requests and limits, known image."""
    for obj in objects:
        spec = pod_spec(obj)
        if spec is None:
            continue
        where = f"{name}: {obj['kind']}/{obj['metadata']['name']}"
        pod_security = spec.get("securityContext", {})
        if pod_security.get("runAsNonRoot") is not True or pod_security.get("runAsUser", 0) == 0:
            fail(f"{where}: the pod must run as a non-root user (runAsNonRoot, runAsUser != 0)")
        if pod_security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            fail(f"{where}: the pod needs seccompProfile RuntimeDefault")
        for container in spec.get("initContainers", []) + spec["containers"]:
            at = f"{where} container {container['name']}"
            security = container.get("securityContext", {})
            expected = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True}
            for key, value in expected.items():
                if security.get(key) is not value:
                    fail(f"{at}: securityContext.{key} must be {value}")
            if "ALL" not in security.get("capabilities", {}).get("drop", []):
                fail(f"{at}: must drop ALL capabilities")
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in container.get("resources", {}).get(kind, {}):
                        fail(f"{at}: resources.{kind}.{resource} is missing")
            repository = values.get("image", {}).get("repository", "jobbroker")
            worker_repository = values.get("worker", {}).get("image", {}).get("repository")
            if not container["image"].startswith((repository + ":", repository + "@")) and not (
                    worker_repository and container["image"].startswith(worker_repository)):
                fail(f"{at}: image {container['image']} is not the one values name")


def check_secrets(name: str, objects: list[dict]) -> None:
    """Credentials are referenced from existing Secrets, never written into an object."""
    for obj in objects:
        where = f"{name}: {obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "Secret":
            fail(f"{where}: the chart must not create Secrets (credentials come from existing ones)")
        if "postgres://" in json.dumps(obj) or "postgresql://" in json.dumps(obj):
            fail(f"{where}: contains a Postgres URL in clear")
        spec = pod_spec(obj)
        for container in (spec.get("initContainers", []) + spec["containers"]) if spec else []:
            for var, entry in env_of(container).items():
                secret = var == "DATABASE_URL" or (var.endswith(("TOKEN", "TOKENS")) and var != "JOBBROKER_TOKENS_FILE")
                if secret and "secretKeyRef" not in entry.get("valueFrom", {}):
                    fail(f"{where} container {container['name']}: {var} must come from a secretKeyRef")


def containers_named(objects: list[dict], kind: str, container_name: str) -> list[tuple[dict, dict]]:
    found = []
    for obj in objects:
        spec = pod_spec(obj)
        if obj["kind"] == kind and spec:
            found += [(obj, c) for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == container_name]
    return found


def check_broker(name: str, objects: list[dict]) -> None:
    """Probes on the health service, the drain arithmetic, Services, PDB."""
    brokers = containers_named(objects, "Deployment", "broker")
    if len(brokers) != 1:
        fail(f"{name}: expected one broker Deployment, found {len(brokers)}")
        return
    deployment, broker = brokers[0]
    where = f"{name}: Deployment/{deployment['metadata']['name']}"
    env = env_of(broker)
    ports = {p["name"]: p["containerPort"] for p in broker["ports"]}
    health_listen = env.get("JOBBROKER_HEALTH_LISTEN", {}).get("value", "off")
    if "health" not in ports or not health_listen.endswith(f":{ports['health']}"):
        fail(f"{where}: JOBBROKER_HEALTH_LISTEN ({health_listen}) must serve the `health` container port")
    for probe_name in ["startupProbe", "readinessProbe"]:
        grpc = broker.get(probe_name, {}).get("grpc")
        if not grpc:
            fail(f"{where}: {probe_name} must be a native gRPC probe")
        elif grpc.get("port") != ports.get("health") or grpc.get("service") != "jobbroker.v1.BrokerService":
            fail(f"{where}: {probe_name} must ask the health port for jobbroker.v1.BrokerService, not {grpc}")
    # Liveness must not follow the database (an outage would restart every broker): a TCP check of the health port.
    liveness = broker.get("livenessProbe", {})
    if liveness.get("tcpSocket", {}).get("port") != ports.get("health") or "grpc" in liveness:
        fail(f"{where}: livenessProbe must be a tcpSocket check of the health port, not {liveness}")
    spec = deployment["spec"]["template"]["spec"]
    pre_stop = broker.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    drain = pre_stop + seconds(env["JOBBROKER_SHUTDOWN_GRACE"]["value"])
    if spec["terminationGracePeriodSeconds"] <= drain:
        fail(f"{where}: terminationGracePeriodSeconds {spec['terminationGracePeriodSeconds']} must exceed "
             f"preStop sleep + shutdown grace ({drain})")
    services = [o for o in objects if o["kind"] == "Service"]
    headless = [s for s in services if s["spec"].get("clusterIP") == "None"]
    if len(services) != 2 or len(headless) != 1:
        fail(f"{name}: expected a ClusterIP and a headless Service, found {[s['metadata']['name'] for s in services]}")
    for service in services:
        if service["spec"]["selector"] != deployment["spec"]["selector"]["matchLabels"]:
            fail(f"{name}: Service/{service['metadata']['name']} does not select the broker pods")
        grpc = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
        if not grpc or grpc[0]["targetPort"] != "grpc":
            fail(f"{name}: Service/{service['metadata']['name']} must route its grpc port to the pods' grpc port")
    pdbs = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    if not pdbs or pdbs[0]["apiVersion"] != "policy/v1":
        fail(f"{name}: the brokers need a policy/v1 PodDisruptionBudget")
    autoscaled = any(o["kind"] == "HorizontalPodAutoscaler" and o["spec"]["scaleTargetRef"]["name"] ==
                     deployment["metadata"]["name"] for o in objects)
    if autoscaled == ("replicas" in deployment["spec"]):
        fail(f"{where}: spec.replicas must be set exactly when no autoscaler owns the Deployment")


def check_worker(name: str, objects: list[dict]) -> None:
    """Drain grace, zombies reaped, the config checksum, autoscaling owns replicas, the rendered TOML parses."""
    for deployment, agent in containers_named(objects, "Deployment", "worker-agent"):
        where = f"{name}: Deployment/{deployment['metadata']['name']}"
        env = env_of(agent)
        if deployment["spec"]["template"]["spec"].get("shareProcessNamespace") is not True:
            fail(f"{where}: shareProcessNamespace must be true, so a PID 1 that reaps orphaned job processes runs")
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        if grace <= seconds(env["JOBBROKER_DRAIN_GRACE"]["value"]):
            fail(f"{where}: terminationGracePeriodSeconds {grace} must exceed JOBBROKER_DRAIN_GRACE")
        configs = [o for o in objects if o["kind"] == "ConfigMap"]
        checksum = deployment["spec"]["template"]["metadata"].get("annotations", {}).get("checksum/config")
        if configs:
            toml = configs[0]["data"]["agent.toml"]
            if checksum != hashlib.sha256(toml.encode()).hexdigest():
                fail(f"{where}: checksum/config does not match the ConfigMap's agent.toml")
            try:
                tomllib.loads(toml)
            except tomllib.TOMLDecodeError as error:
                fail(f"{name}: the rendered agent.toml is not TOML: {error}\n{toml}")
        scalers = [o for o in objects if o["kind"] in ("ScaledObject", "HorizontalPodAutoscaler")
                   and o["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]]
        if bool(scalers) == ("replicas" in deployment["spec"]):
            fail(f"{where}: spec.replicas must be set exactly when no autoscaler owns the Deployment")


def check_network_policy(name: str, objects: list[dict]) -> None:
    for policy in (o for o in objects if o["kind"] == "NetworkPolicy"):
        grpc_rules = [r for r in policy["spec"]["ingress"] if {"port": "grpc", "protocol": "TCP"} in r["ports"]]
        components = {peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component")
                      for rule in grpc_rules for peer in rule.get("from", [])}
        if len(grpc_rules) != 1 or not {"worker", "test"} <= components:
            fail(f"{name}: NetworkPolicy must let exactly the workers, the test pod and producers reach grpc")


def check_handlers_roundtrip() -> None:
    """The TOML carries what values said (numbers stay integers, strings survive escaping) and a handler change
    changes the pods' checksum, so agents roll."""
    handlers = {"odd.kind:1": {"handler": "exec", "command": ["printf", "a \"quoted\" \\ back\nslash"],
                               "concurrency": 3, "nonRetryableExitCodes": [65, 70], "env": {"K": "v \"x\"", "Z": "1"}}}
    base = {"worker": {"enabled": True, "queues": ["q"], "handlers": handlers}}
    objects = render(base)
    toml = next(o for o in objects if o["kind"] == "ConfigMap")["data"]["agent.toml"]
    parsed = tomllib.loads(toml)
    expected = {"kinds": {"odd.kind:1": {"handler": "exec", "command": handlers["odd.kind:1"]["command"],
                                         "concurrency": 3, "non_retryable_exit_codes": [65, 70],
                                         "env": {"K": "v \"x\"", "Z": "1"}}}}
    if parsed != expected:
        fail(f"agent.toml does not round-trip the handlers: {parsed} != {expected}")
    changed = json.loads(json.dumps(base))
    changed["worker"]["handlers"]["odd.kind:1"]["concurrency"] = 4

    def checksum(objs: list[dict]) -> str:
        worker = next(o for o in objs if o["kind"] == "Deployment" and "worker" in o["metadata"]["name"])
        return worker["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    if checksum(objects) == checksum(render(changed)):
        fail("changing a handler does not change the worker pods' checksum/config annotation")


def check_rejections() -> None:
    """Every file in bad-values/ is refused, by the schema or by the template, with the message it expects."""
    for path in sorted((HERE / "bad-values").glob("*.yaml")):
        text = path.read_text()
        expect = re.search(r"^# expect: (.+)$", text, re.M)
        by = re.search(r"^# rejected-by: (schema|template)$", text, re.M)
        if not expect or not by:
            fail(f"{path.name}: needs `# rejected-by: schema|template` and `# expect: <message part>` lines")
            continue
        values = helm.values_from_yaml(text)
        try:
            with helm.Chart.load(CHART) as chart:
                if by.group(1) == "schema":
                    chart.validate_schema(values)
                else:
                    chart.validate_schema(values)
                    chart.render(values, name=RELEASE, namespace=NAMESPACE)
            fail(f"{path.name}: was accepted; the {by.group(1)} must reject it")
        except (helm.HelmValuesError, helm.HelmRenderError) as error:
            if expect.group(1) not in str(error):
                fail(f"{path.name}: rejected, but the message lacks {expect.group(1)!r}: {error}")


def check_dockerfile(objects: list[dict]) -> None:
    """The image builds the workspace's binaries with the documented command, runs as the pods' user, and holds
    every program the chart's containers start."""
    dockerfile = (REPO / "Dockerfile").read_text()
    if BUILD_COMMAND not in dockerfile:
        fail(f"Dockerfile: the build must run `{BUILD_COMMAND}`")
    if BUILD_COMMAND not in (REPO / "README.md").read_text():
        fail(f"README.md: must show the Dockerfile's build command `{BUILD_COMMAND}`")
    copied = set(re.findall(r"^COPY --from=build (?:/\S+/)?release/(\S+) /usr/local/bin/", dockerfile, re.M))
    metadata = json.loads(subprocess.run(
        ["cargo", "metadata", "--no-deps", "--format-version", "1", "--manifest-path", str(REPO / "Cargo.toml")],
        check=True, capture_output=True, text=True).stdout)
    packages = re.findall(r"-p (\S+)", BUILD_COMMAND)
    built = {t["name"] for p in metadata["packages"] if p["name"] in packages
             for t in p["targets"] if "bin" in t["kind"]}
    missing = [p for p in packages if p not in {p["name"] for p in metadata["packages"]}]
    if missing:
        fail(f"Dockerfile builds packages the workspace lacks: {missing}")
    if copied != built:
        fail(f"Dockerfile copies {sorted(copied)} but `{BUILD_COMMAND}` builds {sorted(built)}")
    final = dockerfile[dockerfile.rindex("\nFROM "):]
    if "distroless" not in final.splitlines()[1] or not re.search(r"^USER 65532:65532$", final, re.M):
        fail("Dockerfile: the runtime stage must be distroless (no shell) and run as USER 65532:65532")
    for obj in objects:
        spec = pod_spec(obj)
        for container in (spec.get("initContainers", []) + spec["containers"]) if spec else []:
            program = container.get("command", [""])[0]
            if program.removeprefix("/usr/local/bin/") not in copied or not program.startswith("/usr/local/bin/"):
                fail(f"{obj['kind']}/{obj['metadata']['name']}: command {program} is not a binary of the image")


def check() -> int:
    lint()
    everything = []
    for name in VALUE_SETS:
        values = load_values(name)
        objects = render(values)
        everything += objects
        validate(name, objects)
        check_labels(name, objects)
        check_pods(name, objects, values)
        check_secrets(name, objects)
        check_broker(name, objects)
        check_worker(name, objects)
        check_network_policy(name, objects)
        print(f"{name}: {len(objects)} objects rendered and checked", file=sys.stderr)
    kinds = {o["kind"] for o in everything}
    for kind in ["Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ConfigMap", "Job",
                 "Pod", "ServiceAccount", "NetworkPolicy", *CRD_CHECKS]:
        if kind not in kinds:
            fail(f"no values set renders a {kind}: that template goes unchecked")
    check_handlers_roundtrip()
    check_rejections()
    check_dockerfile(everything)
    for message in failures:
        print(f"FAIL {message}", file=sys.stderr)
    return 1 if failures else 0


def certs(directory: Path, names: list[str]) -> None:
    """A CA; a server certificate (tls.crt, tls.key) for `names` and 127.0.0.1; a client one (client.crt/.key)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(subject: str, issuer_name, issuer_key, key, extensions):
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1)))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(issuer_key or key, hashes.SHA256())

    def write(name: str, cert, key) -> None:
        (directory / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("jobbroker test CA", None, None, ca_key, [(x509.BasicConstraints(ca=True, path_length=None), True)])
    write("ca", ca, ca_key)
    leaf = [(x509.BasicConstraints(ca=False, path_length=None), True)]
    server_key = ec.generate_private_key(ec.SECP256R1())
    alt_names = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = issue(names[0], ca.subject, ca_key, server_key, leaf + [
        (x509.SubjectAlternativeName(alt_names), False),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)])
    write("tls", server, server_key)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = issue("jobbroker test client", ca.subject, ca_key, client_key, leaf + [
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)])
    write("client", client, client_key)


def main(argv: list[str]) -> int:
    if argv[:1] == ["check"] and len(argv) == 1:
        return check()
    if argv[:1] == ["render"] and len(argv) == 2:
        objects = [strip_test_annotation(o) for o in render(load_values(argv[1]))]
        json.dump({"release": RELEASE, "namespace": NAMESPACE, "objects": objects}, sys.stdout)
        return 0
    if argv[:1] == ["certs"] and len(argv) >= 3:
        certs(Path(argv[1]), argv[2:])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
