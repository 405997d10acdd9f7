"""Helpers for the test suite: running the CLI, building releases, a cutting TCP relay."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

RELMAN = [sys.executable, "-m", "relman"]


def relman(
    *args: str | os.PathLike, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run the real ``relman`` command; with ``check``, fail the test on a non-zero exit."""
    completed = subprocess.run(
        [*RELMAN, *map(str, args)], capture_output=True, text=True, timeout=timeout
    )
    if check and completed.returncode != 0:
        raise AssertionError(
            f"relman {' '.join(map(str, args))} exited {completed.returncode}\n"
            f"stdout: {completed.stdout}\nstderr: {completed.stderr}"
        )
    return completed


def relman_publish(
    repo: Path,
    manifest: Path,
    tree: Path,
    *options: str | os.PathLike,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run ``relman publish`` of ``manifest`` and ``tree`` into ``repo`` with ``options``."""
    return relman(
        "publish",
        "--repo",
        repo,
        "--manifest",
        manifest,
        "--release-dir",
        tree,
        *options,
        check=check,
    )


def relman_sign(manifest: Path, pki: Path, *extra: str | os.PathLike) -> None:
    """Sign ``manifest`` with the signer of a ``relman pki init`` folder."""
    relman(
        "sign",
        "--manifest",
        manifest,
        "--key",
        pki / "signer.key",
        "--cert",
        pki / "signer.pem",
        *extra,
    )


def openssl(
    *args: str | os.PathLike, check: bool = False
) -> subprocess.CompletedProcess:
    """Run the real openssl command; with ``check``, fail the test on a non-zero exit."""
    completed = subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True
    )
    if check and completed.returncode != 0:
        raise AssertionError(
            f"openssl {' '.join(map(str, args))} failed: {completed.stderr}"
        )
    return completed


def openssl_sign(
    content: Path,
    cert: Path,
    key: Path,
    *extra: str | os.PathLike,
    output: Path | None = None,
    outform: str = "DER",
    check: bool = False,
) -> subprocess.CompletedProcess:
    """Sign ``content`` with ``openssl cms -sign -binary`` into ``output`` (default: content.sig)."""
    return openssl(
        "cms",
        "-sign",
        "-binary",
        "-in",
        content,
        "-signer",
        cert,
        "-inkey",
        key,
        "-outform",
        outform,
        "-out",
        output or f"{content}.sig",
        *extra,
        check=check,
    )


def openssl_verify(
    signature: Path | str, content: Path, ca: Path
) -> subprocess.CompletedProcess:
    """Verify a detached DER signature with ``openssl cms -verify``, any purpose allowed.

    OpenSSL 3.0 checks the S/MIME signing purpose by default, which a
    code-signing certificate lacks, hence ``-purpose any``.
    """
    return openssl(
        "cms",
        "-verify",
        "-binary",
        "-inform",
        "DER",
        "-in",
        signature,
        "-content",
        content,
        "-CAfile",
        ca,
        "-purpose",
        "any",
        "-out",
        "/dev/null",
    )


def make_release_tree(
    root: Path, big_size: int = 3 * 1024 * 1024, seed: int = 1
) -> Path:
    """Write a small release: an ELF binary, a script, a library, config, data, a symlink."""
    (root / "bin").mkdir(parents=True)
    (root / "lib").mkdir()
    (root / "etc").mkdir()
    (root / "share" / "data").mkdir(parents=True)
    shutil.copyfile("/bin/true", root / "bin" / "server")
    os.chmod(root / "bin" / "server", 0o755)
    (root / "bin" / "start.sh").write_text("#!/bin/sh\nexec ./server\n")
    os.chmod(root / "bin" / "start.sh", 0o750)
    (root / "lib" / "libdemo.so.1").write_bytes(
        b"\x7fELF" + b"\x02\x01\x01" + bytes(9) + b"\x03\x00\x3e\x00" + bytes(44)
    )
    os.symlink("libdemo.so.1", root / "lib" / "libdemo.so")
    (root / "etc" / "app.conf").write_text("port = 8080\n")
    (root / "share" / "data" / "notes.txt").write_text("same in every release\n")
    (root / "share" / "data" / "big.bin").write_bytes(_pseudo_random(big_size, seed))
    (root / "empty.dat").write_bytes(b"")
    return root


def _pseudo_random(size: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(size)


@dataclass
class Published:
    """A repository with signed releases, and the files that made it."""

    pki: Path
    repo: Path
    trees: dict[str, Path]

    @property
    def ca(self) -> Path:
        return self.pki / "ca.pem"


def publish_version(
    work: Path,
    pki: Path,
    repo: Path,
    version: str,
    tree: Path,
    key: Path | None = None,
    cert: Path | None = None,
    trust: Path | None = None,
) -> Path:
    """Generate, sign and publish ``tree`` as ``version``; return the manifest path.

    The signer and trust roots default to the ``relman pki init`` files in ``pki``.
    """
    manifest = work / f"manifest-{version}.json"
    relman(
        "generate", "--version", version, "--release-dir", tree, "--output", manifest
    )
    relman(
        "sign",
        "--manifest",
        manifest,
        "--key",
        key or pki / "signer.key",
        "--cert",
        cert or pki / "signer.pem",
    )
    relman_publish(repo, manifest, tree, "--trust", trust or pki / "ca.pem")
    return manifest


@dataclass
class Reply:
    """One HTTP response, read whole."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


class MirrorProcess:
    """A real ``relman serve`` subprocess on 127.0.0.1 and a free port.

    Its stderr goes to a file in ``log_folder`` (a new temporary folder by
    default), so a busy server never blocks on a full pipe.
    """

    def __init__(self, repo: Path, log_folder: Path | None = None, *flags: str):
        folder = Path(log_folder or tempfile.mkdtemp(prefix="relman-serve-"))
        self.stderr_path = folder / f"serve-{len(list(folder.glob('serve-*')))}.log"
        with open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(
                [
                    *RELMAN,
                    *flags,
                    "serve",
                    "--repo",
                    str(repo),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "0",
                ],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        line = self.process.stdout.readline()
        match = re.fullmatch(
            rf"serving {re.escape(str(repo))} on http://127\.0\.0\.1:(\d+)\n", line
        )
        if not match:
            self.stop()
            raise AssertionError(f"serve printed {line!r}, stderr: {self.stderr()}")
        self.port = int(match.group(1))
        self.url = f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def request(
        self, path: str, method: str = "GET", headers: dict[str, str] | None = None
    ) -> Reply:
        """Send one request with the path exactly as given, no normalisation."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(method, path, headers=headers or {})
            response = connection.getresponse()
            return Reply(response.status, response.headers, response.read())
        finally:
            connection.close()

    def stop(self) -> None:
        """Stop the server with SIGTERM, or SIGKILL after 10 seconds."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


@dataclass
class RelayProxy:
    """A TCP relay on 127.0.0.1 in front of a server, which can cut or slow responses.

    ``cut_after`` closes the first ``cut_connections`` connections that carry
    a blob after that many response bytes. Every byte relayed is counted.
    """

    upstream_port: int
    cut_after: int | None = None
    cut_connections: int = 1
    delay_per_chunk: float = 0.0
    response_bytes: int = 0
    requests: list[bytes] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0)
        )
        self.port = server.sockets[0].getsockname()[1]
        self._server = server
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, client_reader, client_writer) -> None:  # noqa: ANN001
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", self.upstream_port
        )
        state = {"blob": False}

        async def upstream_direction() -> None:
            while data := await client_reader.read(65536):
                self.requests.append(data)
                if b"GET /objects/" in data:
                    state["blob"] = True
                upstream_writer.write(data)
                await upstream_writer.drain()
            upstream_writer.close()

        async def client_direction() -> None:
            sent = 0
            cut = False
            while data := await upstream_reader.read(16384):
                if (
                    state["blob"]
                    and self.cut_after is not None
                    and self.cut_connections > 0
                ):
                    room = self.cut_after - sent
                    if room <= len(data):
                        data = data[: max(room, 0)]
                        cut = True
                sent += len(data)
                self.response_bytes += len(data)
                client_writer.write(data)
                await client_writer.drain()
                if self.delay_per_chunk:
                    await asyncio.sleep(self.delay_per_chunk)
                if cut:
                    self.cut_connections -= 1
                    break
            client_writer.close()
            upstream_writer.close()

        await asyncio.gather(
            upstream_direction(), client_direction(), return_exceptions=True
        )

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def wait_for(condition, timeout: float = 30, interval: float = 0.02) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def tree_snapshot(root: Path) -> dict[str, tuple]:
    """Describe every entry below ``root``: kind, mode, size, link target, inode."""
    result = {}
    if not root.exists():
        return result
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        target = os.readlink(path) if path.is_symlink() else None
        result[str(path.relative_to(root))] = (
            info.st_mode,
            info.st_size,
            target,
            info.st_ino,
        )
    return result
