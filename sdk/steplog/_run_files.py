"""The files of a run (Azure ML's `upload_file(s)`, `upload_folder`,
`download_file(s)`, `get_file_names`, `get_all_logs`), as a part of
steplog.Run: the transfers themselves are steplog._uploads."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from steplog import _azure
from steplog.errors import FailedPreconditionError, InvalidArgumentError

if TYPE_CHECKING:
    from steplog.client import Client


def _datastore(method: str, datastore_name: str | None) -> None:
    if datastore_name is not None:
        _azure.ignored(method, "datastore_name", "steplog stores run files in its one object store")


class RunFiles:
    """steplog.Run's file methods; the run gives its client and id."""

    _client: Client

    @property
    def id(self) -> str:
        raise NotImplementedError  # steplog.Run.id

    def upload_file(
        self,
        name: str,
        path_or_stream: Any,
        datastore_name: str | None = None,
        *,
        overwrite: bool = False,
        wait: bool = True,
        timeout: float | None = None,
        show_progress: bool | None = None,
    ) -> Any:
        """Store a file of this run under `name`, a relative path such as
        "outputs/model.pt", from a file path, bytes or a binary stream.

        Waits until the file is stored and returns its `Upload` (`.result()`
        is its FileInfo); with wait=False returns at once and uploads in the
        background. Retries while the service or its storage is unavailable
        (up to `timeout`); AlreadyExistsError when `name` holds other
        content, unless overwrite. `datastore_name` is ignored (steplog has
        one object store)."""
        _datastore("Run.upload_file", datastore_name)
        return self._upload([name], [path_or_stream], overwrite, wait, timeout, show_progress)[0]

    def upload_files(
        self,
        names: Sequence[str],
        paths: Sequence[Any],
        return_artifacts: bool = False,
        timeout_seconds: float | None = None,
        datastore_name: str | None = None,
        *,
        overwrite: bool = False,
        wait: bool = True,
        timeout: float | None = None,
        show_progress: bool | None = None,
    ) -> list[Any]:
        """Upload several files at once (names[i] from paths[i]), in parallel.
        Returns their `Upload`s; with return_artifacts, the stored files'
        `FileInfo`s (name, size, sha256, content type) instead. The wait is
        bounded by timeout_seconds (or `timeout`)."""
        if len(names) != len(paths):
            raise InvalidArgumentError(
                f"{len(names)} names for {len(paths)} paths; they must pair up", field="names"
            )
        _datastore("Run.upload_files", datastore_name)
        limit = timeout_seconds if timeout_seconds is not None else timeout
        uploads = self._upload(
            names, paths, overwrite, wait or return_artifacts, limit, show_progress
        )
        if return_artifacts:
            return [u.result() for u in uploads]
        return uploads

    def upload_folder(
        self,
        name: str,
        path: str | os.PathLike[str],
        datastore_name: str | None = None,
        *,
        overwrite: bool = False,
        wait: bool = True,
        timeout: float | None = None,
        show_progress: bool | None = None,
    ) -> list[Any]:
        """Upload every file under directory `path` as name/<relative path>
        (symbolic links to directories are not followed)."""
        from pathlib import Path

        _datastore("Run.upload_folder", datastore_name)
        root = Path(path)
        if not root.is_dir():
            raise NotADirectoryError(f"no directory at {root}")
        files = sorted(
            Path(d, f).relative_to(root).as_posix()
            for d, _, fs in os.walk(root, followlinks=False)
            for f in fs
            if Path(d, f).is_file()
        )
        prefix = name.strip("/")
        names = [f"{prefix}/{f}" if prefix else f for f in files]
        return self._upload(
            names, [root / f for f in files], overwrite, wait, timeout, show_progress
        )

    def _upload(
        self,
        names: Sequence[str],
        sources: Sequence[Any],
        overwrite: bool,
        wait: bool,
        timeout: float | None,
        show_progress: bool | None,
    ) -> list[Any]:
        from steplog._uploads import upload_many

        if self._client.writer.settings.offline:
            raise FailedPreconditionError("files cannot be uploaded offline", field="name")
        return list(
            upload_many(
                self._client,
                self.id,
                list(names),
                list(sources),
                overwrite=overwrite,
                wait=wait,
                timeout=timeout,
                show_progress=show_progress,
                desc="upload",
            )
        )

    def download_file(
        self,
        name: str,
        output_file_path: str | os.PathLike[str] | None = None,
        _validate_checksum: bool = False,
        *,
        timeout: float | None = None,
    ) -> str:
        """Download file `name` to output_file_path (default: its base name in
        the current directory; into it when it is a directory). The file
        appears only once complete and checked against its SHA-256.
        NotFoundError when the run has no such file. Returns the local path."""
        from pathlib import Path, PurePosixPath

        from steplog._uploads import check_name, download

        base = PurePosixPath(check_name(name)).name
        target = Path(output_file_path) if output_file_path is not None else Path(base)
        if target.is_dir():
            target = target / base
        download(self._client, self.id, name, target, timeout=timeout)
        return str(target)

    def download_files(
        self,
        prefix: str | None = None,
        output_directory: str | os.PathLike[str] | None = None,
        output_paths: Sequence[str | os.PathLike[str]] | None = None,
        batch_size: int = 100,
        append_prefix: bool = True,
        timeout_seconds: float | None = None,
        *,
        show_progress: bool | None = None,
    ) -> list[str]:
        """Download the files whose names start with `prefix` (all without one)
        into output_directory (default: the current directory), keeping their
        relative paths; with append_prefix=False the prefix is cut from them.
        `output_paths`: one local path per file instead (in the order of
        get_file_names(), unique, as many as there are files). At most
        `batch_size` downloads run at once; `timeout_seconds` bounds each
        file's retries. Returns the local paths."""
        from concurrent.futures import ThreadPoolExecutor
        from pathlib import Path, PurePosixPath

        from steplog._uploads import WORKERS, Progress, download, inside, list_files

        if batch_size < 1:
            raise InvalidArgumentError("batch_size must be >= 1", field="batch_size")
        files = list_files(self._client, self.id, prefix or "")
        base = Path(output_directory) if output_directory is not None else Path.cwd()
        targets: list[Path] = []
        if output_paths is not None:
            wanted = [Path(p) for p in output_paths]
            if len(wanted) != len(files):
                raise InvalidArgumentError(
                    f"{len(wanted)} output_paths for {len(files)} files", field="output_paths"
                )
            if len(set(wanted)) != len(wanted):
                raise InvalidArgumentError("output_paths must be unique", field="output_paths")
            targets = [base / p if output_directory is not None else p for p in wanted]
        else:
            for f in files:
                relative = f.path
                if prefix and not append_prefix:
                    relative = relative[len(prefix) :].lstrip("/") or PurePosixPath(f.path).name
                targets.append(inside(base, relative))
        progress = Progress(sum(f.size for f in files), len(files), "download", show_progress)
        try:
            with ThreadPoolExecutor(max(1, min(WORKERS, batch_size))) as pool:
                list(
                    pool.map(
                        lambda ft: download(
                            self._client,
                            self.id,
                            ft[0].path,
                            ft[1],
                            progress,
                            timeout=timeout_seconds,
                        ),
                        zip(files, targets, strict=True),
                    )
                )
        finally:
            progress.close()
        return [str(t) for t in targets]

    def get_all_logs(self, destination: str | os.PathLike[str] | None = None) -> list[str]:
        """steplog captures no driver logs; the run's files under "logs/" (where
        Azure ML kept them) are downloaded into `destination` (default: a
        directory named after the run id). Returns the local paths."""
        from pathlib import Path

        target = Path(destination) if destination is not None else Path(self.id)
        target.mkdir(parents=True, exist_ok=True)
        return self.download_files(prefix="logs/", output_directory=target)

    def get_file_names(self) -> list[str]:
        """The names of this run's files, sorted."""
        from steplog._uploads import list_files

        return [f.path for f in list_files(self._client, self.id)]
