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
{{- printf "target-%s" (. | sha256sum | trunc 12) }}
{{- end }}

{{/*
The pod spec shared by the Deployment and the CronJobs.
Call with (dict "root" $ "args" (list "run") "daemon" true); "command" is optional.
*/}}
{{- define "maintainer.podSpec" -}}
{{- $root := .root -}}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
serviceAccountName: {{ include "maintainer.serviceAccountName" $root }}
automountServiceAccountToken: false
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
terminationGracePeriodSeconds: {{ $root.Values.terminationGracePeriodSeconds }}
{{- if not .daemon }}
restartPolicy: Never
{{- end }}
containers:
  - name: maintainer
    image: "{{ $root.Values.image.repository }}:{{ $root.Values.image.tag | default $root.Chart.AppVersion }}"
    imagePullPolicy: {{ $root.Values.image.pullPolicy }}
    {{- with .command }}
    command:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    args:
      {{- toYaml .args | nindent 6 }}
    env:
      - name: MAINTAINER_CONFIG
        value: /etc/maintainer/maintainer.yaml
      {{- range $name, $target := $root.Values.targets }}
      {{- if eq $target.mountAs "env" }}
      - name: {{ printf "MAINTAINER_TARGETS__%s__DSN" (upper $name) }}
        valueFrom:
          secretKeyRef:
            name: {{ $target.existingSecret }}
            key: {{ $target.key }}
      {{- end }}
      {{- end }}
      {{- if $root.Values.sentry.existingSecret }}
      - name: MAINTAINER_SENTRY__DSN
        valueFrom:
          secretKeyRef:
            name: {{ $root.Values.sentry.existingSecret }}
            key: {{ $root.Values.sentry.key }}
      {{- end }}
      {{- with $root.Values.extraEnv }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- if .daemon }}
    ports:
      - name: http
        containerPort: {{ $root.Values.http.port }}
        protocol: TCP
    livenessProbe:
      httpGet:
        path: /healthz
        port: http
      {{- toYaml $root.Values.livenessProbe | nindent 6 }}
    readinessProbe:
      httpGet:
        path: /readyz
        port: http
      {{- toYaml $root.Values.readinessProbe | nindent 6 }}
    {{- end }}
    resources:
      {{- toYaml $root.Values.resources | nindent 6 }}
    securityContext:
      {{- toYaml $root.Values.securityContext | nindent 6 }}
    volumeMounts:
      - name: config
        mountPath: /etc/maintainer
        readOnly: true
      - name: tmp
        mountPath: /tmp
      {{- range $name, $target := $root.Values.targets }}
      {{- if eq $target.mountAs "file" }}
      - name: {{ include "maintainer.targetVolume" $name }}
        mountPath: {{ printf "/var/run/secrets/maintainer/targets/%s" $name }}
        readOnly: true
      {{- end }}
      {{- end }}
      {{- if $root.Values.http.triggerToken.existingSecret }}
      - name: trigger-token
        mountPath: /var/run/secrets/maintainer/trigger
        readOnly: true
      {{- end }}
volumes:
  - name: config
    configMap:
      name: {{ include "maintainer.fullname" $root }}
      items:
        - key: maintainer.yaml
          path: maintainer.yaml
        {{- range $name, $job := $root.Values.jobs }}
        - key: {{ printf "job-%s.yaml" $name }}
          path: {{ printf "jobs/%s.yaml" $name }}
        {{- end }}
        {{- range $name, $text := $root.Values.units }}
        - key: {{ printf "unit-%s.sql.j2" $name }}
          path: {{ printf "templates/%s.sql.j2" $name }}
        {{- end }}
  - name: tmp
    emptyDir:
      sizeLimit: 64Mi
  {{- range $name, $target := $root.Values.targets }}
  {{- if eq $target.mountAs "file" }}
  - name: {{ include "maintainer.targetVolume" $name }}
    secret:
      secretName: {{ $target.existingSecret }}
      defaultMode: 0400
      items:
        - key: {{ $target.key }}
          path: dsn
  {{- end }}
  {{- end }}
  {{- if $root.Values.http.triggerToken.existingSecret }}
  - name: trigger-token
    secret:
      secretName: {{ $root.Values.http.triggerToken.existingSecret }}
      defaultMode: 0400
      items:
        - key: {{ $root.Values.http.triggerToken.key }}
          path: token
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
