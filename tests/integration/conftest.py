"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def pacs() -> Iterator:
    """A stand-in PACS (tests/dicom_peers.py) for one test module: the node's results arrive there."""
    pytest.importorskip("pynetdicom", reason="the [dicom] extra is not installed")
    from tests.dicom_peers import StandInPACS

    p = StandInPACS()
    yield p
    p.server.shutdown()
