"""The RoostCluster custom resource as pydantic models; the CRD schema is generated from them.

Kubernetes' own types (resources, affinity, tolerations, probes, volumes, PVC specs) are kept as
free-form objects: the API server validates them where they land (in the StatefulSet and the
Deployment), and copying their schemas would tie the CRD to one Kubernetes version.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.config import JsonDict

from roost.config import Config

GROUP = "roost.io"
VERSION = "v1beta1"
KIND = "RoostCluster"
PLURAL = "roostclusters"

#: Marks a field as a free-form Kubernetes object in the generated schema.
K8S_OBJECT: JsonDict = {"x-kubernetes-preserve-unknown-fields": True}


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _obj(description: str) -> Any:
    return Field(default_factory=dict, description=description, json_schema_extra=K8S_OBJECT)


def _objs(description: str) -> Any:
    return Field(
        default_factory=list,
        description=description,
        json_schema_extra={"items": {"type": "object", **K8S_OBJECT}},
    )


#: An int or a percentage ("25%"), as Kubernetes' IntOrString.
IntOrPercent = Annotated[
    int | str, WithJsonSchema({"x-kubernetes-int-or-string": True, "description": "3 or 25%"})
]


class DisruptionBudget(_Spec):
    """The PodDisruptionBudget of one role: how many of its pods voluntary disruptions (a node
    drain, the cluster autoscaler) may take at once. Set one of the two; neither: maxUnavailable 1.
    """

    enabled: bool = Field(True, description="false: no PodDisruptionBudget for this role.")
    maxUnavailable: IntOrPercent | None = None
    minAvailable: IntOrPercent | None = None


class PodTemplate(_Spec):
    """What the core and replicant pods share."""

    replicas: int = Field(0, ge=0, description="Number of pods of this role.")
    resources: dict[str, Any] = _obj("Container resources (core/v1 ResourceRequirements).")
    affinity: dict[str, Any] = _obj("Pod affinity (core/v1 Affinity); replaces the default.")
    antiAffinity: Literal["soft", "hard", "none"] = Field(
        "soft",
        description="Default pod anti-affinity across nodes when no affinity is given.",
    )
    tolerations: list[dict[str, Any]] = _objs("core/v1 Tolerations.")
    nodeSelector: dict[str, str] = Field(default_factory=dict)
    topologySpreadConstraints: list[dict[str, Any]] = _objs("core/v1 TopologySpreadConstraints.")
    env: list[dict[str, Any]] = _objs("Extra environment variables (core/v1 EnvVar).")
    extraVolumes: list[dict[str, Any]] = _objs("Extra pod volumes (core/v1 Volume).")
    extraVolumeMounts: list[dict[str, Any]] = _objs("Mounts of the extra volumes (VolumeMount).")
    podAnnotations: dict[str, str] = Field(default_factory=dict)
    podLabels: dict[str, str] = Field(default_factory=dict)
    readinessProbe: dict[str, Any] = _obj("Replaces the default readiness probe (core/v1 Probe).")
    livenessProbe: dict[str, Any] = _obj("Replaces the default liveness probe (core/v1 Probe).")
    startupProbe: dict[str, Any] = _obj("Replaces the default startup probe (core/v1 Probe).")
    podDisruptionBudget: DisruptionBudget = Field(default_factory=DisruptionBudget)


MAX_CORES = 7


class CoreTemplate(PodTemplate):
    replicas: int = Field(
        3, ge=1, le=MAX_CORES, description="Core nodes; odd, 1 to 7, for the etcd quorum."
    )
    storage: dict[str, Any] = Field(
        default_factory=lambda: {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "1Gi"}},
        },
        description="The PersistentVolumeClaim spec of each core pod's /data volume.",
        json_schema_extra=K8S_OBJECT,
    )


class ReplicantTemplate(PodTemplate):
    replicas: int = Field(0, ge=0, le=1000, description="Replicant nodes; 0 is allowed.")


ServiceType = Literal["ClusterIP", "NodePort", "LoadBalancer"]


class ServiceTemplate(_Spec):
    type: ServiceType = "ClusterIP"
    externalTrafficPolicy: Literal["Cluster", "Local"] | None = Field(
        None, description="Only for NodePort and LoadBalancer services."
    )
    annotations: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    nodePorts: dict[str, Annotated[int, Field(ge=1, le=65535)]] = Field(
        default_factory=dict,
        description="Fixed node ports by service port name (<listener type>-<listener name>, "
        "e.g. quic-default: 30567; dashboard on the dashboard Service).",
        json_schema_extra={"maxProperties": 32},
    )
    loadBalancerSourceRanges: list[str] = Field(default_factory=list)


class Evacuation(_Spec):
    connEvictRate: int = Field(500, ge=1, description="Connections moved per second.")
    sessEvictRate: int = Field(500, ge=1, description="Sessions moved per second.")
    waitTakeover: int = Field(
        10, ge=0, description="Seconds clients get to reconnect before sessions are moved."
    )
    timeoutSeconds: int = Field(
        600, ge=1, description="Give up waiting for an evacuation after this long."
    )
    onFailure: Literal["keep", "delete"] = Field(
        "keep",
        description="An evacuation that failed or timed out: keep the pod serving (and retry "
        "later), or delete it anyway (its remaining clients reconnect elsewhere).",
    )


class UpdateStrategy(_Spec):
    type: Literal["RollingUpdate"] = "RollingUpdate"
    minReadySeconds: int = Field(
        10, ge=0, description="A new pod must stay ready this long before the next one goes."
    )
    evacuation: Evacuation = Field(default_factory=Evacuation)


class PvcRetentionPolicy(_Spec):
    whenDeleted: Literal["Retain", "Delete"] = Field(
        "Retain", description="What happens to the core PVCs when the RoostCluster is deleted."
    )


class ServiceMonitor(_Spec):
    enabled: bool = False
    interval: str = "30s"
    labels: dict[str, str] = Field(default_factory=dict)


class RoostClusterSpec(_Spec):
    image: str = Field("roost:0.1.0", min_length=1, max_length=512)
    imagePullPolicy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    imagePullSecrets: list[dict[str, Any]] = _objs("core/v1 LocalObjectReferences.")
    serviceAccountName: str = ""
    config: Config = Field(
        default_factory=Config,
        description="The broker configuration (the same model as roost.yaml).",
    )
    coreTemplate: CoreTemplate = Field(default_factory=CoreTemplate)
    replicantTemplate: ReplicantTemplate = Field(default_factory=ReplicantTemplate)
    listenersServiceTemplate: ServiceTemplate = Field(default_factory=ServiceTemplate)
    dashboardServiceTemplate: ServiceTemplate = Field(default_factory=ServiceTemplate)
    updateStrategy: UpdateStrategy = Field(default_factory=UpdateStrategy)
    pvcRetentionPolicy: PvcRetentionPolicy = Field(default_factory=PvcRetentionPolicy)
    serviceMonitor: ServiceMonitor = Field(default_factory=ServiceMonitor)


class Condition(_Spec):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    lastTransitionTime: str = ""
    observedGeneration: int = 0


class NodeStatus(_Spec):
    name: str
    role: str = ""
    version: str = ""
    status: str = ""
    connections: int = 0


class RoostClusterStatus(_Spec):
    phase: str = ""
    observedGeneration: int = 0
    conditions: list[Condition] = Field(default_factory=list)
    coreReplicas: int = 0
    coreReadyReplicas: int = 0
    replicantReplicas: int = 0
    replicantReadyReplicas: int = 0
    replicantSelector: str = ""
    currentRevision: str = ""
    updateRevision: str = ""
    nodes: list[NodeStatus] = Field(default_factory=list)
