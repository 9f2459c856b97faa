"""What the Secondary Capture and the Structured Report share: model identity, copied patient/study
attributes, contributing equipment, the evidence header of the source image."""

from __future__ import annotations

import copy
import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

import pacs_ai
from pacs_ai.errors import DicomWriteError
from pacs_ai.write.header import HeaderFix, copy_attributes

__all__ = [
    "MANUFACTURER",
    "PATIENT_STUDY_KEYWORDS",
    "PROCESSING_ALGORITHM",
    "ModelInfo",
    "contributing_equipment",
    "copy_patient_study",
    "source_header",
]

MANUFACTURER = "pacs-ai"
PROCESSING_ALGORITHM = Code("Newcode1", "99IHE", "Processing Algorithm")
"""Purpose of reference of the contributing equipment (IHE AI Results convention)."""

# Patient, Clinical Trial Subject, General Study, Patient Study and Clinical Trial Study modules (PS3.3
# C.7.1.1, C.7.1.3, C.7.2.1, C.7.2.2, C.7.2.3): copied as they are from the source image.
PATIENT_STUDY_KEYWORDS: tuple[str, ...] = (
    # Patient
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "TypeOfPatientID",
    "PatientBirthDate", "PatientBirthTime", "PatientSex", "QualityControlSubject", "OtherPatientIDsSequence",
    "OtherPatientNames", "EthnicGroup", "EthnicGroupCodeSequence", "PatientComments", "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence", "PatientBreedDescription", "PatientBreedCodeSequence",
    "BreedRegistrationSequence", "StrainDescription", "StrainNomenclature", "StrainCodeSequence",
    "StrainAdditionalInformation", "StrainStockSequence", "GeneticModificationsSequence", "ResponsiblePerson",
    "ResponsiblePersonRole", "ResponsibleOrganization", "PatientIdentityRemoved", "DeidentificationMethod",
    "DeidentificationMethodCodeSequence", "ReferencedPatientPhotoSequence", "SourcePatientGroupIdentificationSequence",
    "GroupOfPatientsIdentificationSequence", "PatientBirthDateInAlternativeCalendar",
    "PatientDeathDateInAlternativeCalendar", "PatientAlternativeCalendar",
    # Clinical Trial Subject
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName", "ClinicalTrialSiteID",
    "ClinicalTrialSiteName", "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID",
    "ClinicalTrialProtocolEthicsCommitteeName", "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
    # General Study
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianName", "ConsultingPhysicianIdentificationSequence", "StudyID", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "StudyDescription", "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence", "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence", "RequestingServiceCodeSequence", "ReferencedStudySequence",
    "ProcedureCodeSequence", "ReasonForPerformedProcedureCodeSequence",
    # Patient Study
    "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence", "PatientAge", "PatientSize",
    "PatientWeight", "PatientBodyMassIndex", "MeasuredAPDimension", "MeasuredLateralDimension",
    "PatientSizeCodeSequence", "MedicalAlerts", "Allergies", "SmokingStatus", "PregnancyStatus",
    "LastMenstrualDate", "PatientState", "Occupation", "AdditionalPatientHistory", "AdmissionID",
    "IssuerOfAdmissionIDSequence", "ServiceEpisodeID", "IssuerOfServiceEpisodeIDSequence",
    "ServiceEpisodeDescription", "PatientSexNeutered", "ReasonForVisit", "ReasonForVisitCodeSequence",
    # Clinical Trial Study
    "ClinicalTrialTimePointID", "ClinicalTrialTimePointDescription", "LongitudinalTemporalOffsetFromEvent",
    "LongitudinalTemporalEventType", "ConsentForClinicalTrialUseSequence",
    # SOP Common
    "TimezoneOffsetFromUTC",
)

# Attributes every evidence dataset needs for highdicom's SR constructor (Type 2 ones may be empty).
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_TYPE2_DEFAULTS = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
    "StudyTime", "ReferringPhysicianName",
)


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the model that produced a result, as written into the DICOM objects."""

    name: str
    version: str
    architecture: str = ""

    @classmethod
    def from_prediction(cls, prediction: Any) -> ModelInfo:
        return cls(
            name=str(getattr(prediction, "model_name", "") or "fracture-classifier"),
            version=str(getattr(prediction, "model_version", "") or "0"),
            architecture=str(getattr(prediction, "architecture", "") or ""),
        )

    @property
    def display(self) -> str:
        """``name version`` plus the architecture when the name does not already say it."""
        text = f"{self.name} {self.version}"
        if self.architecture and self.architecture.lower() not in self.name.lower():
            text += f" ({self.architecture})"
        return text

    @property
    def model_name_lo(self) -> str:
        """A value for ManufacturerModelName (LO, at most 64 characters)."""
        return _lo(f"{self.name} ({self.architecture})" if self.architecture else self.name)

    @property
    def software_versions(self) -> list[str]:
        """SoftwareVersions values: the pacs-ai version and the model version (LO each)."""
        return [_lo(f"pacs-ai {pacs_ai.__version__}"), _lo(f"model {self.version}")]


def _lo(text: str) -> str:
    """A string cut to the 64 characters of a LO value, without backslashes."""
    return text.replace("\\", "/")[:64]


def contributing_equipment(model: ModelInfo, description: str) -> hd.ContributingEquipment:
    """pacs-ai as the processing algorithm that contributed to the object (IHE AI Results)."""
    # highdicom only accepts the purposes of CID 7005; the IHE AI Results code is put in afterwards.
    equipment = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model.model_name_lo,
        software_versions=model.software_versions,
        contribution_description=_lo(description),
        contribution_datetime=datetime.datetime.now(datetime.UTC).astimezone(),
    )
    equipment.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(PROCESSING_ALGORITHM)]
    return equipment


def copy_patient_study(
    source: pydicom.Dataset, target: pydicom.Dataset, *, extra: Sequence[str] = (), what: str = "result"
) -> list[HeaderFix]:
    """Copy every Patient/Study attribute present in ``source`` (plus ``extra`` keywords) into ``target``.

    Values are copied as received (bytes and character set preserved); what the standard cannot carry
    is blanked (Type 2) or removed, one log line each (``pacs_ai.write.header``). Returns the fixes.
    Never raises for a header value.
    """
    return copy_attributes(source, target, (*PATIENT_STUDY_KEYWORDS, *extra), what=what)


def source_header(source: pydicom.Dataset) -> pydicom.Dataset:
    """The source image without its pixel data, for highdicom's SR evidence and image library.

    Elements are copied as they are (raw elements stay raw: the source is not decoded). The
    patient/study attributes highdicom reads and validates from the evidence are given empty values:
    the result object gets the source's own values afterwards from ``copy_patient_study``, which
    never fails on them.

    Raises DicomWriteError when a UID needed to reference the source is missing.
    """
    missing = [k for k in _REQUIRED_UIDS if not str(source.get(k, "") or "").strip()]
    if missing:
        raise DicomWriteError(f"the source image has no {', '.join(missing)}: cannot reference it")
    header = pydicom.Dataset()
    for tag in list(source.keys()):
        if tag.group in (0x7FE0, 0xFFFC) or tag.is_private:
            continue
        header[tag] = copy.deepcopy(source.get_item(tag))
    for keyword in _TYPE2_DEFAULTS:
        setattr(header, keyword, None)
    if getattr(source, "file_meta", None) is not None:
        header.file_meta = copy.deepcopy(source.file_meta)
    return header
