{{/*
Names, labels, images and the pieces several templates share (client TLS and token, the agent's TOML).
*/}}

{{- define "jobbroker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-jobbroker, or the release name alone when it already contains the chart name. */}}
{{- define "jobbroker.fullname" -}}
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

{{/* Name of one component's objects: <fullname>-<suffix>, kept within 63 characters. */}}
{{- define "jobbroker.componentName" -}}
{{- printf "%s-%s" (include "jobbroker.fullname" .root | trunc (int (sub 62 (len .suffix))) | trimSuffix "-") .suffix }}
{{- end }}

{{- define "jobbroker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "jobbroker.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Every object's labels. Call with (dict "root" $ "component" "broker"). */}}
{{- define "jobbroker.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "jobbroker.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: jobbroker
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* An image reference from (dict "image" <image values> "fallback" .Values.image "root" $). */}}
{{- define "jobbroker.imageRef" -}}
{{- $repository := .image.repository | default .fallback.repository }}
{{- $digest := .image.digest | default (ternary .fallback.digest "" (empty .image.repository)) }}
{{- $tag := .image.tag | default (ternary .fallback.tag "" (empty .image.repository)) | default .root.Chart.AppVersion }}
{{- if $digest }}
{{- printf "%s@%s" $repository $digest }}
{{- else }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}
{{- end }}

{{- define "jobbroker.image" -}}
{{- include "jobbroker.imageRef" (dict "image" .Values.image "fallback" .Values.image "root" .) }}
{{- end }}

{{- define "jobbroker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "jobbroker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "jobbroker.databaseSecret" -}}
{{- .Values.database.existingSecret | default (include "jobbroker.componentName" (dict "root" . "suffix" "database")) }}
{{- end }}

{{/* DATABASE_URL, always from the Secret. */}}
{{- define "jobbroker.databaseEnv" -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "jobbroker.databaseSecret" . }}
      key: {{ .Values.database.secretKey }}
{{- end }}

{{/* Where the chart's clients reach the broker: its ClusterIP Service, https when TLS is on. */}}
{{- define "jobbroker.brokerURL" -}}
{{- printf "%s://%s:%v" (ternary "https" "http" .Values.tls.enabled) (include "jobbroker.fullname" .) .Values.broker.ports.grpc }}
{{- end }}

{{/* Pod-level settings every pod of the chart shares. */}}
{{- define "jobbroker.podSpecCommon" -}}
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{/*
A client's token and TLS settings (worker agent, helm test): environment. Call with
(dict "root" $ "auth" <{existingSecret, tokenKey}> "who" "worker.auth").
*/}}
{{- define "jobbroker.clientEnv" -}}
{{- $root := .root }}
{{- if $root.Values.auth.existingSecret }}
- name: JOBBROKER_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ required (printf "%s.existingSecret: a Secret with this client's token is required when auth.existingSecret is set" .who) .auth.existingSecret }}
      key: {{ .auth.tokenKey }}
{{- end }}
{{- if $root.Values.tls.enabled }}
- name: JOBBROKER_TLS_CA
  value: /etc/jobbroker/ca/ca.crt
{{- if $root.Values.tls.requireClientCerts }}
- name: JOBBROKER_TLS_CLIENT_CERT
  value: /etc/jobbroker/client-tls/tls.crt
- name: JOBBROKER_TLS_CLIENT_KEY
  value: /etc/jobbroker/client-tls/tls.key
{{- end }}
{{- end }}
{{- end }}

{{- define "jobbroker.clientVolumeMounts" -}}
{{- if .Values.tls.enabled }}
- name: broker-ca
  mountPath: /etc/jobbroker/ca
  readOnly: true
{{- if .Values.tls.requireClientCerts }}
- name: client-tls
  mountPath: /etc/jobbroker/client-tls
  readOnly: true
{{- end }}
{{- end }}
{{- end }}

{{/* Only ca.crt of the server's Secret reaches clients, never its key. */}}
{{- define "jobbroker.clientVolumes" -}}
{{- if .Values.tls.enabled }}
- name: broker-ca
  secret:
    secretName: {{ .Values.tls.existingSecret }}
    items:
      - key: ca.crt
        path: ca.crt
{{- if .Values.tls.requireClientCerts }}
- name: client-tls
  secret:
    secretName: {{ required "tls.clientSecret: a Secret with the clients' certificate is required when tls.requireClientCerts is on" .Values.tls.clientSecret }}
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- end }}
{{- end }}
{{- end }}

{{/* A soft spread over nodes and zones unless the user gives constraints. */}}
{{- define "jobbroker.topologySpread" -}}
{{- if .constraints }}
{{- toYaml .constraints }}
{{- else }}
{{- range $i, $key := list "kubernetes.io/hostname" "topology.kubernetes.io/zone" }}
{{- if $i }}
{{ end -}}
- maxSkew: 1
  topologyKey: {{ $key }}
  whenUnsatisfiable: ScheduleAnyway
  labelSelector:
    matchLabels:
      {{- include "jobbroker.selectorLabels" $ | nindent 6 }}
{{- end }}
{{- end }}
{{- end }}

{{/*
One handler table of the agent's TOML config, keys in the order README documents. Strings are written with
toJson, whose escapes are valid TOML; numbers through int (YAML numbers arrive as floats).
*/}}
{{- define "jobbroker.agentHandler" -}}
handler = {{ .handler | toJson }}
{{- with .command }}
command = {{ toJson . }}
{{- end }}
{{- with .shell }}
shell = {{ toJson . }}
{{- end }}
{{- with .url }}
url = {{ toJson . }}
{{- end }}
{{- with .timeout }}
timeout = {{ toJson . }}
{{- end }}
{{- with .concurrency }}
concurrency = {{ int . }}
{{- end }}
{{- with .nonRetryableExitCodes }}
non_retryable_exit_codes = [{{ range $i, $code := . }}{{ if $i }}, {{ end }}{{ int $code }}{{ end }}]
{{- end }}
{{- with .env }}
env = { {{- range $i, $name := keys . | sortAlpha }}{{ if $i }},{{ end }} {{ toJson $name }} = {{ index $.env $name | toString | toJson }}{{ end }} }
{{- end }}
{{- with .headers }}
headers = { {{- range $i, $name := keys . | sortAlpha }}{{ if $i }},{{ end }} {{ toJson $name }} = {{ index $.headers $name | toString | toJson }}{{ end }} }
{{- end }}
{{- end }}

{{/* The agent's config file (queues and capacity come from the environment). */}}
{{- define "jobbroker.agentToml" -}}
# worker-agent handlers, rendered by the jobbroker chart from worker.handlers and worker.defaultHandler.
{{- range $kind := keys .Values.worker.handlers | sortAlpha }}

[kinds.{{ toJson $kind }}]
{{ include "jobbroker.agentHandler" (index $.Values.worker.handlers $kind) }}
{{- end }}
{{- with .Values.worker.defaultHandler }}

[default]
{{ include "jobbroker.agentHandler" . }}
{{- end }}
{{ end }}
