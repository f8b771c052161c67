{{- define "roost-operator.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "roost-operator.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "roost-operator.labels" -}}
app.kubernetes.io/name: {{ include "roost-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "roost-operator.selector" -}}
app.kubernetes.io/name: {{ include "roost-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "roost-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "roost-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The rules the operator needs, no more: what it creates it owns; pods it only evacuates
     and deletes; PVCs it only deletes when a cluster goes with pvcRetentionPolicy Delete. */}}
{{- define "roost-operator.namespacedRules" -}}
- apiGroups: ["roost.io"]
  resources: ["roostclusters"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["roost.io"]
  resources: ["roostclusters/status"]
  verbs: ["get", "patch"]
- apiGroups: ["roost.io"]
  resources: ["roostclusters/finalizers"]
  verbs: ["update"]
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "patch", "delete"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "list", "delete"]
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: ["apps"]
  resources: ["statefulsets", "deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "create", "patch", "delete"]
- apiGroups: ["monitoring.coreos.com"]
  resources: ["servicemonitors"]
  verbs: ["get", "create", "patch", "delete"]
{{- end -}}
