"""Test helper: run the real service (uvicorn via ``serving.app.serve``) in a subprocess.

``running_service(**settings)`` starts ``serve(...)`` on a free loopback port, waits for
``/healthz``, yields a :class:`Service`, then stops it with SIGTERM (the graceful path) and
checks that every process it started (workers, their sandboxes, the forkserver) is gone.
Unless a test sets ``drain_grace_s``, the drain after SIGTERM is 0 s (sessions a test leaves
open are closed at once). ``make_tls_files`` makes a CA and a loopback certificate it signed.
"""

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from serving.settings import TOKEN_ENV_VAR

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Service:
    url: str
    process: subprocess.Popen
    log_path: Path
    token: str | None = None
    ca_file: str | None = None

    def client(self, token: str | None = None, **kwargs) -> httpx.Client:
        token = token if token is not None else self.token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if self.ca_file is not None:
            kwargs.setdefault("verify", ssl.create_default_context(cafile=self.ca_file))
        return httpx.Client(base_url=self.url, headers=headers, timeout=120, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []


def serve_command(settings: dict) -> list[str]:
    code = "import json, sys\nfrom serving.app import serve\nserve(**json.loads(sys.argv[1]))\n"
    return [sys.executable, "-c", code, json.dumps(settings)]


@contextlib.contextmanager
def running_service(
    tmp_path: Path,
    startup_s: float = 60.0,
    environ: dict[str, str] | None = None,
    ca_file: str | None = None,
    **settings,
) -> Iterator[Service]:
    """``settings`` are serve() arguments; ``environ`` adds environment variables; ``ca_file``
    verifies the service's certificate when the settings turn TLS on."""
    settings = {"host": "127.0.0.1", "port": free_port(), "drain_grace_s": 0.0, **settings}
    scheme = "https" if settings.get("tls_certfile") else "http"
    log_path = tmp_path / f"service-{settings['port']}.log"
    env = {key: value for key, value in os.environ.items() if key != TOKEN_ENV_VAR}
    env.update(PYTHONUNBUFFERED="1", **(environ or {}))
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            serve_command(settings), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env
        )
    token = settings.get("token") or env.get(TOKEN_ENV_VAR)
    url = f"{scheme}://127.0.0.1:{settings['port']}"
    service = Service(url, process, log_path, token, ca_file)
    verify = ssl.create_default_context(cafile=ca_file) if ca_file else True
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"the service exited with {process.returncode}:\n{service.log()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                health = httpx.get(f"{service.url}/healthz", timeout=2, verify=verify)
                if health.status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service did not start in {startup_s} s:\n{service.log()}")
            time.sleep(0.2)
        yield service
    finally:
        stop_service(service)


def stop_service(service: Service, timeout_s: float = 60.0) -> None:
    """SIGTERM (graceful shutdown), then assert that no process of the service is left."""
    process = service.process
    started = service.descendants()
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(f"the service ignored SIGTERM:\n{service.log()[-3000:]}") from None
    deadline = time.monotonic() + 10
    while (alive := [p for p in started if is_alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    leftovers = [f"{p.pid} {p.name()}" for p in alive]
    for leftover in alive:
        with contextlib.suppress(psutil.Error):
            leftover.kill()
    assert not leftovers, f"processes left behind by the service: {leftovers}"


def is_alive(process: psutil.Process) -> bool:
    """Running and not a zombie (an exited orphan waits for PID 1 to reap it)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def make_tls_files(folder: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> dict:
    """A CA and a server certificate it signed for ``hosts`` (PEM files in ``folder``).

    Returns {"ca_file", "certfile", "keyfile"}: what a client trusts and what the server
    presents. Made fresh per test with the ``cryptography`` package; nothing is fetched.
    """
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "eprl test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {
        "ca_file": folder / "ca.pem",
        "certfile": folder / "server.pem",
        "keyfile": folder / "server-key.pem",
    }
    paths["ca_file"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["certfile"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["keyfile"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    paths["keyfile"].chmod(0o600)
    return {name: str(path) for name, path in paths.items()}


def scrape(http) -> dict:
    """{(sample name, sorted label items): value} from /metrics."""
    samples = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples
