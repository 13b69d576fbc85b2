"""A private PostgreSQL server for tests that restart it: never the machine's own.

initdb / pg_ctl from /usr/lib/postgresql/<version>/bin in a temp dir, on its own port on
127.0.0.1, trust authentication. PostgreSQL refuses to run as root, so as root the
commands run as the `postgres` user.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.proc import free_port


def pg_bin() -> Path | None:
    """The newest installed server's bin directory, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


@dataclass
class PrivateServer:
    bin_dir: Path
    data_dir: Path
    port: int
    user: str | None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def _pg_ctl(self, action: str, *extra: str) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data_dir}"
        self._run(
            "pg_ctl", action, "-D", str(self.data_dir), "-w", "-t", "30",
            "-l", str(self.data_dir / "server.log"), "-o", options, *extra,
        )  # fmt: skip

    async def start(self) -> None:
        await asyncio.to_thread(self._pg_ctl, "start")

    async def stop(self, *, mode: str = "fast") -> None:
        await asyncio.to_thread(self._pg_ctl, "stop", "-m", mode)

    async def restart(self, *, mode: str = "immediate") -> None:
        """Stop (immediate: as a crash would) and start again."""
        await self.stop(mode=mode)
        await self.start()


@contextlib.asynccontextmanager
async def private_server() -> AsyncIterator[PrivateServer]:
    bin_dir = pg_bin()
    if bin_dir is None:
        raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql")
    root = Path(tempfile.mkdtemp(prefix="campaign-private-pg-"))
    data_dir = root / "data"
    user = None
    if os.geteuid() == 0:
        user = "postgres"
        info = pwd.getpwnam(user)
        os.chown(root, info.pw_uid, info.pw_gid)
    server = PrivateServer(bin_dir=bin_dir, data_dir=data_dir, port=free_port(), user=user)
    try:
        await asyncio.to_thread(
            server._run, "initdb", "-D", str(data_dir), "-A", "trust", "-U", "postgres", "-N"
        )
        await server.start()
        try:
            yield server
        finally:
            with contextlib.suppress(subprocess.CalledProcessError):
                await server.stop(mode="immediate")
    finally:
        shutil.rmtree(root, ignore_errors=True)
