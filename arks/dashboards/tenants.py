"""Tenants and usage: who uses what, what it costs, and how close each tenant is to its limits."""

from __future__ import annotations

from grafana_foundation_sdk.models.dashboard import Dashboard

from arks.dashboards.panels import (
    MODEL,
    NAMESPACE,
    USER,
    Board,
    bars,
    by,
    graph,
    instant,
    listing,
    rate,
    target,
)

UID = "arks-tenants"
TOP = 10
# Quota series are per quota object, not per user or model: namespace is their only filter.
QUOTA_LABELS = ("namespace", "quota", "type", "period")


def dashboard() -> Dashboard:
    b = Board(
        uid=UID,
        title="Arks / Tenants and usage",
        description="Per-tenant tokens, cost, requests, denials, quotas and rate limits.",
        variables=(NAMESPACE, MODEL, USER),
        source="arks_usage_tokens_total",
    )
    who = (NAMESPACE, MODEL, USER)
    tokens = b.where("arks_usage_tokens_total", *who)
    cost = b.where("arks_usage_cost_total", *who)
    tenant = ["namespace", "user"]

    b.row("Top tenants over the range")
    b.add(
        bars(
            f"Top {TOP} tenants by tokens",
            "Tokens charged over the dashboard's time range, per ArksToken (namespace/user).",
            [
                instant(
                    f"topk({TOP}, {by(tenant, f'increase({tokens}[$__range])')})",
                    "{{namespace}}/{{user}}",
                )
            ],
        ),
        bars(
            f"Top {TOP} tenants by cost",
            "Cost over the range, in the ArksQuota price table's currency.",
            [
                instant(
                    f"topk({TOP}, {by(tenant, f'increase({cost}[$__range])')})",
                    "{{namespace}}/{{user}}",
                )
            ],
            unit="short",  # the price table names no currency
        ),
    )

    b.row("Per user")
    b.add(
        graph(
            "Tokens per second per user",
            "Prompt and completion tokens charged.",
            [target(by([*tenant, "type"], rate(tokens)), "{{namespace}}/{{user}} {{type}}")],
            stacked=True,
        ),
        graph(
            "Cost per hour per user",
            "Spend rate in the price table's currency.",
            [target(f"{by(tenant, rate(cost))} * 3600", "{{namespace}}/{{user}}")],
            unit="short",  # the price table names no currency
        ),
        graph(
            "Requests per second per user",
            "Finished admitted requests by status.",
            [
                target(
                    by([*tenant, "code"], rate(b.where("arks_requests_total", *who))),
                    "{{namespace}}/{{user}} {{code}}",
                )
            ],
            unit="reqps",
        ),
        graph(
            "Denials per user by reason",
            "Requests refused by the gateway, by the limit or check that refused.",
            [
                target(
                    by([*tenant, "reason"], rate(b.where("arks_gateway_denials_total", *who))),
                    "{{namespace}}/{{user}} {{reason}}",
                )
            ],
            unit="reqps",
        ),
    )

    def quota(metric: str) -> str:
        return by(QUOTA_LABELS, b.where(metric, NAMESPACE), op="max")

    b.row("Quotas")
    b.add(
        graph(
            "Quota used vs limit",
            "Used (settled) and reserved (admitted, not yet settled) against the limit, per "
            "quota, type and period (max over gateway replicas: they share one store).",
            [
                target(
                    quota("arks_quota_used"), "{{namespace}}/{{quota}} {{type}} {{period}} used"
                ),
                target(
                    quota("arks_quota_reserved"),
                    "{{namespace}}/{{quota}} {{type}} {{period}} reserved",
                ),
                target(
                    quota("arks_quota_limit"), "{{namespace}}/{{quota}} {{type}} {{period}} limit"
                ),
            ],
        ),
        bars(
            "Quota use",
            "(used + reserved) / limit; red from 90 %.",
            [
                instant(
                    f"({quota('arks_quota_used')} + {quota('arks_quota_reserved')})"
                    f" / {quota('arks_quota_limit')}",
                    "{{namespace}}/{{quota}} {{type}} {{period}}",
                )
            ],
            unit="percentunit",
            steps=((None, "green"), (0.75, "orange"), (0.9, "red")),
            minimum=0,
            maximum=1,
        ),
        listing(
            "Time to quota reset",
            "When each quota's current period ends (no series for period `none`).",
            [
                instant(
                    f"{quota('arks_quota_reset_timestamp_seconds')} - time()",
                    "{{namespace}}/{{quota}} {{period}}",
                )
            ],
            unit="dtdurations",
            span=24,
        ),
    )

    # Every gateway replica shows the same shared figures: one series per limit, not per replica.
    limit_labels = ["namespace", "user", "model", "limit"]
    remaining = by(limit_labels, b.where("arks_rate_limit_remaining", *who), op="min")
    limit = by(limit_labels, b.where("arks_rate_limit_limit", *who), op="max")
    b.row("Rate limits")
    b.add(
        bars(
            "Rate limits nearest to exhaustion",
            "Remaining / limit of each configured limit (rpm, rpd, tpm, tpd, concurrency) per "
            "token and model, lowest first: 0 is over the limit.",
            [
                instant(
                    f"bottomk(20, {remaining} / {limit})",
                    "{{namespace}}/{{user}} {{model}} {{limit}}",
                )
            ],
            unit="percentunit",
            steps=((None, "red"), (0.1, "orange"), (0.25, "green")),
            minimum=0,
            maximum=1,
        ),
        graph(
            "Rate-limit decisions over and near the limit",
            "The limiter's decisions by domain (`arks_ratelimit_*`, keyed like "
            "envoyproxy/ratelimit's descriptors, not by tenant).",
            [
                target(by(["domain"], rate("arks_ratelimit_over_limit_total")), "{{domain}} over"),
                target(by(["domain"], rate("arks_ratelimit_near_limit_total")), "{{domain}} near"),
                target(
                    by(["domain"], rate("arks_ratelimit_shadow_mode_total")), "{{domain}} shadow"
                ),
            ],
            unit="ops",
        ),
    )

    b.row("Usage quality")
    b.add(
        graph(
            "Estimated usage per user",
            "Requests charged with an estimate because the engine reported no usage, by reason.",
            [
                target(
                    by(
                        [*tenant, "reason"],
                        rate(b.where("arks_usage_estimated_requests_total", *who)),
                    ),
                    "{{namespace}}/{{user}} {{reason}}",
                )
            ],
            unit="reqps",
        ),
        graph(
            "Unreported usage per user",
            "Requests whose access-log entry never arrived, charged with the prompt estimate.",
            [
                target(
                    by(tenant, rate(b.where("arks_usage_unreported_requests_total", *who))),
                    "{{namespace}}/{{user}}",
                )
            ],
            unit="reqps",
        ),
    )
    return b.build()
