"""Hand checks for the custom resources the chart renders (KEDA, Prometheus Operator): kubernetes-validate has no
schemas for them, so each check lists the problems of one object against the fields its CRD defines and the
chart uses: apiVersion, known keys only, required fields, types (KEDA trigger metadata is a string map).
"""


def _unknown(obj: dict, allowed: set[str], where: str) -> list[str]:
    return [f"{where}.{key} is not a field the chart should set" for key in obj if key not in allowed]


def _string_map(value, where: str) -> list[str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return [f"{where} must map strings to strings"]
    return []


def _common(obj: dict, api_version: str) -> list[str]:
    problems = _unknown(obj, {"apiVersion", "kind", "metadata", "spec"}, "")
    if obj.get("apiVersion") != api_version:
        problems.append(f"apiVersion must be {api_version}")
    if not isinstance(obj.get("metadata", {}).get("name"), str):
        problems.append("metadata.name is required")
    problems += _string_map(obj["metadata"].get("labels", {}), "metadata.labels")
    if not isinstance(obj.get("spec"), dict):
        problems.append("spec is required")
    return problems


TRIGGER_METADATA = {
    "postgresql": ({"query", "targetQueryValue"}, {"activationTargetQueryValue"}),
    "prometheus": ({"serverAddress", "query", "threshold"}, {"activationThreshold"}),
}


def scaled_object(obj: dict) -> list[str]:
    problems = _common(obj, "keda.sh/v1alpha1")
    spec = obj.get("spec", {})
    problems += _unknown(spec, {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval",
                                "cooldownPeriod", "triggers"}, "spec")
    target = spec.get("scaleTargetRef", {})
    if target.get("apiVersion") != "apps/v1" or target.get("kind") != "Deployment" or not target.get("name"):
        problems.append("spec.scaleTargetRef must name an apps/v1 Deployment")
    counts = [spec.get(k) for k in ("minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod")]
    if not all(isinstance(c, int) and c >= 0 for c in counts) or counts[0] > counts[1]:
        problems.append("spec replica counts and intervals must be integers, minReplicaCount <= maxReplicaCount")
    triggers = spec.get("triggers")
    if not isinstance(triggers, list) or not triggers:
        return problems + ["spec.triggers must list at least one trigger"]
    for i, trigger in enumerate(triggers):
        where = f"spec.triggers[{i}]"
        problems += _unknown(trigger, {"type", "metadata", "authenticationRef"}, where)
        if trigger.get("type") not in TRIGGER_METADATA:
            problems.append(f"{where}.type must be one of {sorted(TRIGGER_METADATA)}")
            continue
        required, optional = TRIGGER_METADATA[trigger["type"]]
        metadata = trigger.get("metadata", {})
        problems += _string_map(metadata, f"{where}.metadata")
        problems += [f"{where}.metadata.{k} is required" for k in sorted(required - set(metadata))]
        problems += _unknown(metadata, required | optional, f"{where}.metadata")
        if trigger["type"] == "postgresql" and not trigger.get("authenticationRef", {}).get("name"):
            problems.append(f"{where}.authenticationRef.name is required (the connection is a secret)")
    return problems


def trigger_authentication(obj: dict) -> list[str]:
    problems = _common(obj, "keda.sh/v1alpha1")
    spec = obj.get("spec", {})
    problems += _unknown(spec, {"secretTargetRef"}, "spec")
    refs = spec.get("secretTargetRef")
    if not isinstance(refs, list) or not refs:
        return problems + ["spec.secretTargetRef must list the secret parameters"]
    for i, ref in enumerate(refs):
        if set(ref) != {"parameter", "name", "key"} or not all(isinstance(v, str) and v for v in ref.values()):
            problems.append(f"spec.secretTargetRef[{i}] needs exactly parameter, name and key (strings)")
    return problems


def service_monitor(obj: dict) -> list[str]:
    problems = _common(obj, "monitoring.coreos.com/v1")
    spec = obj.get("spec", {})
    problems += _unknown(spec, {"selector", "endpoints"}, "spec")
    problems += _string_map(spec.get("selector", {}).get("matchLabels"), "spec.selector.matchLabels")
    endpoints = spec.get("endpoints")
    if not isinstance(endpoints, list) or not endpoints:
        return problems + ["spec.endpoints must list at least one endpoint"]
    for i, endpoint in enumerate(endpoints):
        problems += _unknown(endpoint, {"port", "path", "interval", "scrapeTimeout"}, f"spec.endpoints[{i}]")
        if not all(isinstance(endpoint.get(k), str) for k in ("port", "path", "interval", "scrapeTimeout")):
            problems.append(f"spec.endpoints[{i}] needs port, path, interval and scrapeTimeout as strings")
    return problems


CRD_CHECKS = {
    "ScaledObject": scaled_object,
    "TriggerAuthentication": trigger_authentication,
    "ServiceMonitor": service_monitor,
}
