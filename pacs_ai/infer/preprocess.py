"""The one preprocessing shared by serving and training.

Pipeline: a file (``read_file``) or data set -> grey levels in [0, 1] with bone bright (``dicom_to_gray``
/ ``image_file_to_gray``)
-> ``prepare``: letterbox to the model's square input (resize keeping the aspect ratio, pad, never
stretch), CLAHE, three identical channels, mean/std normalisation.

``letterbox`` (uint8, not normalised) and ``normalise`` are the two halves of ``prepare``; the training
package caches ``letterbox`` output and augments it before ``normalise``, so training and serving run
the same code. ``cam_to_original`` maps a heat map on the network grid back onto the original pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from pacs_ai.errors import InputError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Geometry",
    "InputSpec",
    "Prepared",
    "cam_to_original",
    "dicom_to_gray",
    "displays_inverted",
    "image_file_to_gray",
    "letterbox",
    "normalise",
    "prepare",
    "read_file",
    "read_gray",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

MIN_SIDE = 16
"""Images with a side shorter than this many pixels are refused (``unsupported_image``)."""
MAX_SIDE = 16384
"""Images with a side longer than this are refused (``unsupported_image``)."""
MAX_ASPECT = 20.0
"""Images more elongated than this are refused (``unsupported_image``)."""

_PERCENTILES = (0.5, 99.5)


# ----------------------------------------------------------------------------------------------------
# Specification and geometry
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """What a model expects as input: square side, normalisation and contrast enhancement."""

    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    clahe: bool = True
    clahe_clip: float = 2.0
    clahe_grid: int = 8

    def __post_init__(self) -> None:
        # Normalise lists (from JSON) into tuples so the spec stays hashable and comparable.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def problems(self) -> list[str]:
        """Return one message per invalid field (empty when valid); each message starts with the field."""
        out: list[str] = []
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not 16 <= self.size <= 4096:
            out.append(f"size: must be an integer in 16..4096, got {self.size!r}")
        if len(self.mean) != 3:
            out.append(f"mean: must have 3 values, got {len(self.mean)}")
        if len(self.std) != 3 or any(not np.isfinite(s) or s <= 0 for s in self.std):
            out.append(f"std: must be 3 positive numbers, got {self.std!r}")
        if not isinstance(self.clahe, bool):
            out.append(f"clahe: must be true or false, got {self.clahe!r}")
        if not (isinstance(self.clahe_clip, (int, float)) and 0 < float(self.clahe_clip) <= 100):
            out.append(f"clahe_clip: must be a number in (0, 100], got {self.clahe_clip!r}")
        if isinstance(self.clahe_grid, bool) or not isinstance(self.clahe_grid, int) or not 1 <= self.clahe_grid <= 64:
            out.append(f"clahe_grid: must be an integer in 1..64, got {self.clahe_grid!r}")
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        """Build from a dict; unknown keys raise ``ValueError`` naming them."""
        unknown = sorted(set(data) - {f for f in cls.__dataclass_fields__})
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown key")
        return cls(**data)


@dataclass(frozen=True)
class Geometry:
    """How an original image was placed on the square network input (letterbox)."""

    orig_h: int
    orig_w: int
    scale: float
    pad_top: int
    pad_left: int
    size: int

    @property
    def new_h(self) -> int:
        """Height of the resized image inside the square (without padding)."""
        return max(1, min(self.size, round(self.orig_h * self.scale)))

    @property
    def new_w(self) -> int:
        """Width of the resized image inside the square (without padding)."""
        return max(1, min(self.size, round(self.orig_w * self.scale)))

    @classmethod
    def for_image(cls, orig_h: int, orig_w: int, size: int) -> Geometry:
        scale = size / max(orig_h, orig_w)
        new_h = max(1, min(size, round(orig_h * scale)))
        new_w = max(1, min(size, round(orig_w * scale)))
        return cls(orig_h, orig_w, scale, (size - new_h) // 2, (size - new_w) // 2, size)


@dataclass
class Prepared:
    """Network input plus what is needed to show results on the original image."""

    tensor: torch.Tensor
    """(3, size, size) float32, normalised."""
    display: np.ndarray
    """uint8, bone bright, after the VOI LUT/window, without CLAHE: for overlays. (orig_h, orig_w), or
    smaller when ``prepare`` was given ``display_max_side`` (the same aspect ratio; ``geometry`` keeps the
    original size)."""
    geometry: Geometry
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# Decoding to grey levels
# ----------------------------------------------------------------------------------------------------


def _check_size(h: int, w: int) -> None:
    if min(h, w) < MIN_SIDE or max(h, w) > MAX_SIDE:
        raise InputError("unsupported_image", f"image size {w}x{h} is outside {MIN_SIDE}..{MAX_SIDE} pixels")
    if max(h, w) / min(h, w) > MAX_ASPECT:
        raise InputError("unsupported_image", f"image size {w}x{h} has an aspect ratio above {MAX_ASPECT:g}")


def _percentile_scale(arr: np.ndarray) -> np.ndarray:
    """Map the robust range (0.5th..99.5th percentile) to [0, 1]; estimated on a pixel subsample."""
    step = max(1, int(np.sqrt(arr.size / 250_000)))
    sample = arr[::step, ::step]
    lo, hi = np.percentile(sample, _PERCENTILES)
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.float32)
    out = (arr.astype(np.float32) - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)


def _first(value: Any) -> float:
    """First value of a possibly multi-valued DICOM number (DS/IS with VM > 1)."""
    try:
        return float(value[0])  # MultiValue
    except TypeError:
        return float(value)


def lut_item_to_array(item: Any, ds: Any) -> tuple[int, np.ndarray, int]:
    """Read a Modality or VOI LUT item: (first stored value mapped, entries as int64 (N,), bits per entry).

    PS3.3 C.11.1.1.1 / C.11.2.1.1: LUT Descriptor = (number of entries, 0 meaning 65536; first value
    mapped, SS when the pixel data are signed; bits per entry, 8 or 16, older files also 10-15). LUT Data
    is US (a list) or OW (bytes in the transfer syntax's byte order; 8-bit entries may be packed two per
    word). A first value read as US above 32767 for signed pixel data is taken as its SS meaning.

    Raises ``ValueError`` when the item is malformed.
    """
    descriptor = [int(v) for v in item.LUTDescriptor]
    if len(descriptor) != 3:
        raise ValueError(f"LUT Descriptor has {len(descriptor)} values, expected 3")
    entries, first, bits = descriptor
    entries = entries or 65536
    if int(ds.get("PixelRepresentation", 0) or 0) == 1 and first > 32767:
        first -= 65536
    if not 1 <= bits <= 16:
        raise ValueError(f"LUT Descriptor gives {bits} bits per entry")
    raw = item.LUTData
    if isinstance(raw, (bytes, bytearray)):
        little = True
        meta = getattr(ds, "file_meta", None)
        ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
        if ts is not None and getattr(ts, "is_little_endian", True) is False:
            little = False
        if len(raw) >= 2 * entries:
            data = np.frombuffer(raw, dtype="<u2" if little else ">u2", count=entries)
        elif bits <= 8 and len(raw) >= entries:
            data = np.frombuffer(raw, dtype=np.uint8, count=entries)
        else:
            raise ValueError(f"LUT Data holds {len(raw)} bytes for {entries} entries")
    else:
        data = np.atleast_1d(np.asarray(raw, dtype=np.int64))
        if data.size < entries:
            raise ValueError(f"LUT Data holds {data.size} values for {entries} entries")
        data = data[:entries]
    return first, data.astype(np.int64), bits


def apply_lut(values: np.ndarray, first: int, data: np.ndarray) -> np.ndarray:
    """Map ``values`` through a LUT: values below ``first`` take the first entry, above the last the last.

    Non-integer inputs (after a rescale) are floored. Computed in int64, so signed inputs with a negative
    first value cannot wrap (pydicom 3.0's ``apply_modality_lut``/``apply_voi`` compute the index in the
    input's own dtype, which overflows for int8/int16 pixel data with a negative first value).
    """
    idx = np.floor(values).astype(np.int64) if values.dtype.kind == "f" else values.astype(np.int64)
    idx -= first
    np.clip(idx, 0, data.size - 1, out=idx)
    return np.take(data, idx)


def modality_values(arr: np.ndarray, ds: Any) -> np.ndarray:
    """Stored values -> modality output values (PS3.3 C.11.1): the Modality LUT Sequence if present,
    else Rescale Slope/Intercept (pydicom's ``apply_modality_lut``, float64), else the stored values."""
    from pydicom.pixels.processing import apply_modality_lut

    seq = ds.get("ModalityLUTSequence")
    if seq:
        first, data, _ = lut_item_to_array(seq[0], ds)
        return apply_lut(arr, first, data)
    return apply_modality_lut(arr, ds)


def _window(arr: np.ndarray, ds: Any) -> np.ndarray | None:
    """Apply the first VOI LUT or window of ``ds`` mapping to [0, 1]; None when there is none.

    A VOI LUT Sequence wins over a window (as in pydicom's ``apply_voi_lut(prefer_lut=True)``); its
    output is scaled by its bits per entry (or by its largest entry when that exceeds them).
    """
    seq = ds.get("VOILUTSequence")
    if seq:
        first, data, bits = lut_item_to_array(seq[0], ds)
        out: np.ndarray = apply_lut(arr, first, data).astype(np.float32)
        top = float(2**bits - 1)
        top = max(top, float(data.max()))
        return np.clip(out * np.float32(1.0 / top), 0.0, 1.0)
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    try:
        center = _first(ds.WindowCenter)
        width = _first(ds.WindowWidth)
    except (TypeError, ValueError, IndexError):
        return None
    func = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    x = arr.astype(np.float32, copy=False)
    # DICOM PS3.3 C.11.2.1.2 / C.11.2.1.3
    if func == "SIGMOID":
        if width <= 0:
            return None
        sigmoid: np.ndarray = 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
        return sigmoid.astype(np.float32)
    if func == "LINEAR_EXACT":
        if width <= 0:
            return None
        out = (x - np.float32(center)) * np.float32(1.0 / width) + np.float32(0.5)
    else:
        if width < 1:
            return None
        if width == 1:
            return (x > center - 0.5).astype(np.float32)
        out = (x - np.float32(center - 0.5)) * np.float32(1.0 / (width - 1)) + np.float32(0.5)
    return np.clip(out, 0.0, 1.0, out=out)


def displays_inverted(ds: Any, photometric: str | None = None) -> bool:
    """True when the VOI output's minimum is displayed white (so it is inverted to keep bone bright).

    Either statement of that polarity inverts, once: Photometric Interpretation MONOCHROME1, or a
    Presentation LUT Shape of INVERSE. The two are not combined: in the DX, MG and IO image modules the
    Presentation LUT Shape only restates the photometric interpretation (PS3.3 C.8.11.1: INVERSE "shall
    be used if Photometric Interpretation is MONOCHROME1", IDENTITY with MONOCHROME2), so MONOCHROME1 with
    INVERSE is one inversion, not two. MONOCHROME2 with INVERSE is inverted (PS3.3 C.11.6.1.2: the VOI
    output's minimum maps to the maximum P-value). MONOCHROME1 with IDENTITY (not allowed in DX) stays
    inverted: the photometric interpretation (Type 1) describes the pixel data. ``photometric`` defaults to
    the dataset's.
    """
    if photometric is None:
        photometric = str(ds.get("PhotometricInterpretation", "") or "")
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    return photometric.strip().upper() == "MONOCHROME1" or shape == "INVERSE"


def dicom_to_gray(ds: Any, *, min_long_side: int | None = None) -> np.ndarray:
    """Decode a single-frame greyscale DICOM image to float32 (H, W) in [0, 1] with bone bright.

    With ``min_long_side``, a JPEG 2000 image may be decoded at a reduced resolution level whose long side
    is still at least that many pixels (``pacs_ai.infer.j2k.decode_reduced``: about 1/4 of the decoding
    work per level skipped); (H, W) is then ``ceil(Rows / 2**r), ceil(Columns / 2**r)``, and the caller
    keeps the original size for geometry (``prepare(..., source_size=(Rows, Columns))``). Other transfer
    syntaxes, and JPEG 2000 images that cannot be reduced, are decoded in full.

    Applies the Modality LUT (rescale or LUT sequence), then the first VOI LUT or window
    (LINEAR, LINEAR_EXACT, SIGMOID); without one, a robust 0.5-99.5 percentile range is used.
    The result is inverted once when MONOCHROME1 or a Presentation LUT Shape of INVERSE says the minimum
    is displayed white (``displays_inverted``; MONOCHROME1 with INVERSE, what DX requires, is one
    inversion). Any bit depth and signedness that pydicom decodes is supported.

    Raises ``InputError`` with reason ``missing_pixel_data``, ``unsupported_photometric``,
    ``multi_frame``, ``unsupported_image`` or ``undecodable_pixel_data``.
    """
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise InputError("missing_pixel_data", "the dataset has no Pixel Data element")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InputError(
            "unsupported_photometric",
            f"photometric interpretation {photometric or '(missing)'!s} is not MONOCHROME1 or MONOCHROME2",
        )
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if spp != 1:
        raise InputError("unsupported_photometric", f"{spp} samples per pixel; only greyscale is supported")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    if frames > 1:
        raise InputError("multi_frame", f"{frames} frames; only single-frame images are supported")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    _check_size(rows, cols)
    arr = None
    if min_long_side is not None:
        from pacs_ai.infer.j2k import decode_reduced

        arr = decode_reduced(ds, int(min_long_side))
    reduced = arr is not None  # checked against Rows/Columns by decode_reduced
    try:
        if arr is None:
            arr = ds.pixel_array
    except (KeyboardInterrupt, SystemExit):
        raise
    # Any decoder failure is the same input error. BaseException, because decoders written in Rust
    # (pylibjpeg-rle) report a panic as pyo3's PanicException, which derives from BaseException.
    except BaseException as exc:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        detail = f"{type(exc).__name__}: {exc}".strip()
        if ts is not None:
            detail = f"transfer syntax {ts.name if hasattr(ts, 'name') else ts}: {detail}"
        raise InputError("undecodable_pixel_data", detail[:500]) from exc
    if arr.ndim != 2:
        raise InputError("unsupported_image", f"decoded pixel array has shape {arr.shape}, expected 2-D")
    if not reduced:
        _check_size(*arr.shape)
    try:
        values = modality_values(arr, ds)
    except Exception as exc:
        raise InputError("undecodable_pixel_data", f"modality LUT failed: {exc}") from exc
    try:
        gray = _window(values, ds)
    except Exception:  # noqa: BLE001 - a broken VOI LUT falls back to the robust range
        gray = None
    if gray is None:
        gray = _percentile_scale(values)
    if displays_inverted(ds, photometric):
        gray = np.float32(1.0) - gray
    return np.ascontiguousarray(gray, dtype=np.float32)


def image_file_to_gray(path: str | Path) -> np.ndarray:
    """Read a JPEG/PNG/TIFF file as float32 (H, W) greyscale in [0, 1] (8- and 16-bit, EXIF orientation).

    Raises ``InputError('unreadable_image', ...)`` when the file cannot be decoded and
    ``InputError('unsupported_image', ...)`` for absurd sizes.
    """
    p = Path(path)
    data = np.fromfile(p, dtype=np.uint8) if p.is_file() else None
    img = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH) if data is not None and data.size else None
    if img is None:
        raise InputError("unreadable_image", f"{p.name}: not a readable image file")
    if img.ndim != 2:
        raise InputError("unsupported_image", f"{p.name}: decoded shape {img.shape}")
    _check_size(*img.shape)
    if img.dtype == np.uint8:
        return img.astype(np.float32) * np.float32(1.0 / 255.0)
    if img.dtype == np.uint16:
        return img.astype(np.float32) * np.float32(1.0 / 65535.0)
    return _percentile_scale(img.astype(np.float32))


def read_file(path: str | Path) -> tuple[np.ndarray, Any]:
    """(grey float32 (H, W) in [0, 1] with bone bright, pydicom Dataset or None) for a DICOM or image file.

    The one file reader of serving (``pacs-ai classify``) and training: a file pydicom reads as DICOM
    goes through :func:`dicom_to_gray`, any other through :func:`image_file_to_gray`. Raises
    ``InputError`` (``unreadable_file``, ``unreadable_dicom``, the reasons of ``dicom_to_gray``, or
    ``unreadable_image``).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    p = Path(path)
    if not p.is_file():
        raise InputError("unreadable_file", "no such file" if not p.exists() else "not a regular file")
    try:
        ds = pydicom.dcmread(p)
    except InvalidDicomError:
        return image_file_to_gray(p), None  # not DICOM: an image file
    except OSError as exc:
        raise InputError("unreadable_file", exc.strerror or str(exc)) from exc
    except Exception as exc:  # a damaged DICOM file
        raise InputError("unreadable_dicom", f"{type(exc).__name__}: {exc}") from exc
    return dicom_to_gray(ds), ds


def read_gray(path: str | Path) -> np.ndarray:
    """The grey image of :func:`read_file` (float32 (H, W) in [0, 1], bone bright); same errors."""
    return read_file(path)[0]


# ----------------------------------------------------------------------------------------------------
# Network input
# ----------------------------------------------------------------------------------------------------


def to_uint8(gray: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8 [0, 255] (rounded, clipped; NaN becomes 0)."""
    g = np.nan_to_num(gray.astype(np.float32, copy=False), nan=0.0)
    scaled: np.ndarray = g * np.float32(255.0) + np.float32(0.5)
    return scaled.clip(0, 255).astype(np.uint8)


def letterbox(gray: np.ndarray, spec: InputSpec, *, source_size: tuple[int, int] | None = None) -> tuple[np.ndarray, Geometry]:
    """Grey image (float in [0, 1], or uint8) -> uint8 (size, size) network image before normalisation.

    Returns the image and its geometry.

    The image is resized (INTER_AREA when shrinking, INTER_LINEAR when enlarging) so that its long side
    equals ``spec.size``, contrast-enhanced with CLAHE *after* the resize (so CLAHE always works at the
    network's scale whatever the original resolution, and costs almost nothing), then centred on a black
    square. Aspect ratio is kept; nothing is stretched. ``source_size`` (rows, columns) is the original
    image's size when ``gray`` is a reduced-resolution decode of it: the geometry then maps onto the
    original pixels, exactly as for a full decode.
    """
    if gray.ndim != 2:
        raise InputError("unsupported_image", f"expected a 2-D grey image, got shape {gray.shape}")
    h, w = gray.shape
    oh, ow = source_size if source_size is not None else (h, w)
    geom = Geometry.for_image(int(oh), int(ow), spec.size)
    small = gray if gray.dtype == np.uint8 else to_uint8(gray)
    if (geom.new_h, geom.new_w) != (h, w):
        interp = cv2.INTER_AREA if max(geom.new_h, geom.new_w) < max(h, w) else cv2.INTER_LINEAR
        small = cv2.resize(small, (geom.new_w, geom.new_h), interpolation=interp)
    if spec.clahe:
        clahe = cv2.createCLAHE(clipLimit=float(spec.clahe_clip), tileGridSize=(spec.clahe_grid, spec.clahe_grid))
        small = clahe.apply(small)
    out = np.zeros((spec.size, spec.size), dtype=np.uint8)
    out[geom.pad_top : geom.pad_top + geom.new_h, geom.pad_left : geom.pad_left + geom.new_w] = small
    return out, geom


def normalise(images: np.ndarray | torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """uint8 (size, size) or (N, size, size) letterboxed images -> float32 (3, S, S) or (N, 3, S, S).

    The grey level is replicated to three channels and normalised with ``spec.mean``/``spec.std``.
    """
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = np.array(images)  # e.g. a read-only memory-mapped cache: torch needs writable memory
    t = torch.as_tensor(images)
    single = t.ndim == 2
    if single:
        t = t.unsqueeze(0)
    if t.ndim != 3:
        raise ValueError(f"expected (S, S) or (N, S, S) images, got shape {tuple(t.shape)}")
    x = t.to(torch.float32).div_(255.0).unsqueeze(1)  # (N, 1, S, S)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
    out = (x - mean) / std  # broadcast to (N, 3, S, S)
    return out[0] if single else out


def prepare(
    gray: np.ndarray,
    spec: InputSpec,
    *,
    source_size: tuple[int, int] | None = None,
    display_max_side: int | None = None,
) -> Prepared:
    """Grey image in [0, 1] (from ``dicom_to_gray`` or ``image_file_to_gray``; uint8 also accepted) -> input.

    About 20-40 ms for a 2140x1760 image on this 2-core machine (one uint8 conversion at full
    resolution, INTER_AREA downscale, CLAHE at network scale).

    ``Prepared.tensor`` is ``normalise(letterbox(gray))``; ``Prepared.geometry`` maps heat maps back onto
    the original pixels (``cam_to_original``); ``Prepared.display`` is the uint8 image for overlays: at
    ``gray``'s resolution, or, with ``display_max_side``, downscaled (INTER_AREA) so that the long side
    of the *original* is at most that many pixels (the size ``pacs_ai.write.overlay.picture_size`` gives).
    ``source_size`` (rows, columns): the original's size when ``gray`` is a reduced-resolution decode.
    """
    u8 = gray if gray.dtype == np.uint8 else to_uint8(gray)
    img, geom = letterbox(u8, spec, source_size=source_size)
    display = u8
    if display_max_side is not None:
        factor = min(1.0, display_max_side / max(geom.orig_h, geom.orig_w))
        dh, dw = max(1, round(geom.orig_h * factor)), max(1, round(geom.orig_w * factor))
        if (dh, dw) != u8.shape:
            interp = cv2.INTER_AREA if dh * dw < u8.size else cv2.INTER_LINEAR
            display = cv2.resize(u8, (dw, dh), interpolation=interp)
    return Prepared(tensor=normalise(img, spec), display=display, geometry=geom)


def cam_to_original(cam: np.ndarray, geometry: Geometry, out_size: tuple[int, int] | None = None) -> np.ndarray:
    """Map a heat map on the network grid (size, size) back onto the original (orig_h, orig_w) pixels.

    A map of another shape (for example the raw 7x7 of the last layer) is first resized to the network
    grid. The padding is cropped, then the map is resized (bilinear) to the original size, or to
    ``out_size`` = (height, width) when given (e.g. a downscaled picture of the original). float32 out.
    """
    c: np.ndarray = np.asarray(cam, dtype=np.float32)
    if c.ndim != 2:
        raise ValueError(f"expected a 2-D heat map, got shape {c.shape}")
    s = geometry.size
    if c.shape != (s, s):
        c = cv2.resize(c, (s, s), interpolation=cv2.INTER_LINEAR)
    crop = c[geometry.pad_top : geometry.pad_top + geometry.new_h, geometry.pad_left : geometry.pad_left + geometry.new_w]
    out_h, out_w = out_size if out_size is not None else (geometry.orig_h, geometry.orig_w)
    return cv2.resize(np.ascontiguousarray(crop), (out_w, out_h), interpolation=cv2.INTER_LINEAR)
