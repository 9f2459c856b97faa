"""What the listener accepts: SOP classes, transfer syntaxes, and the C-STORE status codes it answers."""

from __future__ import annotations

from pydicom.uid import (
    JPEG2000,
    UID,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)

# pynetdicom makes its sop_class names at import time (sop_class._generate_sop_classes), so no type checker
# sees them; pydicom.uid has the storage classes above but not Verification.
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

# Single-frame projection radiographs, the input of a bone-fracture classifier. Mammography and
# intra-oral X-ray are left out on purpose (different anatomy, not what the model was trained on).
IMAGE_SOP_CLASSES: dict[str, str] = {
    ComputedRadiographyImageStorage: "CR Image Storage",
    DigitalXRayImageStorageForPresentation: "DX Image Storage - For Presentation",
    DigitalXRayImageStorageForProcessing: "DX Image Storage - For Processing",
    SecondaryCaptureImageStorage: "Secondary Capture Image Storage",
}

VERIFICATION_SOP_CLASS: UID = Verification

# Uncompressed first: an acceptor takes the requestor's order, these are what we can take at all.
TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,  # process 14, any selection value
    JPEGLosslessSV1,  # process 14, selection value 1
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
)

# C-STORE response statuses (DICOM PS3.4 B.2.3). Success and the three failure families.
STATUS_SUCCESS = 0x0000
#: Disk or database trouble: the spool write or the job commit failed. The sender keeps its copy and retries.
STATUS_OUT_OF_RESOURCES = 0xA700
#: The dataset's SOP Class UID is not the one it was sent as (or is not an image class we accept).
STATUS_SOP_CLASS_MISMATCH = 0xA900
#: Cannot understand: the dataset could not be parsed.
STATUS_CANNOT_UNDERSTAND = 0xC000
#: Cannot understand: SOP Instance, Study Instance or Series Instance UID missing, empty or too long.
STATUS_MISSING_UID = 0xC001
#: Cannot understand: the dataset's SOP Instance UID is not the request's Affected SOP Instance UID.
STATUS_INSTANCE_MISMATCH = 0xC002

STATUS_NAMES: dict[int, str] = {
    STATUS_SUCCESS: "success",
    STATUS_OUT_OF_RESOURCES: "out of resources",
    STATUS_SOP_CLASS_MISMATCH: "dataset does not match SOP class",
    STATUS_CANNOT_UNDERSTAND: "cannot understand: dataset not parseable",
    STATUS_MISSING_UID: "cannot understand: required UID missing",
    STATUS_INSTANCE_MISMATCH: "cannot understand: SOP Instance UID differs from the request",
}


def status_name(status: int) -> str:
    if status in STATUS_NAMES:
        return STATUS_NAMES[status]
    family = status & 0xFF00
    if family == 0xA700:
        return "out of resources"
    if family == 0xA900:
        return "dataset does not match SOP class"
    if 0xC000 <= status <= 0xCFFF:
        return "cannot understand"
    if 0xB000 <= status <= 0xBFFF:
        return "warning"
    return "failure"
