"""pacs-ai: a DICOM/PACS AI gateway for bone fracture detection."""

__version__ = "0.1.0"
