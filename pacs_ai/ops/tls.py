"""TLS contexts for DICOM (pynetdicom ``ssl_context`` / ``tls_args``), TLS 1.2 or newer.

* ``server_context(tls)``: the listener presents ``cert_file``/``key_file``; with ``ca_file`` every client
  must present a certificate signed by that CA (mutual TLS), otherwise the handshake fails.
* ``client_context(tls)``: the sender verifies the destination's certificate against ``tls.ca_file``
  (or the system trust store when there is none) and presents ``cert_file``/``key_file`` when given
  (needed by destinations that require mutual TLS).

DICOM peers are usually addressed by IP and their certificates often name no host, so the client checks
the certificate chain but not the host name unless ``check_hostname=True`` (then pass the host name as
the second item of pynetdicom's ``tls_args``). With a private CA, trust is pinned to that CA.
"""

from __future__ import annotations

import ssl

from pacs_ai.config import TlsConfig
from pacs_ai.errors import ConfigError

__all__ = ["client_context", "server_context"]


def _base(purpose: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


def _load_chain(ctx: ssl.SSLContext, tls: TlsConfig, key: str) -> None:
    try:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{key}.cert_file", f"cannot load certificate {tls.cert_file} with key {tls.key_file}: {exc}") from exc


def _load_ca(ctx: ssl.SSLContext, tls: TlsConfig, key: str) -> None:
    try:
        ctx.load_verify_locations(cafile=str(tls.ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{key}.ca_file", f"cannot load CA certificates from {tls.ca_file}: {exc}") from exc


def server_context(tls: TlsConfig, *, key: str = "listener.tls") -> ssl.SSLContext:
    """Context for the listener; ``key`` names the config table in error messages."""
    if tls.cert_file is None or tls.key_file is None:
        raise ConfigError(key, "the listener needs both cert_file and key_file")
    ctx = _base(ssl.PROTOCOL_TLS_SERVER)
    _load_chain(ctx, tls, key)
    if tls.ca_file is not None:
        _load_ca(ctx, tls, key)
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(
    tls: TlsConfig | None, *, key: str = "destinations.tls", check_hostname: bool = False
) -> ssl.SSLContext:
    """Context for the sender (or any SCU); ``key`` names the config table in error messages."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    if tls is not None and tls.ca_file is not None:
        _load_ca(ctx, tls, key)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls is not None and tls.cert_file is not None and tls.key_file is not None:
        _load_chain(ctx, tls, key)
    return ctx
