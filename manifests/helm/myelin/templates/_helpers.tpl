{{/* Labels on every object of the release. */}}
{{- define "myelin.labels" -}}
{{ include "myelin.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/* The labels that select the agent's pods; they never change between upgrades. */}}
{{- define "myelin.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "myelin.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/*
The network config the init container installs as 05-myelin.conflist (05: runtimes use the
first config in lexical order, so it goes before the usual 10-*). cniVersion is 1.0.0, not
1.1.0: the libcni in containerd 1.6 rejects 1.1.0 results ("unsupported CNI result version"),
and the plugin speaks both. The plugin's keys (agentSocket, mtu, logFile) keep their defaults.
*/}}
{{- define "myelin.conflist" -}}
{{- dict "cniVersion" "1.0.0" "name" "myelin" "plugins" (list (dict "type" "myelin")) | toJson }}
{{- end }}
