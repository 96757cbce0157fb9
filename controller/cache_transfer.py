"""Move a model from its claim to a node's disk: `python -m controller.cache_transfer`.

The node-local cache runs in its own namespace (hostPath needs a privileged one) and cannot
mount the tenant's claim, so a source pod in the tenant's namespace serves the claim read-only
and the cache pods fetch from it:

    serve  --root /models --port 8080          the claim's files: GET /index (JSON list with
                                               sizes), GET /files/<path> (one file)
    fetch  --source URL --root /cache --name M --id ID [--require-marker] [--reserve-bytes N]
                                               copy into <root>/.M.partial, check free space
                                               first, verify every size, write the marker, rename
                                               to <root>/M (a copy is complete or absent)
    remove --root /cache --name M              delete <root>/M and its partial copy

Stdlib only: it runs from the Arks image on any node. Exit codes: 0 done, 1 source not
complete or unreachable, 2 not enough free disk (the message says how much is needed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MARKER = ".arks-complete"  # controller.render.model.MARKER; repeated to stay import-light
CHUNK = 1 << 20
EXIT_SOURCE = 1
EXIT_NO_SPACE = 2
TERMINATION_LOG = Path("/dev/termination-log")


class TransferError(Exception):
    def __init__(self, message: str, code: int = EXIT_SOURCE) -> None:
        super().__init__(message)
        self.code = code


# --- serving ------------------------------------------------------------------------------------


def walk(root: Path) -> Iterator[tuple[str, int]]:
    """(relative path, size) of every regular file under `root`, sorted; symlinks are skipped."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                yield path.relative_to(root).as_posix(), path.stat().st_size


def index(root: Path) -> dict[str, Any]:
    listed = list(walk(root))
    return {
        "files": [{"path": p, "size": size} for p, size in listed],
        "bytes": sum(size for _, size in listed),
    }


def _handler(root: Path) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/index":
                body = json.dumps(index(root)).encode()
                self._send(HTTPStatus.OK, "application/json", len(body))
                self.wfile.write(body)
                return
            if self.path == "/healthz":
                self._send(HTTPStatus.OK, "text/plain", 0)
                return
            relative = urllib.parse.unquote(self.path.removeprefix("/files/"))
            path = (root / relative).resolve()
            # Only files inside the root: no `..`, no symlink out of it.
            if (
                not self.path.startswith("/files/")
                or not path.is_relative_to(root.resolve())
                or not path.is_file()
                or (root / relative).is_symlink()
            ):
                self._send(HTTPStatus.NOT_FOUND, "text/plain", 0)
                return
            size = path.stat().st_size
            self._send(HTTPStatus.OK, "application/octet-stream", size)
            with path.open("rb") as f:
                shutil.copyfileobj(f, self.wfile, CHUNK)

        def _send(self, status: HTTPStatus, content_type: str, length: int) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(length))
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            sys.stderr.write("arks-cache-source: " + (format % args) + "\n")

    return Handler


def make_server(root: Path, host: str, port: int) -> ThreadingHTTPServer:
    return ThreadingHTTPServer((host, port), _handler(root))


# --- fetching -----------------------------------------------------------------------------------


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _get(url: str, timeout_s: float) -> Any:
    return urllib.request.urlopen(url, timeout=timeout_s)


def _fetch_file(source: str, relative: str, size: int, dest: Path, timeout_s: float) -> None:
    url = f"{source}/files/{urllib.parse.quote(relative)}"
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    with _get(url, timeout_s) as response, dest.open("wb") as out:
        shutil.copyfileobj(response, out, CHUNK)
    got = dest.stat().st_size
    if got != size:  # a cut connection: never a short file in the copy
        raise TransferError(f"{relative}: got {got} of {size} bytes")
    dest.chmod(0o644)  # engines of any uid read the copy


def fetch(
    source: str,
    root: Path,
    name: str,
    source_id: str,
    *,
    require_marker: bool = False,
    reserve_bytes: int = 0,
    retries: int = 3,
    timeout_s: float = 60.0,
) -> str:
    """Copy the source's files to `root/name` (see the module doc); returns what happened."""
    target, partial = root / name, root / f".{name}.partial"
    marker = target / MARKER
    if marker.is_file() and marker.read_text().strip() == source_id:
        return f"{target} already holds source {source_id}"
    try:
        with _get(f"{source}/index", timeout_s) as response:
            listing = json.load(response)
    except OSError as e:
        raise TransferError(f"cannot read {source}/index: {e}") from e
    files = [(str(f["path"]), int(f["size"])) for f in listing["files"]]
    for relative, _ in files:
        # The source is reached through a Service of the tenant's namespace, where any pod with
        # its labels answers too: a path it lists must stay inside this model's copy.
        parts = relative.split("/")
        if relative.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise TransferError(f"the source lists {relative!r}, a path outside the model")
    if require_marker and MARKER not in {p for p, _ in files}:
        raise TransferError("the claim has no complete model (no marker): waiting for it")
    need = sum(size for path, size in files if path != MARKER)
    # What an earlier copy of this model holds is freed when the new one is renamed in place,
    # but both exist until then: count only the space that is free now.
    shutil.rmtree(partial, ignore_errors=True)
    free = free_bytes(root)
    if free < need + reserve_bytes:
        raise TransferError(
            f"not enough disk for the model on this node: it needs {need} bytes "
            f"(+{reserve_bytes} kept free), {free} are free under {root}",
            EXIT_NO_SPACE,
        )
    partial.mkdir(parents=True, mode=0o755)
    for relative, size in files:
        if relative == MARKER:
            continue
        for attempt in range(retries + 1):
            try:
                _fetch_file(source, relative, size, partial / relative, timeout_s)
                break
            except (OSError, TransferError) as e:
                if attempt == retries:
                    raise TransferError(f"cannot fetch {relative}: {e}") from e
                time.sleep(min(2**attempt, 10))
    (partial / MARKER).write_text(source_id + "\n")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return f"source {source_id} is cached in {target} ({need} bytes)"


def remove(root: Path, name: str) -> str:
    for path in (root / name, root / f".{name}.partial"):
        shutil.rmtree(path, ignore_errors=True)
    return f"removed {root / name}"


# --- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m controller.cache_transfer", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--root", type=Path, required=True)
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8080)
    get = sub.add_parser("fetch")
    get.add_argument("--source", required=True)
    get.add_argument("--root", type=Path, required=True)
    get.add_argument("--name", required=True)
    get.add_argument("--id", required=True)
    get.add_argument("--require-marker", action="store_true")
    get.add_argument("--reserve-bytes", type=int, default=0)
    rm = sub.add_parser("remove")
    rm.add_argument("--root", type=Path, required=True)
    rm.add_argument("--name", required=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            make_server(args.root, args.host, args.port).serve_forever()
            return 0
        if args.command == "fetch":
            message = fetch(
                args.source.rstrip("/"),
                args.root,
                args.name,
                args.id,
                require_marker=args.require_marker,
                reserve_bytes=args.reserve_bytes,
            )
        else:
            message = remove(args.root, args.name)
    except TransferError as e:
        message = f"arks: {e}"
        sys.stderr.write(message + "\n")
        # Kubernetes shows it in the pod status (terminated.message): the model's status reads it.
        if TERMINATION_LOG.is_file():  # the kubelet creates it in every container
            try:
                TERMINATION_LOG.write_text(message)
            except OSError:
                pass
        return e.code
    sys.stdout.write(f"arks: {message}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
