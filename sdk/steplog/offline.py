"""The run `Run.get_context()` returns outside a steplog job: it prints what
it would log, as Azure ML's offline run did, so a script runs unchanged."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from typing import Any


class OfflineRun:
    """Accepts every logging call and prints it; queries return nothing."""

    def __init__(self) -> None:
        self.id = f"OfflineRun_{uuid.uuid4()}"
        self.number = 0
        self.display_name = self.id
        self.status = "Running"
        self._tags: dict[str, str | None] = {}
        self._properties: dict[str, str] = {}

    def log(
        self, name: str, value: Any, description: str = "", step: int | None = None, **kwargs: Any
    ) -> None:
        at = "" if step is None else f" at step {step}"
        print(f"Attempted to log scalar metric {name}:\n{value}{at}")

    def log_list(self, name: str, value: Any, description: str = "", **kwargs: Any) -> None:
        print(f"Attempted to log list metric {name}:\n{list(value)}")

    def tag(self, key: str, value: str | None = None) -> None:
        self._tags[key] = value

    def set_tags(self, tags: Mapping[str, str | None] | str) -> None:
        self._tags.update({tags: None} if isinstance(tags, str) else tags)

    def get_tags(self) -> dict[str, str | None]:
        return dict(self._tags)

    def add_properties(self, properties: Mapping[str, str]) -> None:
        self._properties.update(properties)

    def get_properties(self) -> dict[str, str]:
        return dict(self._properties)

    def remove_tags(self, tags: Any) -> dict[str, str | None]:
        for key in [tags] if isinstance(tags, str) else list(tags):
            self._tags.pop(key, None)
        return dict(self._tags)

    def get_metrics(
        self,
        name: str | None = None,
        recursive: bool = False,
        run_type: str | None = None,
        populate: bool = False,
    ) -> dict[str, Any]:
        return {}

    def flush(self, timeout_seconds: float | None = 300, **kwargs: Any) -> bool:
        return True

    def new_stream(self, labels: Mapping[str, str] | None = None) -> OfflineRun:
        """Run.new_stream: here the same printer."""
        return self

    def complete(self, *args: Any, **kwargs: Any) -> None:
        self.status = "Completed"

    def fail(self, *args: Any, **kwargs: Any) -> None:
        self.status = "Failed"

    def get_status(self) -> str:
        return self.status

    def __enter__(self) -> OfflineRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.status = "Completed" if exc[0] is None else "Failed"

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name.startswith("log_") or name.startswith("upload_"):

            def printer(*args: Any, **kwargs: Any) -> None:
                print(f"Attempted to {name} {args[0] if args else ''}")

            return printer
        raise AttributeError(name)
