{{/* Names and labels. */}}
{{- define "maintainer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "maintainer.fullname" -}}
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

{{- define "maintainer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "maintainer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "maintainer.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "maintainer.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "maintainer.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "maintainer.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* A valid volume name for a target (target names may contain "_"). */}}
{{- define "maintainer.targetVolume" -}}
{{- printf "maintainer-target-%s" (. | sha256sum | trunc 12) }}
{{- end }}

{{/*
The maintainer container, as one item of a pod's `containers` list. Used by the Deployment, the
CronJobs and the sidecar. Call with (dict "root" $ "args" (list "run") "daemon" true "sidecar" false);
"command" is optional. "daemon" adds the HTTP port and the probes; "sidecar" leaves out the
readiness probe (it would take the application's pod out of its Service whenever a database is
unreachable) and carries the pod-level user settings on the container, whose pod is not ours.
*/}}
{{- define "maintainer.container" -}}
{{- $root := .root -}}
{{- $values := $root.Values -}}
{{- $port := ternary "maintainer-http" "http" (default false .sidecar) -}}
{{- $securityContext := deepCopy $values.securityContext -}}
{{- if .sidecar }}
{{- $securityContext = mergeOverwrite (pick $values.podSecurityContext "runAsUser" "runAsGroup" "runAsNonRoot" "seLinuxOptions" "seccompProfile" "appArmorProfile") $securityContext -}}
{{- end -}}
- name: maintainer
  image: "{{ $values.image.repository }}:{{ $values.image.tag | default $root.Chart.AppVersion }}"
  imagePullPolicy: {{ $values.image.pullPolicy }}
  {{- with .command }}
  command:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  args:
    {{- toYaml .args | nindent 4 }}
  env:
    - name: MAINTAINER_CONFIG
      value: /etc/maintainer/maintainer.yaml
    {{- range $name, $target := $values.targets }}
    {{- if eq $target.mountAs "env" }}
    - name: {{ printf "MAINTAINER_TARGETS__%s__DSN" (upper $name) }}
      valueFrom:
        secretKeyRef:
          name: {{ $target.existingSecret }}
          key: {{ $target.key }}
    {{- end }}
    {{- end }}
    {{- if $values.sentry.existingSecret }}
    - name: MAINTAINER_SENTRY__DSN
      valueFrom:
        secretKeyRef:
          name: {{ $values.sentry.existingSecret }}
          key: {{ $values.sentry.key }}
    {{- end }}
    {{- with $values.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- if .daemon }}
  ports:
    - name: {{ $port }}
      containerPort: {{ $values.http.port }}
      protocol: TCP
  livenessProbe:
    httpGet:
      path: /healthz
      port: {{ $port }}
    {{- toYaml $values.livenessProbe | nindent 4 }}
  {{- if not .sidecar }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: {{ $port }}
    {{- toYaml $values.readinessProbe | nindent 4 }}
  {{- end }}
  {{- end }}
  resources:
    {{- toYaml $values.resources | nindent 4 }}
  securityContext:
    {{- toYaml $securityContext | nindent 4 }}
  volumeMounts:
    - name: maintainer-config
      mountPath: /etc/maintainer
      readOnly: true
    - name: maintainer-tmp
      mountPath: /tmp
    {{- range $name, $target := $values.targets }}
    {{- if eq $target.mountAs "file" }}
    - name: {{ include "maintainer.targetVolume" $name }}
      mountPath: {{ printf "/var/run/secrets/maintainer/targets/%s" $name }}
      readOnly: true
    {{- end }}
    {{- end }}
    {{- if $values.http.triggerToken.existingSecret }}
    - name: maintainer-trigger-token
      mountPath: /var/run/secrets/maintainer/trigger
      readOnly: true
    {{- end }}
{{- end }}

{{/*
The volumes the container mounts, as items of a pod's `volumes` list; every name starts with
"maintainer-" so they sit beside an application's own. Call with (dict "root" $ "sidecar" false).
Secret files are 0400 where the pod is ours (fsGroup makes them readable by the container's
group); in another workload's pod, whose fsGroup we do not set, they are 0444 — the volume is
mounted into the maintainer container only.
*/}}
{{- define "maintainer.volumes" -}}
{{- $root := .root -}}
{{- $values := $root.Values -}}
{{- $mode := ternary "0444" "0400" (default false .sidecar) -}}
- name: maintainer-config
  configMap:
    name: {{ include "maintainer.fullname" $root }}
    items:
      - key: maintainer.yaml
        path: maintainer.yaml
      {{- range $name, $job := $values.jobs }}
      - key: {{ printf "job-%s.yaml" $name }}
        path: {{ printf "jobs/%s.yaml" $name }}
      {{- end }}
      {{- range $name, $text := $values.units }}
      - key: {{ printf "unit-%s.sql.j2" $name }}
        path: {{ printf "templates/%s.sql.j2" $name }}
      {{- end }}
- name: maintainer-tmp
  emptyDir:
    sizeLimit: 64Mi
{{- range $name, $target := $values.targets }}
{{- if eq $target.mountAs "file" }}
- name: {{ include "maintainer.targetVolume" $name }}
  secret:
    secretName: {{ $target.existingSecret }}
    defaultMode: {{ $mode }}
    items:
      - key: {{ $target.key }}
        path: dsn
{{- end }}
{{- end }}
{{- if $values.http.triggerToken.existingSecret }}
- name: maintainer-trigger-token
  secret:
    secretName: {{ $values.http.triggerToken.existingSecret }}
    defaultMode: {{ $mode }}
    items:
      - key: {{ $values.http.triggerToken.key }}
        path: token
{{- end }}
{{- end }}

{{/*
The pod spec shared by the Deployment and the CronJobs.
Call with (dict "root" $ "args" (list "run") "daemon" true); "command" is optional.
*/}}
{{- define "maintainer.podSpec" -}}
{{- $root := .root -}}
serviceAccountName: {{ include "maintainer.serviceAccountName" $root }}
automountServiceAccountToken: false
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
terminationGracePeriodSeconds: {{ $root.Values.terminationGracePeriodSeconds }}
{{- if not .daemon }}
restartPolicy: Never
{{- end }}
containers:
  {{- include "maintainer.container" . | nindent 2 }}
volumes:
  {{- include "maintainer.volumes" (dict "root" $root) | nindent 2 }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The ConfigMap: maintainer.yaml, the jobs and the user units. Secrets never appear here.
A named template so that its checksum can roll the pods that mount it, ours or an application's.
*/}}
{{- define "maintainer.configMap" -}}
{{- $targets := dict }}
{{- range $name, $target := .Values.targets }}
{{- $entry := dict "pooled" (default false $target.pooled) }}
{{- if eq $target.mountAs "file" }}
{{- $_ := set $entry "dsn_file" (printf "/var/run/secrets/maintainer/targets/%s/dsn" $name) }}
{{- end }}
{{- $_ := set $targets $name $entry }}
{{- end }}
{{- $http := dict "listen" (printf "0.0.0.0:%v" .Values.http.port) }}
{{- if .Values.http.triggerToken.existingSecret }}
{{- $_ := set $http "trigger_token_file" "/var/run/secrets/maintainer/trigger/token" }}
{{- end }}
{{- $config := merge (dict "targets" $targets "jobs_dir" "jobs" "http" $http "sentry" (dict "environment" .Values.sentry.environment)) (deepCopy .Values.config) }}
{{- if .Values.units }}
{{- $_ := set $config "templates_dir" "templates" }}
{{- end -}}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "maintainer.fullname" . }}
  labels:
    {{- include "maintainer.labels" . | nindent 4 }}
data:
  maintainer.yaml: |
    {{- toYaml $config | nindent 4 }}
  {{- range $name, $job := .Values.jobs }}
  {{ printf "job-%s.yaml" $name }}: |
    {{- toYaml (merge (dict "name" $name) $job) | nindent 4 }}
  {{- end }}
  {{- range $name, $text := .Values.units }}
  {{ printf "unit-%s.sql.j2" $name }}: |
    {{- $text | nindent 4 }}
  {{- end }}
{{- end }}

{{/* A pod annotation value that changes whenever the ConfigMap does. */}}
{{- define "maintainer.configChecksum" -}}
{{- include "maintainer.configMap" . | sha256sum }}
{{- end }}
