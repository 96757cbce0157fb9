"""The Kubernetes resources Arks reads or writes, each named once: (group, version, plural)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote


@dataclass(frozen=True)
class Resource:
    """A namespaced (or cluster-scoped) resource, e.g. Resource("arks.ai", "v1", "arksapplications")."""

    group: str
    version: str
    plural: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(
        self, namespace: str | None = None, name: str | None = None, subresource: str | None = None
    ) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{quote(namespace, safe='')}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{quote(name, safe='')}"
        if subresource is not None:
            base += f"/{subresource}"
        return base


# arks.ai/v1
APPLICATIONS = Resource("arks.ai", "v1", "arksapplications")
DISAGGREGATED_APPLICATIONS = Resource("arks.ai", "v1", "arksdisaggregatedapplications")
ENDPOINTS = Resource("arks.ai", "v1", "arksendpoints")
MODELS = Resource("arks.ai", "v1", "arksmodels")
QUOTAS = Resource("arks.ai", "v1", "arksquotas")
TOKENS = Resource("arks.ai", "v1", "arkstokens")

# Kubernetes
CONFIGMAPS = Resource("", "v1", "configmaps")
EVENTS = Resource("", "v1", "events")
PODS = Resource("", "v1", "pods")
PVCS = Resource("", "v1", "persistentvolumeclaims")
SECRETS = Resource("", "v1", "secrets")
SERVICEACCOUNTS = Resource("", "v1", "serviceaccounts")
SERVICES = Resource("", "v1", "services")
DAEMONSETS = Resource("apps", "v1", "daemonsets")
DEPLOYMENTS = Resource("apps", "v1", "deployments")
JOBS = Resource("batch", "v1", "jobs")
HPAS = Resource("autoscaling", "v2", "horizontalpodautoscalers")
LEASES = Resource("coordination.k8s.io", "v1", "leases")
ENDPOINTSLICES = Resource("discovery.k8s.io", "v1", "endpointslices")
ROLES = Resource("rbac.authorization.k8s.io", "v1", "roles")
ROLEBINDINGS = Resource("rbac.authorization.k8s.io", "v1", "rolebindings")
NETWORKPOLICIES = Resource("networking.k8s.io", "v1", "networkpolicies")

# Other projects' kinds
HTTPROUTES = Resource("gateway.networking.k8s.io", "v1", "httproutes")
BACKENDS = Resource("gateway.envoyproxy.io", "v1alpha1", "backends")
PATCH_POLICIES = Resource("gateway.envoyproxy.io", "v1alpha1", "envoypatchpolicies")
LEADERWORKERSETS = Resource("leaderworkerset.x-k8s.io", "v1", "leaderworkersets")
SCALEDOBJECTS = Resource("keda.sh", "v1alpha1", "scaledobjects")
