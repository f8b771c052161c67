"""Pure functions from a RoostCluster spec to the Kubernetes objects that run it.

Nothing here talks to the API server; the handlers decide *how many* pods of which revision
should exist (see :mod:`roost.operator.planner`) and these functions say what they look like.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import yaml

from roost.config import Config
from roost.operator.spec import GROUP, KIND, VERSION, PodTemplate, RoostClusterSpec, ServiceTemplate

Manifest = dict[str, Any]

MGMT_PORT = 18083
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
#: Node-to-node forwarding link (cluster/ layer).
CLUSTER_PORT = 4370
CONFIG_PATH = "/etc/roost/roost.yaml"
API_KEY_DIR = "/etc/roost/api"
API_KEY_FILE = f"{API_KEY_DIR}/key"
DATA_DIR = "/data"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_REVISION = "roost.io/revision"
ANNOTATION_ETCD_BOOTSTRAP = "roost.io/etcd-bootstrap-size"
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
#: On the headless Service only, which has every pod (cores and replicants) behind it.
LABEL_METRICS = "roost.io/metrics"


def labels(name: str, component: str | None = None) -> dict[str, str]:
    out = {
        LABEL_NAME: "roost",
        LABEL_INSTANCE: name,
        LABEL_MANAGED_BY: "roost-operator",
    }
    if component:
        out[LABEL_COMPONENT] = component
    return out


def selector(name: str, component: str | None = None) -> dict[str, str]:
    out = {LABEL_NAME: "roost", LABEL_INSTANCE: name}
    if component:
        out[LABEL_COMPONENT] = component
    return out


def selector_string(sel: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(sel.items()))


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(name: str, ns: str, owner: dict[str, Any], lbls: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "namespace": ns, "labels": lbls, "ownerReferences": [owner]}


# -- names ------------------------------------------------------------------------------------


def headless_name(name: str) -> str:
    return f"{name}-headless"


def core_name(name: str) -> str:
    return f"{name}-core"


def replicant_name(name: str, revision: str) -> str:
    return f"{name}-replicant-{revision}"


def config_map_name(name: str) -> str:
    return f"{name}-config"


def api_key_secret_name(name: str) -> str:
    return f"{name}-api-key"


# -- revisions --------------------------------------------------------------------------------


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def _pod_fields(spec: RoostClusterSpec, tmpl: PodTemplate) -> dict[str, Any]:
    # Everything that ends up in the pod template; replicas and the broker config do not
    # (config changes are applied hot over the REST API).
    return {
        "image": spec.image,
        "pullPolicy": spec.imagePullPolicy,
        "pullSecrets": spec.imagePullSecrets,
        "sa": spec.serviceAccountName,
        "tmpl": tmpl.model_dump(exclude={"replicas"}, mode="json"),
        "ports": [(k, n, lst.port) for k, n, lst in spec.config.listeners.enabled()],
    }


def core_revision(spec: RoostClusterSpec) -> str:
    return _digest(_pod_fields(spec, spec.coreTemplate))


def replicant_revision(spec: RoostClusterSpec) -> str:
    return _digest(_pod_fields(spec, spec.replicantTemplate))


# -- config -----------------------------------------------------------------------------------


def broker_config(spec: RoostClusterSpec) -> dict[str, Any]:
    """The broker config the nodes run, without the node section (set per pod by env)."""
    return spec.config.model_dump(mode="json", exclude={"node"})


def config_map(name: str, ns: str, owner: dict[str, Any], spec: RoostClusterSpec) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(config_map_name(name), ns, owner, labels(name)),
        "data": {"roost.yaml": yaml.safe_dump(broker_config(spec), sort_keys=True)},
    }


def api_key_secret(name: str, ns: str, owner: dict[str, Any], key: str) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(api_key_secret_name(name), ns, owner, labels(name)),
        "type": "Opaque",
        "stringData": {"key": key},
    }


# -- services ---------------------------------------------------------------------------------


def listener_ports(config: Config) -> list[dict[str, Any]]:
    """Service ports for the enabled listeners: QUIC is UDP, the rest TCP."""
    ports = []
    for kind, lname, lst in config.listeners.enabled():
        port_name = f"{kind}-{lname}".lower().replace("_", "-")[:63].strip("-")
        ports.append(
            {
                "name": port_name,
                "protocol": "UDP" if kind == "quic" else "TCP",
                "port": lst.port,
                "targetPort": lst.port,
            }
        )
    return ports


def _service(
    svc_name: str,
    ns: str,
    owner: dict[str, Any],
    lbls: dict[str, str],
    tmpl: ServiceTemplate,
    ports: list[dict[str, Any]],
    sel: dict[str, str],
) -> Manifest:
    meta = _meta(svc_name, ns, owner, {**lbls, **tmpl.labels})
    if tmpl.annotations:
        meta["annotations"] = dict(tmpl.annotations)
    spec: dict[str, Any] = {"type": tmpl.type, "selector": sel, "ports": []}
    for p in ports:
        p = dict(p)
        if tmpl.type != "ClusterIP" and p["name"] in tmpl.nodePorts:
            p["nodePort"] = tmpl.nodePorts[p["name"]]
        spec["ports"].append(p)
    if tmpl.type != "ClusterIP" and tmpl.externalTrafficPolicy:
        spec["externalTrafficPolicy"] = tmpl.externalTrafficPolicy
    if tmpl.type == "LoadBalancer" and tmpl.loadBalancerSourceRanges:
        spec["loadBalancerSourceRanges"] = list(tmpl.loadBalancerSourceRanges)
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


def listeners_service(
    name: str, ns: str, owner: dict[str, Any], spec: RoostClusterSpec, serving_role: str
) -> Manifest:
    """Clients reach the replicants once any is ready, the cores until then."""
    return _service(
        f"{name}-listeners",
        ns,
        owner,
        labels(name),
        spec.listenersServiceTemplate,
        listener_ports(spec.config),
        selector(name, serving_role),
    )


def dashboard_service(
    name: str, ns: str, owner: dict[str, Any], spec: RoostClusterSpec
) -> Manifest:
    port = {"name": "dashboard", "protocol": "TCP", "port": MGMT_PORT, "targetPort": MGMT_PORT}
    return _service(
        f"{name}-dashboard",
        ns,
        owner,
        labels(name),
        spec.dashboardServiceTemplate,
        [port],
        selector(name, "core"),
    )


def headless_service(name: str, ns: str, owner: dict[str, Any]) -> Manifest:
    """Stable DNS names for every pod, ready or not: etcd peers must find each other to start."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(headless_name(name), ns, owner, {**labels(name), LABEL_METRICS: "true"}),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector(name),
            "ports": [
                {"name": "mgmt", "port": MGMT_PORT, "protocol": "TCP"},
                {"name": "cluster", "port": CLUSTER_PORT, "protocol": "TCP"},
                {"name": "etcd-client", "port": ETCD_CLIENT_PORT, "protocol": "TCP"},
                {"name": "etcd-peer", "port": ETCD_PEER_PORT, "protocol": "TCP"},
            ],
        },
    }


# -- pods -------------------------------------------------------------------------------------


def _anti_affinity(name: str, component: str, mode: str) -> dict[str, Any]:
    if mode == "none":
        return {}
    term = {
        "labelSelector": {"matchLabels": selector(name, component)},
        "topologyKey": "kubernetes.io/hostname",
    }
    if mode == "hard":
        return {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}
    return {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 100, "podAffinityTerm": term}
            ]
        }
    }


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": MGMT_PORT},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 3,
    }


def _field_env(var: str, path: str) -> dict[str, Any]:
    return {"name": var, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def etcd_endpoints(name: str, bootstrap: int) -> str:
    host = headless_name(name)
    return ",".join(
        f"http://{core_name(name)}-{i}.{host}:{ETCD_CLIENT_PORT}" for i in range(bootstrap)
    )


def _broker_container(
    name: str, spec: RoostClusterSpec, tmpl: PodTemplate, role: str, bootstrap: int
) -> dict[str, Any]:
    host = headless_name(name)
    env = [
        _field_env("POD_NAME", "metadata.name"),
        _field_env("POD_NAMESPACE", "metadata.namespace"),
        _field_env("POD_IP", "status.podIP"),
        {"name": "ROOST_CONFIG", "value": CONFIG_PATH},
        {"name": "ROOST_NODE__NAME", "value": f"roost@$(POD_NAME).{host}.$(POD_NAMESPACE).svc"},
        {"name": "ROOST_NODE__ROLE", "value": role},
        {"name": "ROOST_DATA_DIR", "value": DATA_DIR},
        # One cluster: every node an etcd client of the cores' members, linked to the others
        # through its stable name on the headless Service.
        {"name": "ROOST_CLUSTER__NAME", "value": name},
        {
            "name": "ROOST_CLUSTER__ETCD__ENDPOINTS",
            "value": json.dumps(etcd_endpoints(name, bootstrap).split(",")),
        },
        {"name": "ROOST_CLUSTER__LINK__BIND", "value": f"0.0.0.0:{CLUSTER_PORT}"},
        # Only StatefulSet pods (hostname and subdomain set) have a name on the headless
        # Service; a replicant, from a Deployment, is reached at its pod IP.
        {
            "name": "ROOST_CLUSTER__LINK__ADVERTISE",
            "value": f"$(POD_NAME).{host}.$(POD_NAMESPACE).svc:{CLUSTER_PORT}"
            if role == "core"
            else f"$(POD_IP):{CLUSTER_PORT}",
        },
        # Not config keys (ROOST_* would be read as such): the operator's contract with a node.
        {"name": "ROOSTOP_API_KEY_FILE", "value": API_KEY_FILE},
        {"name": "ROOSTOP_ETCD_ENDPOINTS", "value": etcd_endpoints(name, bootstrap)},
        {"name": "ROOSTOP_PEERS_SERVICE", "value": host},
        *tmpl.env,
    ]
    ports = [{"name": "mgmt", "containerPort": MGMT_PORT, "protocol": "TCP"}]
    ports.append({"name": "cluster", "containerPort": CLUSTER_PORT, "protocol": "TCP"})
    for p in listener_ports(spec.config):
        ports.append({"containerPort": p["port"], "protocol": p["protocol"]})
    mounts = [
        {"name": "config", "mountPath": "/etc/roost/roost.yaml", "subPath": "roost.yaml"},
        {"name": "api-key", "mountPath": API_KEY_DIR, "readOnly": True},
        {"name": "data", "mountPath": DATA_DIR},
        # The root filesystem is read-only; temporary files (e.g. self-signed certificates).
        {"name": "tmp", "mountPath": "/tmp"},
        *tmpl.extraVolumeMounts,
    ]
    container: dict[str, Any] = {
        "name": "roost",
        "image": spec.image,
        "imagePullPolicy": spec.imagePullPolicy,
        "args": ["start"],
        "env": env,
        "ports": ports,
        "volumeMounts": mounts,
        "readinessProbe": tmpl.readinessProbe or _probe("/status", 5, 3),
        # Liveness must not fail while the node is busy evacuating (/status is 503 then).
        "livenessProbe": tmpl.livenessProbe or _probe("/status/live", 10, 6),
        "startupProbe": tmpl.startupProbe or _probe("/status", 2, 150),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if tmpl.resources:
        container["resources"] = tmpl.resources
    return container


# A member with data restarts on it (PVC kept across upgrades). A fresh one joins the running
# cluster if one answers (scale-up, or a member whose PVC went with a scale-down), adding itself
# first; only when none answers do the first BOOTSTRAP members start a new cluster together.
ETCD_SCRIPT = """\
set -eu
ord="${POD_NAME##*-}"
peer="http://${POD_NAME}.${PEERS}:2380"
set -- --name "$POD_NAME" --data-dir /data/etcd --listen-peer-urls http://0.0.0.0:2380 \
  --listen-client-urls http://0.0.0.0:2379 \
  --advertise-client-urls "http://${POD_NAME}.${PEERS}:2379" --initial-advertise-peer-urls "$peer"
if [ -d /data/etcd/member ]; then exec etcd "$@"; fi
if members=$(etcdctl --endpoints "$ENDPOINTS" --command-timeout=5s member list 2>/dev/null); then
  case "$members" in
    *"$peer"*) ;;
    *) etcdctl --endpoints "$ENDPOINTS" member add "$POD_NAME" --peer-urls "$peer" >/dev/null
       members=$(etcdctl --endpoints "$ENDPOINTS" member list) ;;
  esac
  cluster=$(printf '%s\n' "$members" | awk -F', ' -v me="$POD_NAME" -v peer="$peer" \
    '{n=$3; if ($4==peer) n=me; printf "%s%s=%s", s, n, $4; s=","}')
  exec etcd "$@" --initial-cluster "$cluster" --initial-cluster-state existing
fi
if [ "$ord" -ge "$BOOTSTRAP" ]; then echo "no etcd member answers at $ENDPOINTS" >&2; exit 1; fi
cluster=""; i=0
while [ "$i" -lt "$BOOTSTRAP" ]; do
  cluster="${cluster:+$cluster,}${STS}-$i=http://${STS}-$i.${PEERS}:2380"; i=$((i+1))
done
exec etcd "$@" --initial-cluster "$cluster" --initial-cluster-state new \
  --initial-cluster-token "$TOKEN"
"""


def _etcd_container(name: str, spec: RoostClusterSpec, uid: str, bootstrap: int) -> dict[str, Any]:
    return {
        "name": "etcd",
        "image": spec.image,
        "imagePullPolicy": spec.imagePullPolicy,
        "command": ["/bin/sh", "-c", ETCD_SCRIPT],
        "env": [
            _field_env("POD_NAME", "metadata.name"),
            {"name": "PEERS", "value": headless_name(name)},
            {"name": "STS", "value": core_name(name)},
            {"name": "BOOTSTRAP", "value": str(bootstrap)},
            {"name": "ENDPOINTS", "value": etcd_endpoints(name, bootstrap)},
            {"name": "TOKEN", "value": uid},
        ],
        "ports": [
            {"name": "etcd-client", "containerPort": ETCD_CLIENT_PORT, "protocol": "TCP"},
            {"name": "etcd-peer", "containerPort": ETCD_PEER_PORT, "protocol": "TCP"},
        ],
        "volumeMounts": [{"name": "data", "mountPath": DATA_DIR}],
        "readinessProbe": {
            "httpGet": {"path": "/health", "port": ETCD_CLIENT_PORT},
            "periodSeconds": 5,
        },
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }


def _pod_template(
    name: str,
    spec: RoostClusterSpec,
    tmpl: PodTemplate,
    role: str,
    revision: str,
    uid: str,
    bootstrap: int,
) -> dict[str, Any]:
    containers = [_broker_container(name, spec, tmpl, role, bootstrap)]
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": config_map_name(name)}},
        {"name": "api-key", "secret": {"secretName": api_key_secret_name(name)}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if role == "core":
        containers.append(_etcd_container(name, spec, uid, bootstrap))
    else:
        volumes.append({"name": "data", "emptyDir": {}})
    volumes.extend(tmpl.extraVolumes)
    pod_spec: dict[str, Any] = {
        "containers": containers,
        "volumes": volumes,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000},
        # Evacuation happens before the pod is deleted; this only covers the broker's own exit.
        "terminationGracePeriodSeconds": 60,
    }
    affinity = tmpl.affinity or _anti_affinity(name, role, tmpl.antiAffinity)
    if affinity:
        pod_spec["affinity"] = affinity
    for key in ("tolerations", "nodeSelector", "topologySpreadConstraints"):
        if getattr(tmpl, key):
            pod_spec[key] = getattr(tmpl, key)
    if spec.serviceAccountName:
        pod_spec["serviceAccountName"] = spec.serviceAccountName
    if spec.imagePullSecrets:
        pod_spec["imagePullSecrets"] = spec.imagePullSecrets
    meta: dict[str, Any] = {
        "labels": {**tmpl.podLabels, **labels(name, role), LABEL_REVISION: revision}
    }
    if tmpl.podAnnotations:
        meta["annotations"] = dict(tmpl.podAnnotations)
    return {"metadata": meta, "spec": pod_spec}


def core_statefulset(
    name: str, ns: str, owner: dict[str, Any], spec: RoostClusterSpec, replicas: int, bootstrap: int
) -> Manifest:
    """Core pods, replaced one at a time by the operator (OnDelete) so each is evacuated first."""
    revision = core_revision(spec)
    meta = _meta(core_name(name), ns, owner, labels(name, "core"))
    meta["annotations"] = {ANNOTATION_ETCD_BOOTSTRAP: str(bootstrap)}
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": meta,
        "spec": {
            "replicas": replicas,
            "serviceName": headless_name(name),
            # etcd's first members must all start together to form a quorum.
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "OnDelete"},
            "selector": {"matchLabels": selector(name, "core")},
            "template": _pod_template(
                name, spec, spec.coreTemplate, "core", revision, owner["uid"], bootstrap
            ),
            "volumeClaimTemplates": [
                {
                    "metadata": {"name": "data", "labels": labels(name, "core")},
                    "spec": spec.coreTemplate.storage,
                }
            ],
        },
    }


def replicant_deployment(
    name: str,
    ns: str,
    owner: dict[str, Any],
    spec: RoostClusterSpec,
    revision: str,
    replicas: int,
    etcd_bootstrap: int,
) -> Manifest:
    """One Deployment per replicant revision: the operator moves pods from old to new itself.

    ``etcd_bootstrap`` is the cores' bootstrap size: replicants are etcd clients of the same
    members the cores were started with.
    """
    sel = {**selector(name, "replicant"), LABEL_REVISION: revision}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(
            replicant_name(name, revision),
            ns,
            owner,
            {**labels(name, "replicant"), LABEL_REVISION: revision},
        ),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": sel},
            "minReadySeconds": spec.updateStrategy.minReadySeconds,
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": _pod_template(
                name,
                spec,
                spec.replicantTemplate,
                "replicant",
                revision,
                owner["uid"],
                etcd_bootstrap,
            ),
        },
    }


def pod_disruption_budget(
    name: str, ns: str, owner: dict[str, Any], spec: RoostClusterSpec, role: str
) -> Manifest | None:
    """The role's budget for voluntary disruptions; None when the spec turns it off."""
    tmpl = spec.coreTemplate if role == "core" else spec.replicantTemplate
    budget = tmpl.podDisruptionBudget
    if not budget.enabled:
        return None
    pdb_spec: dict[str, Any] = {"selector": {"matchLabels": selector(name, role)}}
    if budget.minAvailable is not None:
        pdb_spec["minAvailable"] = budget.minAvailable
    else:
        pdb_spec["maxUnavailable"] = 1 if budget.maxUnavailable is None else budget.maxUnavailable
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(f"{name}-{role}", ns, owner, labels(name, role)),
        "spec": pdb_spec,
    }


def service_monitor(name: str, ns: str, owner: dict[str, Any], spec: RoostClusterSpec) -> Manifest:
    """Scrapes every pod: the headless Service's endpoints are all of them, replicants too
    (the dashboard Service has the cores only)."""
    sm = spec.serviceMonitor
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _meta(name, ns, owner, {**labels(name), **sm.labels}),
        "spec": {
            "selector": {"matchLabels": {**selector(name), LABEL_METRICS: "true"}},
            "endpoints": [{"port": "mgmt", "path": "/metrics", "interval": sm.interval}],
        },
    }


def static_objects(
    name: str, ns: str, uid: str, spec: RoostClusterSpec, serving_role: str
) -> list[Manifest]:
    """Objects whose shape depends only on the spec (not on the rollout's progress)."""
    owner = owner_reference(name, uid)
    out = [
        config_map(name, ns, owner, spec),
        headless_service(name, ns, owner),
        listeners_service(name, ns, owner, spec, serving_role),
        dashboard_service(name, ns, owner, spec),
    ]
    for role in ("core", "replicant"):
        pdb = pod_disruption_budget(name, ns, owner, spec, role)
        if pdb is not None:
            out.append(pdb)
    if spec.serviceMonitor.enabled:
        out.append(service_monitor(name, ns, owner, spec))
    return out
