"""Layer: classes, the one preprocessing function, DICOM reading and config (no torch)."""
