{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "xaiserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name; components append "-gateway" / "-torchserve". */}}
{{- define "xaiserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "xaiserve.gateway.fullname" -}}
{{- printf "%s-gateway" (include "xaiserve.fullname" .) }}
{{- end }}

{{- define "xaiserve.torchserve.fullname" -}}
{{- printf "%s-torchserve" (include "xaiserve.fullname" .) }}
{{- end }}

{{/* Secret with the key the gateway presents to TorchServe. */}}
{{- define "xaiserve.keySecretName" -}}
{{- default (printf "%s-torchserve-key" (include "xaiserve.fullname" .)) .Values.torchserve.auth.existingSecret }}
{{- end }}

{{/* Labels shared by every object. */}}
{{- define "xaiserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "xaiserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: xaiserve
{{- end }}

{{/* Selector labels of one component: include "xaiserve.selectorLabels" (list . "gateway") */}}
{{- define "xaiserve.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "xaiserve.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* The image of a flavor: include "xaiserve.image" (list . "gpu") */}}
{{- define "xaiserve.image" -}}
{{- $root := index . 0 -}}
{{- $tag := default $root.Chart.AppVersion $root.Values.image.tag }}
{{- printf "%s:%s-%s" $root.Values.image.repository $tag (index . 1) }}
{{- end }}

{{/* The TorchServe image flavor: gpu when GPUs are requested. */}}
{{- define "xaiserve.torchserve.flavor" -}}
{{- if .Values.torchserve.gpu.enabled }}gpu{{ else }}cpu{{ end }}
{{- end }}

{{/* Hardened container security context (non-root, read-only root, no capabilities). */}}
{{- define "xaiserve.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Pod security context. */}}
{{- define "xaiserve.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.runAsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "xaiserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "xaiserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Where the key file is mounted in both pods. */}}
{{- define "xaiserve.keyDir" -}}
/var/run/secrets/xaiserve/torchserve
{{- end }}
