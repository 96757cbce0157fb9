{{/*
The objects of one file of manifests/ (copied to files/ by `python -m arks.chart`), as
`kubectl kustomize` builds them (the release namespace on namespaced objects, the image tag),
changed only where the values say.
*/}}
{{- define "arks.file" -}}
{{- $root := .root -}}
{{- range $text := regexSplit "(?m)^---[ \\t]*$" ($root.Files.Get .path) -1 }}
{{- $obj := fromYaml $text }}
{{- if hasKey $obj "Error" }}{{ fail (printf "%s: %s" $.path $obj.Error) }}{{ end }}
{{- if and $obj.kind (include "arks.keep" (dict "root" $root "obj" $obj)) }}
{{- $_ := include "arks.transform" (dict "root" $root "obj" $obj) }}
---
{{ toYaml $obj }}
{{- end }}
{{- end }}
{{- end }}

{{- define "arks.clusterScoped" -}}
{{- list "Namespace" "CustomResourceDefinition" "ClusterRole" "ClusterRoleBinding" "GatewayClass" "ValidatingAdmissionPolicy" "ValidatingAdmissionPolicyBinding" | toJson }}
{{- end }}

{{- define "arks.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "arks.redisSecret" -}}
{{- .Values.redis.auth.existingSecret | default "arks-redis" }}
{{- end }}

{{/* Whether an object of manifests/ is installed: "true" or "". */}}
{{- define "arks.keep" -}}
{{- $v := .root.Values }}
{{- $labels := .obj.metadata.labels | default dict }}
{{- if and (eq .obj.kind "Namespace") (eq .obj.metadata.name "arks-cache") }}true
{{- else if eq .obj.kind "Namespace" }}
{{- if $v.namespace.create }}true{{ end }}
{{- else if and (eq .obj.kind "SecurityPolicy") (eq .obj.metadata.name "arks-cors") }}
{{- /* templates/cors.yaml renders it, with the values' origins */}}
{{- else if eq (get $labels "app.kubernetes.io/name") "arks-redis" }}
{{- if $v.redis.enabled }}true{{ end }}
{{- else }}true{{ end }}
{{- end }}

{{/* Changes `obj` in place; prints nothing. */}}
{{- define "arks.transform" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $obj := .obj }}
{{- $meta := $obj.metadata }}
{{- if not (has $obj.kind (include "arks.clusterScoped" . | fromJsonArray)) }}
{{- $_ := set $meta "namespace" $root.Release.Namespace }}
{{- end }}
{{- $_ := set $meta "labels" (merge ($meta.labels | default dict) (include "arks.labels" $root | fromYaml)) }}
{{- $secret := include "arks.redisSecret" $root }}
{{- if has $obj.kind (list "Deployment" "StatefulSet") }}
{{- if hasKey $v.replicas $meta.name }}
{{- $_ := set $obj.spec "replicas" (index $v.replicas $meta.name) }}
{{- end }}
{{- $pod := $obj.spec.template.spec }}
{{- range $c := $pod.containers }}
{{- if eq $c.image "ghcr.io/arks-ai/arks" }}
{{- $_ := set $c "image" (printf "%s:%s" $v.image.repository ($v.image.tag | default $root.Chart.AppVersion)) }}
{{- end }}
{{- if $c.args }}
{{- $args := list }}
{{- range $a := $c.args }}
{{- if and (hasPrefix "--redis=" $a) (not $v.redis.enabled) }}
{{- if not $v.redis.url }}{{ fail "redis.enabled=false needs redis.url" }}{{ end }}
{{- $a = printf "--redis=%s" $v.redis.url }}
{{- end }}
{{- if hasPrefix "--prometheus-url=" $a }}
{{- $a = printf "--prometheus-url=%s" $v.autoscaling.prometheusUrl }}
{{- end }}
{{- $args = append $args $a }}
{{- end }}
{{- $_ := set $c "args" $args }}
{{- end }}
{{- range $e := $c.env | default list }}
{{- if and $e.valueFrom $e.valueFrom.secretKeyRef }}
{{- if eq $e.valueFrom.secretKeyRef.name "arks-redis" }}
{{- $_ := set $e.valueFrom.secretKeyRef "name" $secret }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- range $vol := $pod.volumes | default list }}
{{- if and $vol.secret (eq $vol.secret.secretName "arks-redis") }}
{{- $_ := set $vol.secret "secretName" $secret }}
{{- end }}
{{- end }}
{{- end }}
{{- if eq $obj.kind "NetworkPolicy" }}
{{- range $rule := $obj.spec.ingress | default list }}
{{- range $peer := $rule.from | default list }}
{{- if $peer.namespaceSelector }}
{{- $match := $peer.namespaceSelector.matchLabels | default dict }}
{{- if eq (get $match "kubernetes.io/metadata.name") "monitoring" }}
{{- $_ := set $match "kubernetes.io/metadata.name" $v.monitoring.namespace }}
{{- else if eq (get $match "kubernetes.io/metadata.name") "envoy-gateway-system" }}
{{- $_ := set $match "kubernetes.io/metadata.name" $v.envoyGateway.namespace }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (eq $meta.name "arks-ratelimit") (not $v.redis.enabled) }}
{{- $_ := set $obj.spec "policyTypes" (list "Ingress") }}
{{- $_ := unset $obj.spec "egress" }}
{{- end }}
{{- end }}
{{- if has $obj.kind (list "ServiceMonitor" "PodMonitor" "PrometheusRule") }}
{{- if $v.monitoring.enabled }}
{{- $_ := set $meta "labels" (merge $meta.labels ($v.monitoring.labels | default dict)) }}
{{- end }}
{{- end }}
{{- if and (eq $obj.kind "PodMonitor") (eq $meta.name "arks-envoy") }}
{{- $_ := set $obj.spec "namespaceSelector" (dict "matchNames" (list $v.envoyGateway.namespace)) }}
{{- end }}
{{- if and (eq $obj.kind "PodMonitor") (eq $meta.name "arks-engines") }}
{{- $pm := $v.autoscaling.podMonitor }}
{{- $_ := set $meta "labels" (merge $meta.labels ($pm.labels | default dict)) }}
{{- if $pm.namespaces }}
{{- $_ := set $obj.spec "namespaceSelector" (dict "matchNames" $pm.namespaces) }}
{{- end }}
{{- end }}
{{- end }}
