"""Certificates made by the openssl command: a CA and the certificates it signs, as Envoy
Gateway's certgen lays them out (a Secret's `ca.crt`, `tls.crt`, `tls.key`)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def authority(tmp: Path, cn: str = "test-ca") -> dict[str, Path]:
    """A self-signed CA: `ca.crt` and `ca.key` in `tmp`."""
    out = {"ca.crt": tmp / "ca.crt", "ca.key": tmp / "ca.key"}
    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={cn}",
        "-keyout", str(out["ca.key"]), "-out", str(out["ca.crt"]),
    )  # fmt: skip
    return out


def issue(
    tmp: Path, ca: dict[str, Path], name: str, cn: str, sans: tuple[str, ...] = ()
) -> tuple[Path, Path]:
    """A certificate and its key, `tmp/name.crt` and `tmp/name.key`, signed by `ca`, for CN `cn`
    with the SANs `sans` (openssl's form: `DNS:x`, `IP:1.2.3.4`; default `DNS:<cn>`)."""
    key, csr, crt, ext = (tmp / f"{name}.{suffix}" for suffix in ("key", "csr", "crt", "ext"))
    ext.write_text(f"subjectAltName={','.join(sans or (f'DNS:{cn}',))}\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
            "-keyout", str(key), "-out", str(csr))  # fmt: skip
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca["ca.crt"]),
            "-CAkey", str(ca["ca.key"]), "-CAcreateserial", "-days", "1",
            "-extfile", str(ext), "-out", str(crt))  # fmt: skip
    return crt, key


def certificates(tmp: Path) -> dict[str, Path]:
    """A CA and two certificates it signed: the xDS server's (for DNS name `envoy-gateway`, as
    Envoy Gateway's certgen names it) and the rate-limit service's client certificate."""
    out = authority(tmp)
    for name, cn in (("server", "envoy-gateway"), ("client", "envoy-ratelimit")):
        out[f"{name}.crt"], out[f"{name}.key"] = issue(tmp, out, name, cn)
    return out
