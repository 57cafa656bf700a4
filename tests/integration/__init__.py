"""Integration tests: a live server or DICOM node, a browser, Orthanc, Ray, the CLI as a subprocess, or training."""
