"""Who may talk to the DICOM node: the allow-list (AET@HOST), the called-AE check, the host check, DICOM TLS with
certificates made in the test, and refusals logged with the peer (issue 24, item 1)."""

from __future__ import annotations

import io
import ipaddress
import logging
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

pynetdicom = pytest.importorskip("pynetdicom", reason="the [dicom] extra is not installed")

from pynetdicom.sop_class import Verification  # noqa: E402

from cxr_triage.dicom import node as dicom_node  # noqa: E402
from cxr_triage.dicom.access import Access, parse_allowed, peer_name, read_allow_file, tls_context  # noqa: E402
from cxr_triage.dicom.server import NodeLimits  # noqa: E402
from cxr_triage.dicom.triage import SUCCESS  # noqa: E402
from tests.dicom_peers import NODE, StandInPACS, echo, store  # noqa: E402
from tests.dicom_samples import chest_dicom  # noqa: E402
from tests.ports import free_port  # noqa: E402


@pytest.fixture(scope="module")
def guarded(pacs: StandInPACS) -> Iterator[int]:
    """A node that takes MODALITY (and any AE title from 127.0.0.2) only."""
    port = free_port()
    access = Access.from_entries(NODE, ["MODALITY@127.0.0.1", "*@127.0.0.2"])
    server = dicom_node.start(NODE, port, f"PACS@127.0.0.1:{pacs.port}", access=access)
    yield port
    server.shutdown()


def test_allow_list_entries():
    (entry,) = parse_allowed("MODALITY1@10.0.0.5")
    assert entry.matches("MODALITY1", "10.0.0.5") and entry.matches("MODALITY1", "::ffff:10.0.0.5")
    assert not entry.matches("MODALITY2", "10.0.0.5") and not entry.matches("MODALITY1", "10.0.0.6")
    (net,) = parse_allowed("*@10.0.0.0/24")
    assert net.matches("ANY", "10.0.0.77") and not net.matches("ANY", "10.0.1.1")
    assert all(e.network.num_addresses == 1 for e in parse_allowed("CT1@localhost"))  # a name: its addresses
    assert parse_allowed("PACS@[::1]")[0].network == ipaddress.ip_network("::1")
    for bad in ("MODALITY", "@10.0.0.5", "TOOLONGAETITLE1234@10.0.0.5", "A\\B@10.0.0.5", "BAD\n@10.0.0.5"):
        with pytest.raises(ValueError, match="AET@HOST"):
            parse_allowed(bad)
    with pytest.raises(ValueError, match="does not resolve"):
        parse_allowed("CT1@no-such-host.invalid")


def test_allow_file(tmp_path):
    path = tmp_path / "peers.txt"
    path.write_text("# modalities\nCR1@10.0.0.5\n\nDX1@10.0.0.6  # the ward\n")
    assert read_allow_file(path) == ["CR1@10.0.0.5", "DX1@10.0.0.6"]
    access = Access.from_entries(NODE, read_allow_file(path))
    assert access.host_allowed("10.0.0.6") and not access.host_allowed("10.0.0.7")
    assert access.refusal("DX1", NODE, "10.0.0.6") is None
    assert access.refusal("CR1", NODE, "10.0.0.6") is not None  # an AE title only counts from its own host
    with pytest.raises(ValueError, match="cannot read"):
        read_allow_file(tmp_path / "missing.txt")


def test_peers_in_logs_are_escaped():
    assert peer_name("EVIL\nCRITICAL", "10.0.0.5") == "EVIL\\nCRITICAL@10.0.0.5"
    assert "\x1b" not in peer_name("A\x1b[2J", "::1")


def test_allowed_peer_is_served(guarded, pacs):
    assoc = echo(guarded)
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()
    pacs.take()
    assert store(guarded, chest_dicom()) == SUCCESS  # the test helper calls as MODALITY
    assert sorted(ds.Modality for ds in pacs.wait(2)) == ["OT", "SR"]


def test_calling_ae_not_on_the_allow_list_is_refused(guarded, caplog):
    caplog.set_level(logging.WARNING)
    assoc = echo(guarded, calling="INTRUDER")
    assert assoc.is_rejected and not assoc.is_established
    assert assoc.acceptor.primitive.diagnostic == 0x03  # calling AE title not recognised
    assert "association from INTRUDER@127.0.0.1 refused" in caplog.text


def test_wrong_called_ae_is_refused(guarded, caplog):
    caplog.set_level(logging.WARNING)
    assoc = echo(guarded, called="SOMEONE_ELSE")
    assert assoc.is_rejected and assoc.acceptor.primitive.diagnostic == 0x07  # called AE title not recognised
    assert "called AE title 'SOMEONE_ELSE' is not this node's" in caplog.text


def test_open_node_still_checks_the_called_ae(pacs):
    port = free_port()
    server = dicom_node.start(NODE, port, f"PACS@127.0.0.1:{pacs.port}")
    try:
        assert echo(port, calling="ANYONE").is_established  # open default: any calling AE title on loopback
        assert echo(port, called="OTHER").is_rejected
    finally:
        server.shutdown()


def test_host_on_no_entry_is_closed_before_a_byte_is_read(pacs, caplog):
    caplog.set_level(logging.WARNING)
    port = free_port()
    access = Access.from_entries(NODE, ["MODALITY@10.11.12.13"])
    server = dicom_node.start(NODE, port, f"PACS@127.0.0.1:{pacs.port}", access=access)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            assert s.recv(1) == b""  # closed at once
        assert not echo(port).is_established
        assert "connection from 127.0.0.1 refused: the host is on no allow-list entry" in caplog.text
    finally:
        server.shutdown()


def test_wide_bind_without_allow_list_warns(pacs, caplog):
    caplog.set_level(logging.WARNING)
    server = dicom_node.start(NODE, free_port(), f"PACS@127.0.0.1:{pacs.port}", host="0.0.0.0")
    server.shutdown()
    assert "has no allow-list" in caplog.text


# ---- DICOM TLS


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA, the node's certificate for 127.0.0.1 and a modality's client certificate, both signed by it."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("certs")
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"]
    openssl("req", "-x509", *key, "-subj", "/CN=test-ca", "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    for name, extra in (("node", ["-addext", "subjectAltName=IP:127.0.0.1"]), ("client", [])):
        signed = ["-CA", "ca.pem", "-CAkey", "ca.key", *extra]
        openssl(
            "req",
            "-x509",
            *key,
            "-subj",
            f"/CN={name}",
            *signed,
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.pem",
            cwd=d,
        )
    return d


@pytest.fixture(scope="module")
def tls_node(pacs: StandInPACS, certs: Path) -> Iterator[int]:
    port = free_port()
    context = tls_context(certs / "node.pem", certs / "node.key", certs / "ca.pem")
    access = Access.from_entries(NODE, ["MODALITY@127.0.0.1"])
    server = dicom_node.start(NODE, port, f"PACS@127.0.0.1:{pacs.port}", access=access, tls=context)
    yield port
    server.shutdown()


def client_tls(certs: Path, with_certificate: bool = True) -> tuple[ssl.SSLContext, str]:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs / "ca.pem"))
    if with_certificate:
        context.load_cert_chain(certs / "client.pem", certs / "client.key")
    return context, "127.0.0.1"


def test_tls_round_trip_with_client_certificate(tls_node, certs, pacs):
    pacs.take()
    ae = pynetdicom.AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    ds = pydicom.dcmread(io.BytesIO(chest_dicom("Normal-1655.jpg")))
    ae.add_requested_context(ds.SOPClassUID)
    assoc = ae.associate("127.0.0.1", tls_node, ae_title=NODE, tls_args=client_tls(certs))
    assert assoc.is_established
    try:
        assert isinstance(assoc.dul.socket.socket, ssl.SSLSocket)
        assert assoc.send_c_echo().Status == 0 and assoc.send_c_store(ds).Status == SUCCESS
    finally:
        assoc.release()
    assert sorted(r.Modality for r in pacs.wait(2)) == ["OT", "SR"]


def test_tls_refuses_clients_without_certificate_or_tls(tls_node, certs, caplog):
    caplog.set_level(logging.WARNING)
    assert not echo(tls_node, tls=client_tls(certs, with_certificate=False)).is_established
    assert not echo(tls_node).is_established  # plain DICOM on the TLS port
    deadline = time.monotonic() + 5
    while "TLS handshake failed" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "connection from 127.0.0.1 refused: TLS handshake failed" in caplog.text


def test_silent_tls_client_does_not_stop_the_accept_loop(tls_node, certs):
    """pynetdicom shakes hands in its accept loop: one connection that never speaks would stop every other."""
    with socket.create_connection(("127.0.0.1", tls_node), timeout=5):
        t0 = time.monotonic()
        assoc = echo(tls_node, tls=client_tls(certs))
        assert assoc.is_established and time.monotonic() - t0 < 3
        assoc.release()


def test_tls_settings_are_checked(certs, tmp_path):
    with pytest.raises(ValueError, match="cannot load the TLS"):
        tls_context(certs / "node.pem", certs / "client.key")  # a key that does not match
    with pytest.raises(ValueError, match="cannot load the TLS"):
        tls_context(tmp_path / "missing.pem", certs / "node.key")
    assert NodeLimits().max_associations == 10


def test_cli_refuses_bad_access_settings(pacs, tmp_path, certs):
    from typer.testing import CliRunner

    from cxr_triage.cli import app

    base = ["dicom-node", "--send-to", f"PACS@127.0.0.1:{pacs.port}", "--port", str(free_port())]
    empty = tmp_path / "empty.txt"
    empty.write_text("# nobody yet\n")
    cases = {
        "is not AET@HOST": ["--allow", "MODALITY"],
        "names no peer": ["--allow-file", str(empty)],
        "needs both --tls-cert and --tls-key": ["--tls-cert", str(certs / "node.pem")],
        "cannot load the TLS": ["--tls-cert", str(certs / "node.pem"), "--tls-key", str(certs / "client.key")],
        "out of range": ["--max-associations", "0"],
    }
    for message, args in cases.items():
        out = CliRunner().invoke(app, [*base, *args])
        assert out.exit_code == 2 and message in " ".join(out.output.split()), (args, out.output)
