"""Way in: scoring a whole archive with Ray Data (``cxr-triage predict --ray``), resumable, the CLI's rows."""
