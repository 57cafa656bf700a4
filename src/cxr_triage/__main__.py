"""``python -m cxr_triage``: the same command line as ``cxr-triage``."""

from cxr_triage.cli import app

app(prog_name="cxr-triage")
