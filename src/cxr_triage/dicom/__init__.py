"""Way in: the DICOM node (pynetdicom Storage SCP/SCU, ``cxr-triage dicom-node``): access and limits, the triage of
each received instance, its SR and Secondary Capture results, and the outbox that sends them to the PACS."""
