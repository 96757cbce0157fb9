"""NetworkPolicy (networking.k8s.io/v1) as a conforming CNI enforces it, for holding a flow
against the installed policies.

https://kubernetes.io/docs/concepts/services-networking/network-policies/ : a pod selected by no
policy of a direction is open in that direction; a pod selected by some is isolated, and a
connection passes when any rule of any selecting policy allows it (ingress at the destination
AND egress at the source). A peer with namespaceSelector and podSelector in one element is the
AND of both; podSelector alone means the policy's own namespace; a rule without `from`/`to`
matches every peer, without `ports` every port. `matchExpressions` is not used by our policies
and is refused here. An ipBlock matches by address (CIDR minus `except`); an endpoint on a
node's own network (a hostNetwork pod such as node-local DNS) is matched by ipBlock only, never
by pod or namespace selectors (Calico and Cilium treat it as the host).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Pod:
    namespace: str
    labels: Mapping[str, str]
    ip: str = ""
    host_network: bool = False

    def namespace_labels(self) -> dict[str, str]:
        # The label the API server puts on every namespace (1.22+).
        return {"kubernetes.io/metadata.name": self.namespace}


def _selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"unsupported selector {selector}"
    return dict(selector.get("matchLabels") or {}).items() <= dict(labels).items()


def _in_block(block: Mapping[str, Any], ip: str) -> bool:
    if not ip:
        return False
    address = ipaddress.ip_address(ip)
    inside = address in ipaddress.ip_network(block["cidr"])
    return inside and not any(address in ipaddress.ip_network(x) for x in block.get("except", []))


def _peer(peer: Mapping[str, Any], policy_namespace: str, pod: Pod) -> bool:
    if "ipBlock" in peer:
        assert set(peer) == {"ipBlock"}, f"ipBlock goes alone in a peer: {peer}"
        return _in_block(peer["ipBlock"], pod.ip)
    if pod.host_network:
        return False
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], pod.namespace_labels()):
            return False
    elif pod.namespace != policy_namespace:
        return False
    return _selects(peer.get("podSelector") or {}, pod.labels)


def _port(ports: list[Mapping[str, Any]] | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    return any(
        p.get("protocol", "TCP") == protocol and p.get("port") in (None, port) for p in ports
    )


def _direction_allows(
    policies: Iterable[Mapping[str, Any]],
    direction: str,
    subject: Pod,
    peer: Pod,
    port: int,
    protocol: str,
) -> bool:
    field, peers_field = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == subject.namespace
        and _selects(p["spec"]["podSelector"], subject.labels)
        and direction in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get(field) or []:
            peers = rule.get(peers_field)
            if not _port(rule.get("ports"), port, protocol):
                continue
            if peers is None or any(_peer(x, policy["metadata"]["namespace"], peer) for x in peers):
                return True
    return False


def allows(
    policies: Iterable[Mapping[str, Any]],
    source: Pod,
    destination: Pod,
    port: int,
    protocol: str = "TCP",
) -> bool:
    """Whether `source` may open a connection to `destination`'s `port`."""
    policies = list(policies)
    return _direction_allows(
        policies, "Egress", source, destination, port, protocol
    ) and _direction_allows(policies, "Ingress", destination, source, port, protocol)
