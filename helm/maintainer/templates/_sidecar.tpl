{{/*
The sidecar form: the maintainer container and its volumes in another workload's pod.

An application's chart lists this chart as a dependency, sets `maintainer.mode: sidecar` (this
chart then renders only the ConfigMap, and the PrometheusRule and dashboard when enabled) and
includes, in its own pod template, with the subchart's scope:

  annotations:
    checksum/maintainer: {{ include "maintainer.sidecar.checksum" .Subcharts.maintainer }}
  containers:
    - name: app
      ...
    {{- include "maintainer.sidecar.container" .Subcharts.maintainer | nindent 4 }}
  volumes:
    {{- include "maintainer.sidecar.volumes" .Subcharts.maintainer | nindent 4 }}

(`.Subcharts.<alias>` when the dependency has an alias.)
*/}}
{{- define "maintainer.sidecar.check" -}}
{{- $usage := "include \"maintainer.sidecar.container\" .Subcharts.maintainer (.Subcharts.<alias> for an aliased dependency)" }}
{{- if not (and (kindIs "map" .) (hasKey . "Values") (hasKey . "Chart")) }}
{{- fail (printf "maintainer.sidecar.*: pass the maintainer subchart's scope: %s" $usage) }}
{{- else if not (and (hasKey .Values "mode") (hasKey .Values "targets")) }}
{{- fail (printf "maintainer.sidecar.*: this is the application chart's scope, not the maintainer subchart's: %s" $usage) }}
{{- else if ne .Values.mode "sidecar" }}
{{- fail (printf "maintainer.sidecar.*: the maintainer subchart is in mode %q, so it would also run as a %s of its own; set mode: sidecar in its values" .Values.mode .Values.mode) }}
{{- end }}
{{- end }}

{{- define "maintainer.sidecar.container" -}}
{{- include "maintainer.sidecar.check" . }}
{{- include "maintainer.container" (dict "root" . "args" (list "run") "daemon" true "sidecar" true) }}
{{- end }}

{{- define "maintainer.sidecar.volumes" -}}
{{- include "maintainer.sidecar.check" . }}
{{- include "maintainer.volumes" (dict "root" . "sidecar" true) }}
{{- end }}

{{- define "maintainer.sidecar.checksum" -}}
{{- include "maintainer.sidecar.check" . }}
{{- include "maintainer.configChecksum" . }}
{{- end }}
