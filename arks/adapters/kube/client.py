"""The one way a service gets a Kubernetes API client: in-cluster, from kubeconfig, or a URL."""

from __future__ import annotations

import kubernetes
from kubernetes.client import ApiClient

IN_CLUSTER = "in-cluster"
KUBECONFIG = "kubeconfig"


def api_client(kube_host: str, user_agent: str) -> ApiClient:
    """`kube_host` is "in-cluster" (the pod's service account), "kubeconfig" (the current
    context), or an API server URL (plain HTTP: tests). `user_agent` names the service in the
    API server's audit log."""
    if kube_host == IN_CLUSTER:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
        client = ApiClient()
    elif kube_host == KUBECONFIG:
        client = kubernetes.config.new_client_from_config()  # type: ignore[no-untyped-call]
    else:
        client = ApiClient(kubernetes.client.Configuration(host=kube_host))
    client.user_agent = user_agent
    return client
