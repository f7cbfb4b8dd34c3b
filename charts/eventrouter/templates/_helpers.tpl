{{/* Chart name, 63 characters at most because it goes into label values. */}}
{{- define "eventrouter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Prefix of every object name: the release name, followed by the chart name
unless the release name already contains it.
*/}}
{{- define "eventrouter.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of the operator's Deployment, ConfigMap, Role and bindings. */}}
{{- define "eventrouter.operatorName" -}}
{{- printf "%s-operator" (include "eventrouter.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "eventrouter.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "eventrouter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: eventrouter
{{- end -}}

{{/* Labels of the operator's objects, and its pods' selector. */}}
{{- define "eventrouter.operatorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "eventrouter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "eventrouter.operatorLabels" -}}
{{ include "eventrouter.labels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "eventrouter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "eventrouter.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The operator's image, pinned by digest when one is given. */}}
{{- define "eventrouter.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "eventrouter.routerImage" -}}
{{- default (include "eventrouter.image" .) .Values.routerImage -}}
{{- end -}}

{{- define "eventrouter.peeringName" -}}
{{- default (include "eventrouter.fullname" .) .Values.peering.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The namespaces that the operator watches, as a JSON list; an empty list means
every namespace.
*/}}
{{- define "eventrouter.watchNamespaces" -}}
{{- if .Values.operator.clusterWide -}}
{{- .Values.operator.watchNamespaces | uniq | toJson -}}
{{- else -}}
{{- list .Release.Namespace | toJson -}}
{{- end -}}
{{- end -}}

{{- define "eventrouter.apiKeysSecretName" -}}
{{- default (printf "%s-api-keys" (include "eventrouter.fullname" .)) .Values.defaultRouter.apiKeys.existingSecret -}}
{{- end -}}

{{/*
The rules that the operator needs in each namespace that it watches. Each
verb is there for a call in operator/eventrouter_operator or in kopf:
- eventrouters: kopf lists and watches them, and patches in a finalizer
  because the resync timer needs one; Reconciler.reconcile_router gets one.
- eventroutes, eventsinks, secrets: kopf lists and watches them, and the
  reconciler lists them. Secrets also get `get`, and no write verb.
- the status subresources: the reconciler patches the status of all three.
- configmaps, services, deployments: kopf watches the ones the operator
  owns; the reconciler reads each and creates or updates it with
  server-side apply, which needs `create` when the object does not exist.
- horizontalpodautoscalers, poddisruptionbudgets: read and applied like the
  above, and deleted when the router no longer asks for them.
- events: kopf posts warnings and errors as core/v1 Events.
Owner references let the garbage collector delete a router's objects with
the router, so the operator deletes nothing else.
*/}}
{{- define "eventrouter.namespacedRules" -}}
- apiGroups: ["eventrouter.io"]
  resources: ["eventrouters"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["eventrouter.io"]
  resources: ["eventroutes", "eventsinks"]
  verbs: ["list", "watch"]
- apiGroups: ["eventrouter.io"]
  resources: ["eventrouters/status", "eventroutes/status", "eventsinks/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}

{{/* The operator's ServiceAccount as an RBAC binding subject. */}}
{{- define "eventrouter.subject" -}}
- kind: ServiceAccount
  name: {{ include "eventrouter.serviceAccountName" . }}
  namespace: {{ .Release.Namespace }}
{{- end -}}
