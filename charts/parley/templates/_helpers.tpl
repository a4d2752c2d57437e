{{/*
Names, labels and the operator's RBAC rules, shared by every template.
*/}}

{{/* Chart name, overridable with nameOverride. */}}
{{- define "parley.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart>, or the release name when it already contains the chart name. */}}
{{- define "parley.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name of the operator's objects (Deployment, Service, PDB): <fullname>-operator. */}}
{{- define "parley.operatorName" -}}
{{- printf "%s-operator" (include "parley.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* chart label value. */}}
{{- define "parley.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the operator pods; they never change for the life of a release. */}}
{{- define "parley.selectorLabels" -}}
app.kubernetes.io/name: {{ include "parley.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels of every object of the chart. */}}
{{- define "parley.labels" -}}
helm.sh/chart: {{ include "parley.chart" . }}
{{ include "parley.selectorLabels" . }}
app.kubernetes.io/version: {{ include "parley.imageTag" . | quote }}
app.kubernetes.io/part-of: parley
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* ServiceAccount name. */}}
{{- define "parley.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "parley.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Image tag: image.tag, or the chart's appVersion when empty. */}}
{{- define "parley.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{/* Full image reference: repository@digest when a digest is set, else repository:tag. */}}
{{- define "parley.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (include "parley.imageTag" .) }}
{{- end }}
{{- end }}

{{/* Namespace of the leader-election Lease (default: the release namespace). */}}
{{- define "parley.leaseNamespace" -}}
{{- default .Release.Namespace .Values.leaderElection.namespace }}
{{- end }}

{{/*
The operator's rules on the namespaces it watches: in a ClusterRole when it watches all namespaces, in a Role
in the watched namespace otherwise. Least privilege: no wildcards, only the kinds operator/src/build.rs builds
(StatefulSets, Services, ConfigMaps, PodDisruptionBudgets, NetworkPolicies; no Deployments). Secrets: create
only, for each Region's internal token Secret; the operator never reads, lists, updates or deletes a Secret (pods
read Secrets through secretKeyRef/volumes, and the token Secret goes with its Region by garbage collection).
e2e/helm/check_render.py and operator/tests/k8s.rs hold the same set and fail when they drift.
*/}}
{{- define "parley.operatorRules" -}}
# ChatClusters and Regions: watched, their finalizers added/removed (patch/update on the object).
- apiGroups: ["parley.dev"]
  resources: ["chatclusters", "regions"]
  verbs: ["get", "list", "watch", "patch", "update"]
# Conditions, observedGeneration and the machine-ID allocation live in status.
- apiGroups: ["parley.dev"]
  resources: ["chatclusters/status", "regions/status"]
  verbs: ["patch", "update"]
# Owned objects carry ownerReferences with blockOwnerDeletion, which needs update on the owner's finalizers.
- apiGroups: ["parley.dev"]
  resources: ["chatclusters/finalizers", "regions/finalizers"]
  verbs: ["update"]
# Per-Region workloads (server-side apply creates through patch, hence create + patch; orphans are deleted).
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Each Region that receives topics runs MirrorMaker 2 as a Deployment (deleted when no flow targets it any more).
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Gateway rollouts and scale-downs: the operator reads the gateway pods (their connection reports), asks one to drain
# (an annotation), and deletes it once drained. get and watch are there because the gateways' pod-agent Role grants
# them, and Kubernetes lets a Role be created only by someone holding what it grants.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "patch", "delete"]
# Each Region's gateway ServiceAccount, its pod-agent Role (its own pods, by name) and their RoleBinding.
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["list", "create", "patch"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["list", "create", "patch"]
# Each Region's internal token Secret and each ChatCluster's peer token Secret are created once; an existing one
# (409) is kept. No list or watch, and get only by name for the Secrets named in rbac.readableSecrets (the Cassandra
# CA and credentials the operator sets the keyspace's replication with), so it cannot read any other Secret, its own
# included.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create"]
{{- with .Values.rbac.readableSecrets }}
- apiGroups: [""]
  resources: ["secrets"]
  resourceNames: {{ toJson . }}
  verbs: ["get"]
{{- end }}
# Events about ChatClusters and Regions (kube-rs' Recorder writes events.k8s.io/v1 only). Pods are not listed:
# readiness comes from StatefulSet status; the drain-aware rollouts of a later issue will add pod rights.
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/*
Leader election, only in the Lease's namespace and only on the named Lease: get/update/patch carry its name in
resourceNames (patch is what kube-lease-manager, the crate the operator uses, sends to take and renew it). create
cannot be limited by name (the name is not known when a create is authorized), so it has its own rule.
*/}}
{{- define "parley.leaseRules" -}}
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  resourceNames: [{{ .Values.leaderElection.leaseName | quote }}]
  verbs: ["get", "update", "patch"]
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["create"]
{{- end }}
