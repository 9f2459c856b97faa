"""pacs-ai send / echo: a small C-STORE and C-ECHO client for administrators."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification

from pacs_ai.cli.common import parse_host_port
from pacs_ai.receive.contexts import status_name

MAX_CONTEXTS = 128  # DICOM limit on presentation contexts per association


def _files(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def _client(args: argparse.Namespace) -> AE:
    ae = AE(ae_title=args.aet)
    ae.acse_timeout = args.timeout
    ae.dimse_timeout = args.timeout
    ae.network_timeout = args.timeout
    ae.maximum_pdu_size = 0
    return ae


def _cmd_echo(args: argparse.Namespace) -> int:
    host, port = args.address
    ae = _client(args)
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=args.called_aet)
    if not assoc.is_established:
        print(f"echo {host}:{port} ({args.called_aet}): association rejected or failed")
        return 1
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = int(status.Status) if status and "Status" in status else None
    if code == 0:
        print(f"echo {host}:{port} ({args.called_aet}): success")
        return 0
    print(f"echo {host}:{port} ({args.called_aet}): failed ({'no response' if code is None else f'0x{code:04X}'})")
    return 1


def _cmd_send(args: argparse.Namespace) -> int:
    host, port = args.to
    # Send each file's encoded dataset as it is on disk (its own transfer syntax, no re-encoding).
    _config.STORE_SEND_CHUNKED_DATASET = True
    items: list[tuple[Path, str, str]] = []  # (path, SOP class, transfer syntax)
    failures = 0
    for path in _files(args.files):
        try:
            meta = read_file_meta_info(os.fspath(path))
            items.append((path, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
        except (OSError, InvalidDicomError, AttributeError, KeyError) as exc:
            print(f"SKIPPED  {path}: not a readable DICOM file ({exc})")
            failures += 1
    # One association per batch of files needing at most 128 distinct presentation contexts.
    batches: list[list[tuple[Path, str, str]]] = []
    seen: set[tuple[str, str]] = set()
    for item in items:
        pair = (item[1], item[2])
        if not batches or (pair not in seen and len(seen) >= MAX_CONTEXTS):
            batches.append([])
            seen = set()
        seen.add(pair)
        batches[-1].append(item)
    sent = 0
    for batch in batches:
        ae = _client(args)
        for pair in dict.fromkeys((sop, ts) for _, sop, ts in batch):
            ae.add_requested_context(pair[0], [pair[1]])
        assoc = ae.associate(host, port, ae_title=args.called_aet)
        if not assoc.is_established:
            for path, _, _ in batch:
                print(f"FAILED   {path}: association with {host}:{port} ({args.called_aet}) rejected or failed")
            failures += len(batch)
            continue
        try:
            for path, _, _ in batch:
                if not assoc.is_established:
                    print(f"FAILED   {path}: association lost")
                    failures += 1
                    continue
                try:
                    status = assoc.send_c_store(path)
                except (ValueError, AttributeError, OSError, RuntimeError) as exc:
                    print(f"FAILED   {path}: {exc}")
                    failures += 1
                    continue
                code = int(status.Status) if status and "Status" in status else None
                if code is None:
                    print(f"FAILED   {path}: no response (connection lost or timed out)")
                    failures += 1
                elif code == 0 or 0xB000 <= code <= 0xBFFF:
                    print(f"{'OK' if code == 0 else 'WARNING':<8} {path}: 0x{code:04X} {status_name(code)}")
                    sent += 1
                else:
                    print(f"FAILED   {path}: 0x{code:04X} {status_name(code)}")
                    failures += 1
        finally:
            if assoc.is_established:
                assoc.release()
    print(f"{sent} sent, {failures} failed")
    return 0 if failures == 0 else 1


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--aet", default="PACSAI-SCU", help="our (calling) AE title (default PACSAI-SCU)")
    p.add_argument("--called-aet", default="PACSAI", help="the peer's AE title (default PACSAI)")
    p.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds (default 30)")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``send`` and ``echo``."""
    p = subparsers.add_parser("send", help="send DICOM files with C-STORE (each in its own transfer syntax)")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="files or folders (searched recursively)")
    p.add_argument("--to", required=True, type=parse_host_port, metavar="HOST:PORT")
    _common(p)
    p.set_defaults(func=_cmd_send)

    p = subparsers.add_parser("echo", help="check a DICOM peer with C-ECHO")
    p.add_argument("address", type=parse_host_port, metavar="HOST:PORT")
    _common(p)
    p.set_defaults(func=_cmd_echo)
