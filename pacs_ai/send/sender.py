"""C-STORE SCU: send result files to one destination over one association.

``send_files(destination, paths, calling_ae_title=...)`` proposes one presentation context per
(SOP class, transfer syntax) pair found in the files' meta information (each file is sent as it is
encoded, no conversion), opens one association, C-STOREs every file and releases the association.
Anything short of success for every file raises :class:`~pacs_ai.errors.DeliveryError`:

- ``permanent=False`` (retry later with backoff): the peer cannot be reached, the association is
  rejected or aborted, the peer does not answer in time, or it answers with a status that may change
  (0xA7xx out of resources, 0x0110 processing failure, unknown failures);
- ``permanent=True`` (retrying cannot help): a file is missing or not DICOM, the peer does not accept the
  SOP class / transfer syntax, or it answers 0x0122 (SOP class not supported), 0xA9xx (data set does not
  match SOP class) or 0xCxxx (cannot understand).

Warning statuses (0x0001, 0xBxxx) count as stored.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, evt
from pynetdicom.presentation import build_context

from pacs_ai.config import Destination
from pacs_ai.errors import DeliveryError

__all__ = ["DestinationUnreachable", "is_permanent_status", "send_files"]

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128


class DestinationUnreachable(DeliveryError):
    """No association could be established (connection refused or timed out, association rejected or
    aborted): nothing else will get through to this destination right now either."""


def is_permanent_status(status: int) -> bool:
    """True for C-STORE failure statuses that will not change when the same file is sent again."""
    return status == 0x0122 or (status & 0xFF00) == 0xA900 or (status & 0xF000) == 0xC000


def _is_success(status: int) -> bool:
    return status == 0x0000 or status == 0x0001 or (status & 0xF000) == 0xB000


def _file_meta(destination: str, path: Path) -> tuple[str, str]:
    try:
        meta = read_file_meta_info(path)
        return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
    except FileNotFoundError as exc:
        raise DeliveryError(destination, f"{path} does not exist", permanent=True) from exc
    except (InvalidDicomError, AttributeError, OSError, ValueError) as exc:
        raise DeliveryError(destination, f"{path} is not a readable DICOM file: {exc}", permanent=True) from exc


def send_files(
    destination: Destination,
    paths: Sequence[Path],
    *,
    calling_ae_title: str,
    timeout_s: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
    on_stored: Callable[[], None] | None = None,
) -> None:
    """C-STORE every file of ``paths`` to ``destination`` over one association; raise DeliveryError on failure.

    ``on_stored`` is called once every file was stored, before the association is released, so that the
    caller records the delivery as soon as the peer has the files: a crash after that point cannot make
    the files be sent again.
    """
    name = destination.name
    files = [Path(p) for p in paths]
    if not files:
        return
    metas = [_file_meta(name, p) for p in files]
    pairs = list(dict.fromkeys(metas))
    if len(pairs) > MAX_CONTEXTS:
        raise DeliveryError(name, f"{len(pairs)} presentation contexts needed, at most {MAX_CONTEXTS}", permanent=True)

    ae = AE(ae_title=calling_ae_title or "PACSAI")
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    contexts = [build_context(sop_class, [ts]) for sop_class, ts in pairs]
    tls_args = (ssl_context, destination.host) if ssl_context is not None else None
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    answer: dict[str, object] = {}

    def on_acse(event: evt.Event) -> None:
        primitive = getattr(event, "primitive", None)
        if getattr(primitive, "result", None) in (0x01, 0x02):
            answer["rejected"] = f"{primitive.result_str}, {primitive.source_str}: {primitive.reason_str}"
            answer["permanent"] = primitive.result == 0x01

    def on_open(event: evt.Event) -> None:
        answer["connected"] = True

    try:
        assoc = ae.associate(
            destination.host,
            destination.port,
            contexts=contexts,
            ae_title=destination.ae_title,
            max_pdu=0,
            tls_args=tls_args,
            evt_handlers=[(evt.EVT_ACSE_RECV, on_acse), (evt.EVT_CONN_OPEN, on_open)],
        )
    except (OSError, ssl.SSLError) as exc:
        ae.shutdown()
        raise DestinationUnreachable(name, f"cannot connect to {where}: {exc}") from exc
    if not assoc.is_established:
        ae.shutdown()
        if assoc.is_rejected:
            # Even a "permanent" rejection (unknown AE title...) is usually a configuration that someone will
            # fix: retry with backoff; the delivery is dead-lettered after the configured attempts anyway.
            raise DestinationUnreachable(name, f"association rejected by {where} ({answer.get('rejected', 'no reason')})")
        if assoc.is_aborted and not assoc.accepted_contexts and assoc.rejected_contexts:
            offered = ", ".join(f"{c} ({t})" for c, t in pairs)
            raise DeliveryError(name, f"{where} accepts none of the presentation contexts: {offered}", permanent=True)
        if assoc.is_aborted and answer.get("connected"):
            raise DestinationUnreachable(name, f"association aborted by {where} (no answer or abort during negotiation)")
        raise DestinationUnreachable(name, f"cannot connect to {where} (connection refused, unreachable or timed out)")

    try:
        accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts}
        for path, pair in zip(files, metas):
            if pair not in accepted:
                raise DeliveryError(
                    name,
                    f"{where} does not accept SOP class {pair[0]} in transfer syntax {pair[1]} ({path.name})",
                    permanent=True,
                )
            status_ds = assoc.send_c_store(path)
            status = getattr(status_ds, "Status", None)
            if status is None:
                raise DeliveryError(name, f"no C-STORE response from {where} for {path.name} (timeout or abort)")
            status = int(status)
            if not _is_success(status):
                comment = str(getattr(status_ds, "ErrorComment", "") or "")
                detail = f"{where} refused {path.name} with status 0x{status:04X}" + (f": {comment}" if comment else "")
                raise DeliveryError(name, detail, permanent=is_permanent_status(status))
            if status != 0x0000:
                log.warning("%s stored %s with warning status 0x%04X", where, path.name, status)
        if on_stored is not None:
            on_stored()
        assoc.release()
    except DeliveryError:
        assoc.abort()
        raise
    except (OSError, RuntimeError, ValueError, AttributeError) as exc:
        assoc.abort()
        raise DeliveryError(name, f"sending to {where} failed: {exc}") from exc
    finally:
        ae.shutdown()
