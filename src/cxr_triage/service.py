"""The web service's app factory at its old path, so that ``uvicorn --factory cxr_triage.service:create_app`` keeps
working; the service itself is ``cxr_triage.serve`` (``cxr_triage.serve.app:create_app``)."""

from cxr_triage.serve.app import create_app

__all__ = ["create_app"]
