"""DICOM TLS: the contexts from pacs_ai.ops.tls work with pynetdicom, and mutual TLS refuses strangers.

Certificates (a CA, a server and a client certificate, plus a client certificate from another CA) are
made in the test with the openssl CLI (or the ``cryptography`` package on a host without openssl).
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from pacs_ai.config import TlsConfig
from pacs_ai.errors import ConfigError
from pacs_ai.ops.tls import client_context, server_context


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(folder: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )


def _make_leaf(folder: Path, name: str, ca: str, usage: str) -> None:
    (folder / f"{name}.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        f"extendedKeyUsage={usage}\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=folder,
    )
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-set_serial",
        str(abs(hash(name)) % 10**9), "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext", cwd=folder,
    )


def _make_with_cryptography(folder: Path) -> None:  # pragma: no cover - used where cryptography is installed
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def write(name: str, key, cert) -> None:  # type: ignore[no-untyped-def]
        (folder / f"{name}.key").write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        (folder / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def build(name: str, key, issuer_name, issuer_key, ca: bool, usage=None):  # type: ignore[no-untyped-def]
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key((issuer_key or key).public_key()), critical=False
            )
        )
        if ca:
            b = b.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
        else:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False).add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        return b.sign(issuer_key or key, hashes.SHA256())

    cas = {}
    for ca_name in ("ca", "otherca"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = build(ca_name, key, None, None, True)
        write(ca_name, key, cert)
        cas[ca_name] = (cert, key)
    for name, ca_name, usage in (
        ("server", "ca", ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", "ca", ExtendedKeyUsageOID.CLIENT_AUTH),
        ("stranger", "otherca", ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = build(name, key, cas[ca_name][0].subject, cas[ca_name][1], False, usage)
        write(name, key, cert)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    if shutil.which("openssl") is not None:
        _make_ca(folder, "ca")
        _make_ca(folder, "otherca")
        _make_leaf(folder, "server", "ca", "serverAuth")
        _make_leaf(folder, "client", "ca", "clientAuth")
        _make_leaf(folder, "stranger", "otherca", "clientAuth")
    else:  # pragma: no cover - hosts without the openssl CLI
        pytest.importorskip("cryptography", reason="neither the openssl CLI nor the cryptography package is available")
        _make_with_cryptography(folder)
    return folder


def _tls(folder: Path, name: str | None, ca: str | None = "ca") -> TlsConfig:
    return TlsConfig(
        cert_file=folder / f"{name}.crt" if name else None,
        key_file=folder / f"{name}.key" if name else None,
        ca_file=folder / f"{ca}.crt" if ca else None,
    )


@pytest.fixture
def scp(certs):
    """A pynetdicom Verification SCP on a free port using server_context with mutual TLS."""
    ae = AE(ae_title="PACSAI")
    ae.add_supported_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 5
    calls: list[str] = []

    def on_echo(event):  # type: ignore[no-untyped-def]
        calls.append(event.assoc.requestor.ae_title)
        return 0x0000

    server = ae.start_server(
        ("127.0.0.1", 0),
        block=False,
        ssl_context=server_context(_tls(certs, "server", "ca")),
        evt_handlers=[(evt.EVT_C_ECHO, on_echo)],
    )
    try:
        yield server.server_address[1], calls
    finally:
        server.shutdown()


def _echo(port: int, ctx: ssl.SSLContext, hostname: str | None = None) -> int | None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSAI", tls_args=(ctx, hostname))  # type: ignore[arg-type]
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if status else None
    finally:
        assoc.release()


def test_mutual_tls_echo(certs, scp):
    port, calls = scp
    assert _echo(port, client_context(_tls(certs, "client", "ca"))) == 0x0000
    # the same with host name checking on (the certificate names localhost)
    assert _echo(port, client_context(_tls(certs, "client", "ca"), check_hostname=True), "localhost") == 0x0000
    assert calls == ["TESTSCU", "TESTSCU"]


def test_client_without_certificate_is_refused(certs, scp):
    port, calls = scp
    assert _echo(port, client_context(_tls(certs, None, "ca"))) is None
    assert _echo(port, client_context(_tls(certs, "stranger", "ca"))) is None  # signed by another CA
    assert calls == []


def test_client_refuses_an_untrusted_server(certs, scp):
    port, calls = scp
    # the client trusts only "otherca", so the listener's certificate does not verify
    assert _echo(port, client_context(_tls(certs, "client", "otherca"))) is None
    assert calls == []


def test_contexts_are_tls12_plus_and_errors_name_the_key(certs, tmp_path):
    server = server_context(_tls(certs, "server", "ca"))
    assert server.minimum_version >= ssl.TLSVersion.TLSv1_2 and server.verify_mode == ssl.CERT_REQUIRED
    assert server_context(_tls(certs, "server", None)).verify_mode == ssl.CERT_NONE  # TLS without client certs
    client = client_context(None)
    assert client.minimum_version >= ssl.TLSVersion.TLSv1_2 and client.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(ConfigError) as err:
        server_context(TlsConfig(cert_file=tmp_path / "missing.crt", key_file=tmp_path / "missing.key"))
    assert err.value.key == "listener.tls.cert_file"
    with pytest.raises(ConfigError) as err:
        client_context(TlsConfig(ca_file=tmp_path / "missing.crt"), key="destinations[0].tls")
    assert err.value.key == "destinations[0].tls.ca_file"


@pytest.mark.parametrize("mutual", [False, True])
def test_status_probes_a_tls_listener(certs, tmp_path, mutual):
    from pacs_ai.cli.status import probe_listener
    from pacs_ai.config import load_config

    ae = AE(ae_title="PACSAI")
    ae.add_supported_context(Verification)
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, ssl_context=server_context(_tls(certs, "server", "ca" if mutual else None))
    )
    try:
        config = tmp_path / "pacs-ai.toml"
        config.write_text(
            f"[listener]\nport = {server.server_address[1]}\n[listener.tls]\n"
            f'cert_file = "{certs}/server.crt"\nkey_file = "{certs}/server.key"\n'
            + (f'ca_file = "{certs}/ca.crt"\n' if mutual else "")
        )
        report = probe_listener(load_config(config), timeout=3)
    finally:
        server.shutdown()
    assert report["tls"] and report["listening"]
    if mutual:  # the server certificate is not meant for client use: the probe only sees the port open
        assert not report["up"] and "C-ECHO not verified" in report["detail"]
    else:
        assert report["up"] and report["detail"] == "C-ECHO answered"


def test_send_and_echo_commands_over_mutual_tls_to_the_real_listener(certs, sample_file, tmp_path, capsys):
    """``pacs-ai send``/``echo`` (the deliveries' C-STORE client core) with --tls-*: a client certificate
    from the listener's CA is accepted and the image is queued; without one nothing gets through."""
    import argparse

    from pydicom.filereader import read_file_meta_info

    from pacs_ai.cli import network
    from pacs_ai.config import ListenerConfig
    from pacs_ai.queue.jobstore import JobStore
    from pacs_ai.receive.listener import Listener
    from pacs_ai.store.spool import Spool

    def cli(*argv: str) -> int:
        parser = argparse.ArgumentParser(prog="pacs-ai")
        network.register(parser.add_subparsers(dest="command"))
        args = parser.parse_args(list(argv))
        return int(args.func(args) or 0)

    jobs = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}", upgrade=True)
    listener = Listener(
        ListenerConfig(port=0, network_timeout_s=10.0), Spool(tmp_path / "spool"), jobs,
        ssl_context=server_context(_tls(certs, "server", "ca")),
    )
    listener.start()
    try:
        address = f"127.0.0.1:{listener.port}"
        client = ("--tls-ca", str(certs / "ca.crt"), "--tls-cert", str(certs / "client.crt"), "--tls-key", str(certs / "client.key"))
        assert cli("echo", address, *client, "--timeout", "10") == 0
        assert "success" in capsys.readouterr().out
        assert cli("send", str(sample_file), "--to", address, *client, "--timeout", "10") == 0
        assert "1 sent, 0 failed" in capsys.readouterr().out
        uid = str(read_file_meta_info(sample_file).MediaStorageSOPInstanceUID)
        assert jobs.find_by_sop_uid(uid) is not None
        assert cli("send", str(sample_file), "--to", address, "--tls-ca", str(certs / "ca.crt"), "--timeout", "10") == 1
        assert "0 sent, 1 failed" in capsys.readouterr().out
        assert cli("echo", address, "--timeout", "10") == 1  # plain TCP to a TLS listener
        assert len(jobs.list_jobs()) == 1
    finally:
        listener.stop(grace_s=1.0)
        jobs.close()


def test_daemon_listener_and_sender_over_mutual_tls(certs, tmp_path, sample_file):
    """The real ``pacs-ai serve`` with ``[listener.tls]`` (client certificates required) and a destination
    with ``[destinations.tls]``: an image sent with a client certificate is stored and its results reach a
    destination that also requires a client certificate; clients without one, with one from another CA, or
    without TLS are refused and leave no job."""
    from support.daemon_harness import Daemon, file_identity, shared_model
    from support.dest_scp import DestSCP

    def files(name: str | None, ca: str | None = "ca") -> dict[str, str]:
        return {k: str(v) for k, v in vars(_tls(certs, name, ca)).items() if v is not None}

    dest = DestSCP(ae_title="TLSDEST", ssl_context=server_context(_tls(certs, "server", "ca")))
    with dest:
        daemon = Daemon(
            tmp_path / "daemon", model=shared_model(),
            destinations=[{"name": "tlsdest", "ae_title": "TLSDEST", "host": "127.0.0.1", "port": dest.port,
                           "tls": files("client")}],
            overrides={"listener": {"tls": files("server")}},
            client_ssl=client_context(_tls(certs, "client", "ca")),
        )
        with daemon:  # started: it answered a C-ECHO over mutual TLS
            uid = file_identity(sample_file)[1]
            refused = {
                "no client certificate": client_context(_tls(certs, None, "ca")),
                "certificate from another CA": client_context(_tls(certs, "stranger", "ca")),
            }
            for why, ctx in refused.items():
                result = daemon.send([sample_file], ssl_context=ctx, timeout=10)
                assert not result.accepted, f"a client with {why} was let in"
            plain = daemon.send([sample_file], ssl_context=None, timeout=10)
            assert not plain.accepted, "a client without TLS was let in"
            assert daemon.job(uid) is None, "a refused client left a job"

            result = daemon.send([sample_file])
            assert result.accepted and result.statuses == [0x0000], result
            job = daemon.wait_settled([uid], timeout=120)[uid]
            assert job is not None and str(job.state) == "done", job
            study = str(pydicom_study(sample_file))
            assert dest.wait_for(lambda d: d.complete_studies({study}) == {study}, 120), (
                f"results not delivered over TLS: {daemon.log_tail()}"
            )
            assert {r.calling_ae for r in dest.stored()} == {"PACSAI"}
            assert daemon.wait_until(
                lambda: [str(d.state) for d in daemon.jobs().list_deliveries(job_id=job.id)] == ["done"], 60)


def pydicom_study(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
