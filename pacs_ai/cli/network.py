"""pacs-ai send / echo: a small C-STORE and C-ECHO client for administrators."""

from __future__ import annotations

import argparse
import ssl
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from pynetdicom import _config, build_context

from pacs_ai.cli.common import parse_host_port
from pacs_ai.config import Destination, TlsConfig
from pacs_ai.errors import ConfigError, DeliveryError
from pacs_ai.ops.tls import client_context
from pacs_ai.receive.contexts import VERIFICATION_SOP_CLASS, status_name
from pacs_ai.send.contexts import OutgoingObject, transfer_syntax_preference
from pacs_ai.send.sender import MAX_CONTEXTS, open_association, outgoing_object, send_objects


def _files(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def _peer(address: tuple[str, int], called_aet: str) -> Destination:
    host, port = address
    return Destination(name=f"{host}:{port}", ae_title=called_aet, host=host, port=port)


def _cmd_echo(args: argparse.Namespace) -> int:
    peer = _peer(args.address, args.called_aet)
    where = f"echo {peer.host}:{peer.port} ({peer.ae_title})"
    try:
        assoc = open_association(
            peer, [build_context(VERIFICATION_SOP_CLASS)], calling_ae_title=args.aet, timeout_s=args.timeout,
            ssl_context=_tls_context(args),
        )
    except DeliveryError as exc:
        print(f"{where}: {exc.detail}")
        return 1
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
        assoc.ae.shutdown()
    code = int(status.Status) if status and "Status" in status else None
    if code == 0:
        print(f"{where}: success")
        return 0
    print(f"{where}: failed ({'no response' if code is None else f'0x{code:04X}'})")
    return 1


def _batches(objects: Sequence[OutgoingObject]) -> Iterator[list[OutgoingObject]]:
    """Consecutive groups of ``objects`` whose proposal (``propose``: one presentation context per SOP class
    and transfer syntax) needs at most MAX_CONTEXTS contexts."""
    batch: list[OutgoingObject] = []
    pairs: set[tuple[str, str]] = set()
    for obj in objects:
        mine = {(c, ts) for c in obj.sop_classes for ts in transfer_syntax_preference(obj.transfer_syntax_uid)}
        if batch and len(pairs | mine) > MAX_CONTEXTS:
            yield batch
            batch, pairs = [], set()
        batch.append(obj)
        pairs |= mine
    if batch:
        yield batch


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not (args.tls or args.tls_ca or args.tls_cert):
        return None
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert/--tls-key", "give both the client certificate and its key, or neither")
    return client_context(TlsConfig(args.tls_cert, args.tls_key, args.tls_ca), key="--tls")


def _cmd_send(args: argparse.Namespace) -> int:
    """C-STORE files with the deliveries' client core (``pacs_ai.send.sender``): each file is proposed in
    its own transfer syntax (then Explicit and Implicit VR Little Endian) and sent as it is on disk when
    the peer accepts that syntax; one association per batch of at most 128 presentation contexts."""
    # A file sent in its own transfer syntax goes byte for byte as it is on disk (no re-encoding).
    _config.STORE_SEND_CHUNKED_DATASET = True
    peer = _peer(args.to, args.called_aet)
    ssl_context = _tls_context(args)
    objects: list[OutgoingObject] = []
    failures = 0
    for i, path in enumerate(_files(args.files)):
        try:
            objects.append(outgoing_object(peer.name, f"{i}", path))
        except DeliveryError as exc:
            print(f"SKIPPED  {path}: not a readable DICOM file ({exc.detail})")
            failures += 1
    sent = 0
    for batch in _batches(objects):
        try:
            outcomes = send_objects(peer, batch, calling_ae_title=args.aet, timeout_s=args.timeout, ssl_context=ssl_context)
        except DeliveryError as exc:  # DestinationUnreachable: association rejected, aborted or no connection
            for obj in batch:
                print(f"FAILED   {obj.path}: {exc.detail}")
            failures += len(batch)
            continue
        for obj, outcome in zip(batch, outcomes, strict=True):
            code = outcome.status
            if outcome.stored and code is not None:
                print(f"{'OK' if code == 0 else 'WARNING':<8} {obj.path}: 0x{code:04X} {status_name(code)}")
                sent += 1
            else:
                what = f"0x{code:04X} {status_name(code)}" if code is not None else outcome.detail
                print(f"FAILED   {obj.path}: {what}")
                failures += 1
    print(f"{sent} sent, {failures} failed")
    return 0 if failures == 0 else 1


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--aet", default="PACSAI-SCU", help="our (calling) AE title (default PACSAI-SCU)")
    p.add_argument("--called-aet", default="PACSAI", help="the peer's AE title (default PACSAI)")
    p.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds (default 30)")
    p.add_argument("--tls", action="store_true", help="use TLS, trusting the system's CA certificates")
    p.add_argument("--tls-ca", type=Path, metavar="PEM", help="use TLS, trusting only the CA certificates in PEM")
    p.add_argument("--tls-cert", type=Path, metavar="PEM", help="client certificate (for mutual TLS; with --tls-key)")
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="the client certificate's private key")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``send`` and ``echo``."""
    p = subparsers.add_parser("send", help="send DICOM files with C-STORE (each in its own transfer syntax when accepted)")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="files or folders (searched recursively)")
    p.add_argument("--to", required=True, type=parse_host_port, metavar="HOST:PORT")
    _common(p)
    p.set_defaults(func=_cmd_send)

    p = subparsers.add_parser("echo", help="check a DICOM peer with C-ECHO")
    p.add_argument("address", type=parse_host_port, metavar="HOST:PORT")
    _common(p)
    p.set_defaults(func=_cmd_echo)
