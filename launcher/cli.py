"""`arks`: the command line. `arks up` runs the local stack, `arks sim` one simulated engine."""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import shlex
import signal
import sys
import threading
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from arks import api
from arks.policy import PolicyError, read_policy_file
from arks.wire import ANNOTATION_DEMO
from launcher import sim, usage

DEMO_POLICY = Path(str(resources.files("launcher") / "demo" / "policy.yaml"))


def printable_tokens(policy_path: Path) -> dict[str, str]:
    """Plain tokens of the demo's Secrets (annotated `arks.ai/demo: "true"`), by user, for the
    banner only. A real token is never printed, whatever policy file holds it."""
    objects = [obj for _, obj in read_policy_file(policy_path)]
    secrets_by_key: dict[tuple[str, str], Mapping[str, str]] = {}
    for obj in objects:
        annotations = (obj.get("metadata") or {}).get("annotations") or {}
        if obj.get("kind") == "Secret" and annotations.get(ANNOTATION_DEMO) == "true":
            secret = api.parse_secret(obj)
            secrets_by_key[(secret.key.namespace, secret.key.name)] = secret.data
    found: dict[str, str] = {}
    for obj in objects:
        if obj.get("kind") != "ArksToken":
            continue
        token = api.parse_token(obj)
        if token.secret_ref is not None:
            plain = secrets_by_key.get((token.key.namespace, token.secret_ref.name), {}).get(
                token.secret_ref.key
            )
            if plain:
                found[str(token.key)] = plain
    return found


def _banner(stack: Any, tokens: Mapping[str, str], prometheus_installed: bool = False) -> str:
    models = sorted({e.model for e in stack.policy.endpoints.values()})
    lines = [
        "Arks is up.",
        f"  OpenAI endpoint  {stack.url}/v1",
        f"  Envoy admin      {stack.admin_url}",
        f"  Gateway metrics  {stack.metrics_url}",
        f"  Controller       {stack.controller_url}/metrics",
        f"  Engine weights   {stack.controller_url}/status",
        f"  Models           {', '.join(models) or '(none)'}",
        f"  Logs             {stack.settings.state_dir / 'logs'}",
        f"  Usage ledger     {stack.settings.ledger_url or 'off'}",
    ]
    if stack.prometheus_url is not None:
        rules = len(stack.prometheus_rules)
        plural = "" if rules == 1 else "s"
        lines.append(f"  Prometheus       {stack.prometheus_url}   ({rules} rule file{plural})")
    elif prometheus_installed:
        lines.append(
            "  Prometheus       installed: `arks up --prometheus` starts one scraping all this"
        )
    if not tokens:
        lines += ["", "Tokens: the policy's own (never printed); `arks token` makes a new one."]
    else:
        user, token = next(iter(tokens.items()))
        body = {
            "model": models[0] if models else "MODEL",
            "messages": [{"role": "user", "content": "Hello!"}],
        }
        lines += [
            f"  Demo token       {token}   (ArksToken {user})",
            "",
            "Try:",
            f"  curl {stack.url}/v1/chat/completions \\",
            f"    -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' \\",
            f"    -d {shlex.quote(json.dumps(body))}",
        ]
    lines += ["", "Ctrl-C stops everything."]
    return "\n".join(lines)


def cmd_up(args: argparse.Namespace) -> int:
    from launcher.prometheus import PrometheusMissing, prometheus_binary
    from launcher.stack import LocalStack, StackSettings

    if args.extproc_workers > 1 and not args.redis:
        print(
            f"arks up: --extproc-workers {args.extproc_workers} needs --redis: limits and "
            "budgets in one process's memory would be enforced once per worker",
            file=sys.stderr,
        )
        return 2
    if args.extproc_workers < 1:
        print("arks up: --extproc-workers must be at least 1", file=sys.stderr)
        return 2
    if args.prometheus and prometheus_binary() is None:
        print(f"arks up: --prometheus: {PrometheusMissing()}", file=sys.stderr)
        return 1
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = StackSettings(
        policy=args.policy.resolve(),
        state_dir=args.state_dir.resolve(),
        port=args.port,
        admin_port=args.admin_port,
        metrics_port=args.metrics_port,
        controller_metrics_port=args.controller_metrics_port,
        prometheus_port=args.prometheus_port if args.prometheus else None,
        redis=args.redis,
        simulate=not args.no_sim,
        ledger=None if args.no_ledger else args.ledger,
        cors_origins=tuple(args.cors_origins),
        trust_client_request_id=args.trust_client_request_id,
        extproc_workers=args.extproc_workers,
    )
    try:
        tokens = printable_tokens(settings.policy)
    except (PolicyError, api.ObjectError) as err:
        print(f"arks up: {err}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stack = LocalStack(settings)
    try:
        stack.start()
    except Exception as err:  # a clear one-line reason beats a traceback here
        print(f"arks up: could not start: {err}", file=sys.stderr)
        return 1
    try:
        print(_banner(stack, tokens, prometheus_binary() is not None), flush=True)
        # A child that dies (killed, crashed) is started again, and the console says so.
        stack.supervisor.supervise(lambda line: print(f"arks up: {line}", flush=True))
        stop.wait()
    finally:
        print("\nStopping…", flush=True)
        stack.stop()
    return 0


def cmd_sim(args: argparse.Namespace) -> int:
    sim.main(args)
    return 0


def cmd_controller(argv: list[str]) -> int:
    from controller.server import Settings, run

    return run(Settings.from_args(argv))


def cmd_usage(args: argparse.Namespace) -> int:
    return usage.run(args)


def cmd_token(args: argparse.Namespace) -> int:
    token = "sk-arks-" + secrets.token_urlsafe(32)
    print(f"token:     {token}\ntokenHash: {api.token_digest(token)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arks", description="Arks: multi-tenant LLM inference gateway"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run the local stack: Envoy, extproc and simulated engines")
    up.add_argument(
        "--policy", type=Path, default=DEMO_POLICY, help="policy YAML (default: the demo policy)"
    )
    up.add_argument("--port", type=int, default=8080, help="the OpenAI endpoint's port")
    up.add_argument("--admin-port", type=int, default=9901, help="Envoy's admin port")
    up.add_argument("--metrics-port", type=int, default=9101, help="the gateway's Prometheus port")
    up.add_argument(
        "--controller-metrics-port",
        type=int,
        default=9103,
        help="the controller's /metrics and /status port (0: any free port)",
    )
    up.add_argument(
        "--prometheus",
        action="store_true",
        help="also run a local Prometheus scraping the stack, with Arks' rules (needs the "
        "prometheus binary: apt-get install prometheus)",
    )
    up.add_argument("--prometheus-port", type=int, default=9090, help="the local Prometheus's port")
    up.add_argument(
        "--redis", metavar="URL", help="Redis for rate-limit counters (default: in memory)"
    )
    up.add_argument(
        "--extproc-workers",
        type=int,
        default=1,
        help="extproc processes on one port (the kernel spreads Envoy's connections, at least "
        "one per Envoy thread, over them), their metrics on --metrics-port and the ports after; "
        "above 1 needs --redis, where the limits are shared",
    )
    up.add_argument(
        "--state-dir", type=Path, default=Path(".arks"), help="generated config and logs"
    )
    up.add_argument("--no-sim", action="store_true", help="do not simulate the loopback backends")
    up.add_argument(
        "--ledger",
        metavar="URL",
        default="sqlite:///{state_dir}/usage.db",
        help="where each request's usage is recorded: sqlite:///PATH or postgresql://... "
        "(default: %(default)s)",
    )
    up.add_argument("--no-ledger", action="store_true", help="record no usage ledger")
    up.add_argument(
        "--cors-origin",
        dest="cors_origins",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a browser origin allowed to call the API (repeatable; `*`: any); default: none",
    )
    up.add_argument(
        "--trust-client-request-id",
        action="store_true",
        help="keep a client's x-request-id instead of Envoy's own (only behind a trusted proxy)",
    )
    up.set_defaults(func=cmd_up)

    simulator = commands.add_parser("sim", help="run one simulated OpenAI-compatible engine")
    sim.add_arguments(simulator)
    simulator.set_defaults(func=cmd_sim)

    # Its options are the controller's own (`arks controller --help`); main() hands them over.
    commands.add_parser(
        "controller", help="reconcile the arks.ai/v1 resources of a cluster", add_help=False
    )

    token = commands.add_parser(
        "token", help="make a new API token and its tokenHash for an ArksToken"
    )
    token.set_defaults(func=cmd_token)

    report = commands.add_parser(
        "usage", help="tokens and cost from the usage ledger, by namespace, user, model and period"
    )
    usage.add_arguments(report)
    report.set_defaults(func=cmd_usage)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["controller"]:
        sys.exit(cmd_controller(argv[1:]))
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
