"""A test CA, server certificates, and Debian's nginx as a TLS + API-key + rate-limit front of the cluster.

    certs = TestCertificates(tmp_dir)            # CA, good, expired and wrong-host certificates
    with Nginx(tmp_dir, certs, upstream, key, rate_per_second=50) as nginx:
        nginx.url("good") ...                     # https://localhost:<port> with the good certificate

nginx runs with its own prefix, pid file, error log and temp paths under the
test's directory and is stopped by its PID.
"""

import base64
import datetime
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from support import free_ports

VARIANTS = ("good", "expired", "wronghost")
# A recognisable key in the usual encoded form: base64("<id>:<secret>").
KEY_ID, KEY_SECRET = "canaryid7Q", "canary-secret-5b9e0d4c"
KEY = base64.b64encode(f"{KEY_ID}:{KEY_SECRET}".encode()).decode()
READONLY_KEY = base64.b64encode(b"readonly:canary-readonly-77").decode()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return TestCertificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def nginx(tmp_path_factory, certs, cluster_url):
    """nginx accepting KEY (READONLY_KEY gets 403 on _bulk) in front of the test cluster."""
    with Nginx(tmp_path_factory.mktemp("nginx"), certs, cluster_url, KEY, readonly_key=READONLY_KEY) as server:
        yield server


def tls_env(certs, key=KEY, **extra) -> dict:
    """Agent environment trusting the test CA and sending `key`."""
    env = {"PUSHAGENT_CA_BUNDLE": str(certs.ca), **extra}
    if key:
        env["PUSHAGENT_API_KEY"] = key
    return env


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


class TestCertificates:
    """ca.pem plus <variant>.pem / <variant>.key for each of VARIANTS, in `directory`."""

    __test__ = False  # not a pytest class

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.timezone.utc)
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        self._ca = self._sign(_name("pushagent test CA"), self._ca_key.public_key(), now - datetime.timedelta(days=1),
                              now + datetime.timedelta(days=30), ca=True)
        self.ca = self.directory / "ca.pem"
        self.ca.write_bytes(self._ca.public_bytes(serialization.Encoding.PEM))
        day = datetime.timedelta(days=1)
        self._server("good", ["localhost"], now - day, now + 30 * day)
        self._server("expired", ["localhost"], now - 30 * day, now - day)
        self._server("wronghost", ["search.example.org"], now - day, now + 30 * day)

    def cert(self, variant: str) -> Path:
        return self.directory / f"{variant}.pem"

    def key(self, variant: str) -> Path:
        return self.directory / f"{variant}.key"

    def _server(self, variant, hosts, not_before, not_after) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._sign(_name(hosts[0]), key.public_key(), not_before, not_after, hosts=hosts)
        self.cert(variant).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(self.key(variant), key)

    def _sign(self, subject, public_key, not_before, not_after, ca=False, hosts=()):
        builder = (x509.CertificateBuilder().subject_name(subject)
                   .issuer_name(_name("pushagent test CA")).public_key(public_key)
                   .serial_number(x509.random_serial_number()).not_valid_before(not_before)
                   .not_valid_after(not_after)
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                                            critical=True)
        else:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]),
                                            critical=False)
        return builder.sign(self._ca_key, hashes.SHA256())


class Nginx:
    """nginx in front of `upstream`: one TLS server per certificate variant, ApiKey required, limit_req 429."""

    def __init__(self, directory: Path, certs: TestCertificates, upstream: str, api_key: str,
                 rate_per_second: int = 1000, readonly_key: str = "none"):
        self.directory = Path(directory)
        self.certs = certs
        self.upstream = upstream.rstrip("/")
        self.api_key = api_key
        self.rate = rate_per_second
        self.readonly_key = readonly_key    # accepted, but answered 403 on _bulk
        self.ports = dict(zip(VARIANTS, free_ports(len(VARIANTS))))  # distinct: one server per port
        self.process = None

    def url(self, variant: str = "good", host: str = "localhost") -> str:
        return f"https://{host}:{self.ports[variant]}"

    @property
    def access_log(self) -> Path:
        return self.directory / "access.log"

    def statuses(self) -> list[int]:
        """HTTP status of every request nginx answered so far."""
        if not self.access_log.exists():
            return []
        return [int(line.split()[0]) for line in self.access_log.read_text().splitlines() if line.strip()]

    def __enter__(self):
        for sub in ("temp/body", "temp/proxy", "temp/fastcgi", "temp/uwsgi", "temp/scgi"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        conf = self.directory / "nginx.conf"
        conf.write_text(self._config())
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        self.process = subprocess.Popen([binary, "-p", str(self.directory), "-c", str(conf),
                                         "-e", str(self.directory / "error.log"), "-g", "daemon off;"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_ready()
        return self

    def __exit__(self, *exc):
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=20)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.ports["good"]), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not start listening within 20 s")

    def _config(self) -> str:
        temp = self.directory / "temp"
        user = "user root root;\n" if os.geteuid() == 0 else ""  # workers must read the temp dirs we made
        servers = "\n".join(self._server(variant) for variant in VARIANTS)
        return f"""{user}worker_processes 1;
pid {self.directory}/nginx.pid;
events {{ worker_connections 128; }}
http {{
    log_format status '$status $request_method $uri';
    access_log {self.access_log} status;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    client_max_body_size 100m;
    client_body_buffer_size 4m;
    limit_req_zone $server_port zone=push:1m rate={self.rate}r/s;
    limit_req_status 429;
    map $status $retry_after {{ 429 1; default ""; }}
    upstream cluster {{ server {self.upstream.split('://', 1)[1]}; keepalive 4; }}
{servers}
}}
"""

    def _server(self, variant: str) -> str:
        readonly = (f'if ($http_authorization = "ApiKey {self.readonly_key}") '
                    '{ return 403 \'{"error":"forbidden"}\'; }')
        return f"""    server {{
        listen 127.0.0.1:{self.ports[variant]} ssl;
        server_name localhost;
        ssl_certificate {self.certs.cert(variant)};
        ssl_certificate_key {self.certs.key(variant)};
        ssl_protocols TLSv1.2 TLSv1.3;
        location /_bulk {{ {readonly} {self._proxy()} }}
        location / {{ {self._proxy()} }}
    }}"""

    def _proxy(self) -> str:
        return f"""
            if ($http_authorization != "ApiKey {self.api_key}") {{ return 401 '{{"error":"unauthorized"}}'; }}
            limit_req zone=push;
            add_header Retry-After $retry_after always;
            proxy_pass http://cluster;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
"""
