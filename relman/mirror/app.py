"""The mirror's aiohttp application, and functions to run it in-process."""

from __future__ import annotations

import logging
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

from relman.cas.errors import InputError
from relman.cas.repository import Repository
from relman.mirror import api, static

logger = logging.getLogger(__name__)

# Seconds that requests still running at shutdown get to finish, such as a
# large blob download, before their connections are closed.
SHUTDOWN_TIMEOUT = 10.0


def make_app(repository_root: str | Path) -> web.Application:
    """Build the mirror application for the repository at ``repository_root``.

    Raises:
        InputError: ``repository_root`` is not a relman repository.
    """
    repository = open_repository(repository_root)
    app = web.Application(middlewares=[_log_errors])
    app.router.add_get("/healthz", _health)
    api.add_routes(app, repository)
    # The file route matches every path, so it comes last.
    static.add_routes(app, repository.root)
    return app


def open_repository(repository_root: str | Path) -> Repository:
    """Open the repository to serve, raising InputError that names the path.

    Raises:
        InputError: ``repository_root`` is not a readable relman repository.
    """
    try:
        return Repository.open(repository_root)
    except OSError as error:
        # Repository.open turns only a missing config.json into InputError. This
        # covers a path that is a file (ENOTDIR) or cannot be read (EACCES).
        raise InputError(
            f"cannot open repository {str(repository_root)!r}: "
            f"{error.strerror or error}. Pass the path of a repository folder"
        ) from error


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, headers={"Cache-Control": "no-cache"})


@web.middleware
async def _log_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception:
        logger.exception("%s %s failed", request.method, request.path)
        # Once body bytes are on the wire another response cannot follow, so
        # aiohttp closes the connection instead.
        if request.writer.output_size > 0:
            raise
        body = {"error": "internal server error", "path": request.path}
        return web.json_response(body, status=500)


async def start_mirror(
    repository_root: str | Path, host: str, port: int
) -> tuple[web.AppRunner, int]:
    """Start serving a repository over HTTP in the running event loop.

    Args:
        repository_root: the repository folder.
        host: the address to listen on, such as 127.0.0.1 or ::1.
        port: the TCP port, or 0 for a free one.

    Returns:
        The runner, to pass to ``stop_mirror``, and the port it listens on.
        NOTE: with port 0 and a host name that resolves to several addresses,
        each address gets its own free port, and the first one is returned.

    Raises:
        InputError: the folder is not a repository, or the address is unusable.
    """
    app = make_app(repository_root)
    runner = web.AppRunner(app, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()

    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as error:
        await runner.cleanup()
        raise InputError(
            f"cannot listen on {host} port {port}: {error.strerror or error}. "
            "Check --host, and choose another --port or 0 for a free one"
        ) from error

    bound_port = runner.addresses[0][1]
    logger.info(
        "mirror of %s started on %s", repository_root, mirror_url(host, bound_port)
    )
    return runner, bound_port


async def stop_mirror(runner: web.AppRunner) -> None:
    """Stop a mirror started with ``start_mirror`` and release its port."""
    urls = [mirror_url(address[0], address[1]) for address in runner.addresses]
    await runner.cleanup()
    logger.info("mirror stopped on %s", ", ".join(urls))


def mirror_url(host: str, port: int) -> str:
    """Return the base URL for ``host`` and ``port``, with an IPv6 host in brackets."""
    if ":" in host:
        return f"http://[{host}]:{port}"
    return f"http://{host}:{port}"
