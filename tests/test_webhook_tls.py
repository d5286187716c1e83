"""Issue 21: TLS served by the receiver itself, with a self-signed certificate the sandbox is told to trust
(`webhook_ca_file`, a test facility); deliveries arrive over https and plain http to the port fails."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import signal
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from cleanlist.sandbox.config import SandboxConfig
from cleanlist.store import EnrichmentStore
from cleanlist.webhooks import hook_url, register_run
from tests.flow_helpers import messy_export, run_flow
from tests.sandbox_helpers import people
from tests.test_client import client_for
from tests.test_webhook_deliveries import _deliveries_of, _free_port
from tests.test_webhooks import _assert_every_row_right, _status_calls, _wait_for

pytestmark = pytest.mark.usefixtures("prefect_harness")


def self_signed(directory: Path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and localhost, signed by its own key: (cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cleanlist test receiver")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "receiver.pem", directory / "receiver.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


def _plain_http_fails(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    except httpx.TransportError:
        return True
    return False


def _stored_deliveries(store_url: str) -> list[str]:
    engine = sa.create_engine(store_url)
    with engine.connect() as conn:
        found = conn.exec_driver_sql("SELECT workflow_id FROM cleanlist_webhook_deliveries").scalars().all()
    engine.dispose()
    return sorted(found)


def test_a_run_serving_tls_itself_gets_every_delivery_over_https(
    tmp_path: Path, make_sandbox, api_env
) -> None:
    cert, key = self_signed(tmp_path)
    sandbox = make_sandbox(rate_limit=None, latency=0.2, webhook_ca_file=cert)
    api_env(sandbox)
    source = messy_export(tmp_path / "crm.csv", unique=300)
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    port = _free_port()
    plain_http_failed: list[bool] = []

    def probe_plain_http_once_listening() -> None:
        # While the run serves: the TLS port refuses a plain-http request (no answer, the handshake fails).
        _wait_for(lambda: sandbox.state.counters()["bulk_accepted"] >= 1, timeout=120)
        plain_http_failed.append(_plain_http_fails(port))

    prober = threading.Thread(target=probe_plain_http_once_listening, daemon=True)
    prober.start()
    state, summary = run_flow(
        source=str(source),
        output=str(tmp_path / "out.csv"),
        store=store_url,
        webhook_listen=f"127.0.0.1:{port}",
        webhook_tls_cert=cert,
        webhook_tls_key=key,
        webhook_grace_seconds=5.0,
    )
    prober.join(timeout=30)

    assert state.is_completed(), state.message
    _assert_every_row_right(sandbox, tmp_path / "out.csv", summary, 300)
    with sandbox.state._lock:  # the sandbox's own record: where it delivered
        urls = {w.webhook_url for w in sandbox.state._workflows.values()}
    assert len(urls) == 1 and next(iter(urls)).startswith(f"https://127.0.0.1:{port}/hooks/")  # type: ignore[union-attr]
    truth = _deliveries_of(sandbox)
    assert all(attempts == ["delivered"] for attempts in truth.values()), truth
    assert _stored_deliveries(store_url) == sorted(truth)
    assert summary["webhook_deliveries"] == 2 and summary["status_calls"] == _status_calls(sandbox) == 0
    assert plain_http_failed == [True]


def test_the_receiver_command_serves_https_and_an_untrusting_sender_sees_a_tls_error(
    tmp_path: Path, make_sandbox
) -> None:
    cert, key = self_signed(tmp_path)
    # The first attempt a second after completion: the ledger entry is recorded by then (else 404, retried).
    trusting = make_sandbox(latency=0.0, rate_limit=None, webhook_ca_file=cert, webhook_delay=1.0)
    untrusting = make_sandbox(latency=0.0, rate_limit=None, webhook_backoff_scale=0.0)
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    with EnrichmentStore(store_url):  # the schema, before the receiver opens it
        pass
    process = subprocess.Popen(
        [sys.executable, "-m", "cleanlist_prefect.deployments.cli", "receiver", "--port", "0",
         "--store", store_url, "--tls-cert", cert, "--tls-key", key],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("receiving webhooks on https://127.0.0.1:"), line
        base = line.split()[3].removesuffix("/hooks/<token>")
        port = int(base.rsplit(":", 1)[1])
        trust = ssl.create_default_context(cafile=cert)
        assert httpx.get(f"{base}/healthz", verify=trust, timeout=10).status_code == 200
        assert _plain_http_fails(port)

        # A workflow of a run registered in the shared store, delivered by the sandbox over https.
        with EnrichmentStore(store_url) as store, client_for(trusting) as client:
            store.start_run("tls-run", {})
            url = hook_url(base, register_run(store, "tls-run"))
            submitted = client.enrich_bulk(people(3), webhook_url=url)
            store.record_accepted(
                "tls-run",
                workflow_id=submitted.workflow_id,
                chunk_key="0",
                enrichment_type="partial",
                keys=[f"k{i}" for i in range(3)],
                task_ids=list(submitted.task_ids),
                worst_case_credits=3.0,
            )
            _wait_for(lambda: bool(client.webhook_deliveries(submitted.workflow_id).deliveries), timeout=30)
            log = client.webhook_deliveries(submitted.workflow_id).deliveries
            delivered = store.delivered([submitted.workflow_id])
        with client_for(untrusting) as client:
            refused = client.enrich_bulk(people(1, tag="u"), webhook_url=url)
            _wait_for(lambda: len(client.webhook_deliveries(refused.workflow_id).deliveries) == 5, timeout=30)
            untrusted = client.webhook_deliveries(refused.workflow_id).deliveries
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    assert "Traceback" not in stderr
    assert [(d.status, d.response_code) for d in log] == [("delivered", 200)]
    assert set(delivered) == {submitted.workflow_id}
    assert {d.status for d in untrusted} == {"failed"}
    assert all("certificate" in (d.error or "").lower() for d in untrusted), untrusted


def test_a_ca_file_that_is_no_certificate_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "not.pem").write_text("not a certificate\n")
    with pytest.raises(ValueError, match="cannot trust certificates from") as raised:
        SandboxConfig(webhook_ca_file=str(tmp_path / "not.pem"))
    assert "Traceback" not in str(raised.value)
