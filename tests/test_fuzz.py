"""Bounded fuzzing of the listener and the worker with mutated real datasets.

Seeds: the committed sample, shrunk and re-UID'd, as Explicit VR Little Endian, RLE and (when an encoder is
installed) JPEG 2000, plus a DX variant with window and rescale attributes. Each mutation gets fresh UIDs and
then one seeded mutation: byte flips, flips in the attribute area, truncation, random chunks, inserted
bytes, a huge element length, extreme attribute values (Rows, Bits, photometric, frames, window, rescale...)
or a transfer syntax that lies about the body.

Every mutation is sent in its own association; after each, the daemon must be alive and answer C-ECHO.
Every mutation must be either refused (association/negotiation, or a non-success C-STORE status other than
0xA700: this test injects no resource fault, so "out of resources" would hide a bug) or acknowledged, and then its job must end ``done`` or ``dead`` with a reason code in ``last_error`` (none
stuck). ``PACS_AI_FUZZ_N`` (default 80) and ``PACS_AI_FUZZ_SEED`` (default 20261125) control the run.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from support.bad_inputs.corpus import (
    DX_PRESENTATION,
    image_dataset,
    real_pixels,
    rewrite_meta,
    write,
)
from support.daemon_harness import Daemon, file_identity, shared_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

N = int(os.environ.get("PACS_AI_FUZZ_N", "80"))
SEED = int(os.environ.get("PACS_AI_FUZZ_SEED", "20261125"))
REASON = re.compile(r"^[a-z][a-z0-9_]*[a-z0-9]: ")


# ----------------------------------------------------------------------------------------------------
# Seeds and mutations
# ----------------------------------------------------------------------------------------------------


def _seed_datasets() -> dict[str, Callable[[], Dataset]]:
    def plain() -> Dataset:
        return image_dataset(real_pixels(64))

    def rle() -> Dataset:
        ds = plain()
        ds.compress(RLELossless)
        return ds

    def dx_windowed() -> Dataset:
        ds = image_dataset(real_pixels(64), sop_class=DX_PRESENTATION, modality="DX")
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
        ds.VOILUTFunction = "LINEAR"
        return ds

    seeds = {"plain": plain, "rle": rle, "dx_windowed": dx_windowed}
    try:
        from pydicom.pixels import get_encoder

        if get_encoder(JPEG2000Lossless).is_available:

            def j2k() -> Dataset:
                ds = plain()
                ds.compress(JPEG2000Lossless)
                return ds

            seeds["j2k"] = j2k
    except Exception:  # noqa: BLE001
        pass
    return seeds


_EXTREMES: dict[str, list[object]] = {
    "Rows": [0, 1, 15, 16, 65535],
    "Columns": [0, 1, 15, 65535],
    "BitsAllocated": [0, 1, 8, 12, 32, 64],
    "BitsStored": [0, 1, 13, 17, 40],
    "HighBit": [0, 15, 31, 99],
    "PixelRepresentation": [1, 2],
    "SamplesPerPixel": [0, 2, 3, 4],
    "PhotometricInterpretation": ["", "YBR_FULL", "PALETTE COLOR", "MONOCHROME3", "RGB"],
    "NumberOfFrames": ["0", "-1", "2", "1000000"],
    "PlanarConfiguration": [0, 1, 7],
    "WindowCenter": ["0", "-1", "1e308", "nan", "1\\2\\3"],
    "WindowWidth": ["0", "-5", "1e-30", "inf", "nan"],
    "RescaleSlope": ["0", "-1", "1e30", "nan"],
    "RescaleIntercept": ["-1e30", "nan", "inf"],
    "VOILUTFunction": ["SIGMOID", "LINEAR_EXACT", "BOGUS"],
    "PresentationLUTShape": ["INVERSE", "IDENTITY", "X"],
    "PixelPaddingValue": [0, 65535],
}
_VR = {"WindowCenter": "DS", "WindowWidth": "DS", "RescaleSlope": "DS", "RescaleIntercept": "DS",
       "NumberOfFrames": "IS", "PixelPaddingValue": "US"}


def _set_extreme(ds: Dataset, rng: random.Random) -> str:
    keyword = rng.choice(sorted(_EXTREMES))
    value = rng.choice(_EXTREMES[keyword])
    if keyword in _VR:  # raw strings, as a broken modality would write them (no validation)
        from pydicom.datadict import tag_for_keyword
        from pydicom.dataelem import DataElement

        tag = tag_for_keyword(keyword)
        raw = str(value).encode("ascii")
        if len(raw) % 2:
            raw += b" "
        if _VR[keyword] == "US":
            ds[tag] = DataElement(tag, "US", int(value))  # type: ignore[arg-type]
        else:
            ds[tag] = DataElement(tag, _VR[keyword], raw, is_undefined_length=False, already_converted=False)
            ds[tag]._value = raw  # stored as bytes: written verbatim
    else:
        setattr(ds, keyword, value)
    return f"{keyword}={value!r}"


def _body_offset(raw: bytes) -> int:
    return 132 + 12 + int.from_bytes(raw[140:144], "little")


def mutate(kind: str, base: Dataset, folder: Path, index: int, rng: random.Random) -> tuple[Path, str]:
    """Write one mutated file; returns its path and a short description."""
    ds = base
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    detail = ""
    if kind == "attributes":
        detail = ", ".join(_set_extreme(ds, rng) for _ in range(rng.randint(1, 3)))
    path = folder / f"fuzz-{index:03d}-{kind}.dcm"
    try:
        write(ds, path)
    except Exception as exc:  # noqa: BLE001 - pydicom refused to write this combination: write it plain
        detail += f" (write failed: {type(exc).__name__})"
        for kw in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept", "NumberOfFrames"):
            if kw in ds:
                del ds[kw]
        write(ds, path)
    raw = bytearray(path.read_bytes())
    start = _body_offset(raw)
    body_len = len(raw) - start
    if kind == "flip_bytes":
        for _ in range(rng.randint(1, 8)):
            i = start + rng.randrange(body_len)
            raw[i] ^= 1 << rng.randrange(8)
        detail = "flipped bits anywhere"
    elif kind == "flip_header":
        span = min(body_len, 700)
        for _ in range(rng.randint(1, 4)):
            i = start + rng.randrange(span)
            raw[i] = rng.randrange(256)
        detail = "bytes changed in the attribute area"
    elif kind == "truncate":
        cut = start + rng.randrange(body_len)
        raw = raw[:cut]
        detail = f"cut at {cut - start} of {body_len} body bytes"
    elif kind == "random_chunk":
        n = rng.randint(16, 256)
        i = start + rng.randrange(max(1, body_len - n))
        raw[i : i + n] = bytes(rng.randrange(256) for _ in range(n))
        detail = f"{n} random bytes at {i - start}"
    elif kind == "insert":
        n = rng.randint(1, 64)
        i = start + rng.randrange(body_len)
        raw[i:i] = bytes(rng.randrange(256) for _ in range(n))
        detail = f"{n} bytes inserted at {i - start}"
    elif kind == "length_bomb":
        # Explicit VR LE: an element header is tag(4) VR(2) then a 2-byte length, or 2 reserved + 4-byte length.
        positions = [m.start() for m in re.finditer(rb"(?s)\x28\x00..(US|DS|IS|CS|UI|OB|OW|LO)", bytes(raw[start:]))]
        if positions:
            p = start + rng.choice(positions)
            vr = bytes(raw[p + 4 : p + 6])
            if vr in (b"OB", b"OW"):
                raw[p + 8 : p + 12] = rng.choice([0xFFFFFFF0, 0x7FFFFFFE]).to_bytes(4, "little")
            else:
                raw[p + 6 : p + 8] = rng.choice([0xFFFE, 0x8000]).to_bytes(2, "little")
            detail = f"huge length on a {vr.decode(errors='replace')} element of group 0028"
        else:
            raw = raw[: len(raw) // 2]
            detail = "no group 0028 element found; cut in half"
    path.write_bytes(bytes(raw))
    if kind == "ts_lie":
        lie = rng.choice([ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless, JPEG2000Lossless,
                          JPEGLSLossless])
        rewrite_meta(path, transfer_syntax=lie)
        detail = f"meta says {lie.name}"
    return path, detail


KINDS = ["flip_bytes", "flip_header", "truncate", "random_chunk", "insert", "length_bomb", "attributes",
         "attributes", "ts_lie"]


def build_mutations(folder: Path, n: int, seed: int) -> list[tuple[Path, str, str, str]]:
    """``n`` mutated files: (path, seed name, mutation kind, detail)."""
    rng = random.Random(seed)
    np.random.seed(seed % (2**32))
    seeds = _seed_datasets()
    names = sorted(seeds)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        name = names[i % len(names)]
        kind = KINDS[(i // len(names)) % len(KINDS)] if i < len(names) * len(KINDS) else rng.choice(KINDS)
        path, detail = mutate(kind, seeds[name](), folder, i, rng)
        out.append((path, name, kind, detail))
    return out


# ----------------------------------------------------------------------------------------------------
# The test
# ----------------------------------------------------------------------------------------------------


def test_fuzz_listener_and_worker(tmp_path: Path) -> None:
    mutations = build_mutations(tmp_path / "fuzz", N, SEED)
    daemon = Daemon(tmp_path / "daemon", model=shared_model())
    daemon.start()
    started = time.monotonic()
    outcomes: list[dict[str, object]] = []
    problems: list[str] = []
    try:
        for path, seed_name, kind, detail in mutations:
            uid = file_identity(path)[1]
            result = daemon.send([path], timeout=30)
            sent = result.sent[0]
            if not result.accepted:
                outcome = f"association {result.rejected}"
            elif sent.status is None:
                outcome = f"no status: {sent.error}"
                if "presentation context" not in sent.error:
                    problems.append(f"{path.name} ({detail}): {sent.error}")
            elif sent.status == 0x0000:
                outcome = "acknowledged"
            else:
                outcome = f"status 0x{sent.status:04X}"
                if sent.status == 0xA700:  # out of resources: no resource fault is injected here, so a bug
                    problems.append(f"{path.name} ({detail}): 0xA700 without a resource fault:\n{daemon.log_tail(3000)}")
            outcomes.append({"path": path.name, "seed": seed_name, "kind": kind, "detail": detail, "uid": uid,
                             "outcome": outcome})
            if not daemon.alive:
                problems.append(f"daemon died after {path.name} ({detail}):\n{daemon.log_tail(3000)}")
                break
            if not daemon.echo(timeout=10):
                problems.append(f"no C-ECHO after {path.name} ({detail})")
                break
        acked = [o for o in outcomes if o["outcome"] == "acknowledged"]
        jobs = daemon.wait_settled([str(o["uid"]) for o in acked], timeout=45)
        for o in acked:
            job = jobs.get(str(o["uid"]))
            if job is None:
                o["job"] = "NO JOB"
                problems.append(f"{o['path']} was acknowledged but has no job")
            elif str(job.state) == "done":
                o["job"] = "done"
            elif str(job.state) == "dead":
                reason = (job.last_error or "").split(":", 1)[0]
                o["job"] = f"dead: {reason}"
                if not REASON.match(job.last_error or ""):
                    problems.append(f"{o['path']} ({o['detail']}): dead without a reason code: {job.last_error!r}")
            else:
                o["job"] = f"stuck in {job.state}"
                problems.append(f"{o['path']} ({o['detail']}): job stuck in {job.state} ({job.last_error})")
        for o in outcomes:  # a refused mutation must not have left a job behind
            if o["outcome"] != "acknowledged" and daemon.job(str(o["uid"])) is not None:
                problems.append(f"{o['path']} was refused ({o['outcome']}) but has a job")
        assert daemon.alive and daemon.echo()
    finally:
        elapsed = time.monotonic() - started
        daemon.stop()
        daemon.close_store()
        summary = Counter(f"{o['outcome']}" + (f" -> {o['job']}" if "job" in o else "") for o in outcomes)
        print(f"\nfuzz: {len(outcomes)} mutations (seed {SEED}) in {elapsed:.0f} s, daemon peak RSS "
              f"{daemon.peak_rss_kb / 1024:.0f} MB")
        for text, n in summary.most_common():
            print(f"  {n:4d}  {text}")
        by_kind = Counter((o["kind"], o["outcome"] == "acknowledged") for o in outcomes)
        print("  by mutation: " + ", ".join(
            f"{k} {by_kind[(k, True)]} acked/{by_kind[(k, False)]} refused" for k in dict.fromkeys(KINDS)))
    assert not problems, "\n".join(problems[:20])
