"""Reduced-resolution decoding of JPEG 2000 pixel data: decode only the wavelet levels that are needed.

A JPEG 2000 codestream stores the image as a wavelet pyramid. Decoding with a resolution reduction of
``r`` (OpenJPEG's ``cp_reduce``, set through Pillow's JPEG 2000 plugin, ``Image.reduce``) skips the ``r``
finest levels and returns the image at ``ceil(size / 2**r)``: the low-pass approximation the encoder
stored, for about ``1 / 4**r`` of the entropy-decoding work. On this 2-core machine the 2140x1760
10-bit WG-04 hip (JPEG 2000 lossless) decodes in 330 ms in full, 82 ms at ``r = 1`` and 22 ms at ``r = 2``.

The worker needs far fewer pixels than a radiograph has: the model's input (192-512 px) and the Secondary
Capture picture (``pacs_ai.write.overlay.SC_MAX_SIDE``); ``decode_reduced`` picks the coarsest level whose
long side is still at least what is needed, and hands back the stored values as pydicom's
``pixel_array`` would, only smaller. It returns None (the caller decodes in full with pydicom) whenever it
cannot be sure to give the same values: not JPEG 2000, more than one frame or sample, signed pixel data,
a codestream whose precision or size disagrees with the header, no level to skip, or any decoder error
(a damaged codestream then gets pydicom's own error).
"""

from __future__ import annotations

import io
import logging
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["J2K_SYNTAXES", "Codestream", "codestream_info", "decode_reduced", "reduction_for"]

log = logging.getLogger(__name__)

J2K_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"})
"""JPEG 2000 Image Compression (Lossless Only) and JPEG 2000 Image Compression."""

_SOC, _SIZ, _COD, _COC, _SOT = 0xFF4F, 0xFF51, 0xFF52, 0xFF53, 0xFF90


@dataclass(frozen=True)
class Codestream:
    """What the main header of a JPEG 2000 codestream says (ISO/IEC 15444-1 A.5.1, A.6.1, A.6.2)."""

    width: int
    height: int
    components: int
    precision: int
    """Bits per sample of the first component (Ssiz + 1)."""
    signed: bool
    levels: int
    """Number of wavelet decomposition levels (the smallest of COD's and every COC's): how many
    resolution reductions are possible."""


def codestream_info(frame: bytes) -> Codestream | None:
    """Parse SIZ, COD and COC of a raw codestream's main header; None when it is not one."""
    try:
        if len(frame) < 4 or struct.unpack_from(">H", frame, 0)[0] != _SOC:
            return None
        pos, size, levels = 2, None, []
        while pos + 4 <= len(frame):
            marker, length = struct.unpack_from(">HH", frame, pos)
            if marker == _SOT or marker >> 8 != 0xFF:
                break
            body = frame[pos + 4 : pos + 2 + length]
            if marker == _SIZ:
                _rsiz, xsiz, ysiz, xo, yo, _xt, _yt, _xto, _yto, csiz = struct.unpack_from(">HIIIIIIIIH", body, 0)
                ssiz = body[36]
                size = (xsiz - xo, ysiz - yo, csiz, (ssiz & 0x7F) + 1, bool(ssiz & 0x80))
            elif marker == _COD:
                levels.append(body[5])  # Scod(1) SGcod(4) then SPcod: decomposition levels first
            elif marker == _COC:
                levels.append(body[2 if size is not None and size[2] < 257 else 3])  # Ccoc(1|2) Scoc(1)
            pos += 2 + length
        if size is None or not levels:
            return None
        return Codestream(size[0], size[1], size[2], size[3], size[4], min(levels))
    except (struct.error, IndexError):
        return None


def reduction_for(long_side: int, levels: int, min_long_side: int) -> int:
    """The largest reduction ``r <= levels`` with ``ceil(long_side / 2**r) >= min_long_side`` (0: none)."""
    r = 0
    while r < levels and -(-long_side // (1 << (r + 1))) >= min_long_side:
        r += 1
    return r


def decode_reduced(ds: Any, min_long_side: int) -> np.ndarray | None:
    """Stored pixel values of a single-frame greyscale JPEG 2000 image at the coarsest resolution level
    whose long side is at least ``min_long_side``: (ceil(Rows / 2**r), ceil(Columns / 2**r)), uint16 (or
    uint8 for 8-bit allocation), the dtype pydicom's ``pixel_array`` gives.

    Returns None when the full decode must be used instead (see the module's docstring); never raises.
    """
    try:
        ts = str(ds.file_meta.TransferSyntaxUID)
        if ts not in J2K_SYNTAXES or int(ds.get("PixelRepresentation", 0) or 0) != 0:
            return None
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
            return None
        rows, cols, bits = int(ds.Rows), int(ds.Columns), int(ds.BitsStored)
        allocated = int(ds.BitsAllocated)
        if allocated not in (8, 16):
            return None
        from pydicom.encaps import generate_frames

        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        info = codestream_info(frame)
        if info is None or (info.width, info.height, info.components) != (cols, rows, 1) or info.signed:
            return None
        if info.precision != bits or bits > allocated:
            return None
        r = reduction_for(max(rows, cols), info.levels, min_long_side)
        if r == 0:
            return None
        from PIL import Image

        with Image.open(io.BytesIO(frame), formats=["JPEG2000"]) as image:
            image.reduce = r  # type: ignore[assignment,method-assign]  # the JPEG 2000 plugin's resolution factor
            image.load()
            mode = image.mode
            arr = np.asarray(image)
    except Exception as exc:  # noqa: BLE001 - e.g. a damaged codestream: pydicom's full decode reports it
        log.debug("reduced JPEG 2000 decode not used: %s: %s", type(exc).__name__, exc)
        return None
    expected = (-(-rows // (1 << r)), -(-cols // (1 << r)))
    if arr.shape != expected or mode not in ("L", "I;16"):
        return None
    # Pillow scales samples to the mode's bit depth (a left shift by 8 or 16 minus the precision).
    shift = (8 if mode == "L" else 16) - info.precision
    values: np.ndarray = arr.astype(np.uint16 if allocated == 16 else np.uint8, copy=False)
    if shift > 0:
        values = np.right_shift(values, shift)
    return np.ascontiguousarray(values)
