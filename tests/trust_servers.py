"""Real trust services on 127.0.0.1 for tests: an RFC 3161 TSA and an OCSP responder.

The TSA is ``openssl ts -reply`` behind a small HTTP handler; the OCSP
responder is ``openssl ocsp`` itself.
"""

from __future__ import annotations

import http.server
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

TSA_CONFIG = """\
[ tsa ]
default_tsa = tsa_config

[ tsa_config ]
dir = {folder}
serial = {folder}/tsaserial
crypto_device = builtin
signer_digest = sha256
default_policy = 1.2.3.4.1
digests = sha256, sha384, sha512
accuracy = secs:1
ordering = yes
tsa_name = no
ess_cert_id_chain = no
ess_cert_id_alg = sha256
"""


class TimestampAuthority:
    """``openssl ts -reply`` serving POSTs of timestamp queries on a free port."""

    def __init__(self, folder: Path, certificate: Path, key: Path):
        self.folder = folder
        self.certificate = certificate
        self.key = key
        self.requests = 0
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tsa.cnf").write_text(TSA_CONFIG.format(folder=folder))
        (folder / "tsaserial").write_text("01\n")
        authority = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server interface
                length = int(self.headers.get("Content-Length", "0"))
                reply = authority.reply(self.rfile.read(length))
                self.send_response(200)
                self.send_header("Content-Type", "application/timestamp-reply")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *arguments: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def reply(self, query: bytes) -> bytes:
        """Run openssl ts -reply on one query and return the TimeStampResp."""
        self.requests += 1
        with tempfile.TemporaryDirectory(dir=self.folder) as work:
            query_path = Path(work) / "query.tsq"
            reply_path = Path(work) / "reply.tsr"
            query_path.write_bytes(query)
            subprocess.run(
                [
                    "openssl",
                    "ts",
                    "-reply",
                    "-config",
                    str(self.folder / "tsa.cnf"),
                    "-queryfile",
                    str(query_path),
                    "-signer",
                    str(self.certificate),
                    "-inkey",
                    str(self.key),
                    "-out",
                    str(reply_path),
                ],
                check=True,
                capture_output=True,
            )
            return reply_path.read_bytes()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class OcspResponder:
    """``openssl ocsp`` serving an index file on a free port, asked on 127.0.0.1."""

    def __init__(self, index: Path, ca: Path, signer: Path, key: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [
                "openssl",
                "ocsp",
                "-index",
                str(index),
                "-CA",
                str(ca),
                "-rsigner",
                str(signer),
                "-rkey",
                str(key),
                # openssl 3.0 takes only a port number here; clients reach it on 127.0.0.1.
                "-port",
                str(self.port),
                "-ignore_err",
                "-ndays",
                "1",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        # Wait for its "ACCEPT" line: a probe connection would block this
        # single-threaded responder until the probe's request arrived.
        line = self.process.stdout.readline()
        if not line.startswith("ACCEPT"):
            self.stop()
            raise AssertionError(f"openssl ocsp did not start listening: {line!r}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
