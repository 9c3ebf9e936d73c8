"""Every method of Azure ML's `Run` and `Experiment` documents (../shared/seeds:
the Run class, the Experiment class) has steplog's counterpart with the
documented parameters: the same names, in the same order, first (so a
positional call binds the same arguments), with the documented defaults.
steplog's own additions come after them or are keyword-only.

The table is copied from the documents' signatures. REQUIRED marks a
parameter without a documented default (steplog may still give one, as with
`Experiment(workspace=None, ...)` for its short form)."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from steplog import Experiment, Run

REQUIRED = object()
KWARGS = "**kwargs"  # the documented signature ends in **kwargs

Sig = list[tuple[str, Any]]

RUN: dict[str, Sig] = {
    "__init__": [("experiment", REQUIRED), ("run_id", REQUIRED), ("outputs", None), (KWARGS, 0)],
    "add_properties": [("properties", REQUIRED)],
    "add_type_provider": [("runtype", REQUIRED), ("run_factory", REQUIRED)],
    "cancel": [],
    "child_run": [("name", None), ("run_id", None), ("outputs", None)],
    "clean": [],
    "complete": [("_set_status", True)],
    "create_children": [("count", None), ("tag_key", None), ("tag_values", None)],
    "download_file": [
        ("name", REQUIRED),
        ("output_file_path", None),
        ("_validate_checksum", False),
    ],
    "download_files": [
        ("prefix", None),
        ("output_directory", None),
        ("output_paths", None),
        ("batch_size", 100),
        ("append_prefix", True),
        ("timeout_seconds", None),
    ],
    "fail": [("error_details", None), ("error_code", None), ("_set_status", True)],
    "flush": [("timeout_seconds", 300)],
    "get": [("workspace", REQUIRED), ("run_id", REQUIRED)],
    "get_all_logs": [("destination", None)],
    "get_children": [
        ("recursive", False),
        ("tags", None),
        ("properties", None),
        ("type", None),
        ("status", None),
        ("_rehydrate_runs", True),
    ],
    "get_context": [("allow_offline", True), ("used_for_context_manager", False), (KWARGS, 0)],
    "get_detailed_status": [],
    "get_details": [],
    "get_details_with_logs": [],
    "get_environment": [],
    "get_file_names": [],
    "get_metrics": [("name", None), ("recursive", False), ("run_type", None), ("populate", False)],
    "get_properties": [],
    "get_secret": [("name", REQUIRED)],
    "get_secrets": [("secrets", REQUIRED)],
    "get_snapshot_id": [],
    "get_status": [],
    "get_submitted_run": [(KWARGS, 0)],
    "get_tags": [],
    "list": [
        ("experiment", REQUIRED),
        ("type", None),
        ("tags", None),
        ("properties", None),
        ("status", None),
        ("include_children", False),
        ("_rehydrate_runs", True),
    ],
    "list_by_compute": [
        ("compute", REQUIRED),
        ("type", None),
        ("tags", None),
        ("properties", None),
        ("status", None),
    ],
    "log": [("name", REQUIRED), ("value", REQUIRED), ("description", ""), ("step", None)],
    "log_accuracy_table": [("name", REQUIRED), ("value", REQUIRED), ("description", "")],
    "log_confusion_matrix": [("name", REQUIRED), ("value", REQUIRED), ("description", "")],
    "log_image": [("name", REQUIRED), ("path", None), ("plot", None), ("description", "")],
    "log_list": [("name", REQUIRED), ("value", REQUIRED), ("description", "")],
    "log_predictions": [("name", REQUIRED), ("value", REQUIRED), ("description", "")],
    "log_residuals": [("name", REQUIRED), ("value", REQUIRED), ("description", "")],
    "log_row": [("name", REQUIRED), ("description", None), (KWARGS, 0)],
    "log_table": [("name", REQUIRED), ("value", REQUIRED), ("description", "")],
    "register_model": [
        ("model_name", REQUIRED),
        ("model_path", None),
        ("tags", None),
        ("properties", None),
        ("model_framework", None),
        ("model_framework_version", None),
        ("description", None),
        ("datasets", None),
        ("sample_input_dataset", None),
        ("sample_output_dataset", None),
        ("resource_configuration", None),
        (KWARGS, 0),
    ],
    "remove_tags": [("tags", REQUIRED)],
    "restore_snapshot": [("snapshot_id", None), ("path", None)],
    "set_tags": [("tags", REQUIRED)],
    "start": [],
    "submit_child": [("config", REQUIRED), ("tags", None), (KWARGS, 0)],
    "tag": [("key", REQUIRED), ("value", None)],
    "take_snapshot": [("file_or_folder_path", REQUIRED)],
    "upload_file": [("name", REQUIRED), ("path_or_stream", REQUIRED), ("datastore_name", None)],
    "upload_files": [
        ("names", REQUIRED),
        ("paths", REQUIRED),
        ("return_artifacts", False),
        ("timeout_seconds", None),
        ("datastore_name", None),
    ],
    "upload_folder": [("name", REQUIRED), ("path", REQUIRED), ("datastore_name", None)],
    "wait_for_completion": [
        ("show_output", False),
        ("wait_post_processing", False),
        ("raise_on_error", True),
    ],
}

# The documented attributes of Run.
RUN_ATTRIBUTES = [
    "description",
    "display_name",
    "experiment",
    "id",
    "name",
    "number",
    "parent",
    "properties",
    "status",
    "tags",
    "type",
]

EXPERIMENT: dict[str, Sig] = {
    "__init__": [
        ("workspace", REQUIRED),
        ("name", REQUIRED),
        ("_skip_name_validation", False),
        ("_id", None),
        ("_archived_time", None),
        ("_create_in_cloud", True),
        ("_experiment_dto", None),
        (KWARGS, 0),
    ],
    "archive": [],
    "delete": [("workspace", REQUIRED), ("experiment_id", REQUIRED)],
    "from_directory": [("path", REQUIRED), ("auth", None)],
    "get_docs_url": [],
    "get_runs": [("type", None), ("tags", None), ("properties", None), ("include_children", False)],
    "list": [
        ("workspace", REQUIRED),
        ("experiment_name", None),
        ("view_type", "ActiveOnly"),
        ("tags", None),
    ],
    "reactivate": [("new_name", None)],
    "refresh": [],
    "remove_tags": [("tags", REQUIRED)],
    "set_tags": [("tags", REQUIRED)],
    # start_logging(*args, **kwargs); its documented parameters:
    "start_logging": [("outputs", None), ("snapshot_directory", None), (KWARGS, 0)],
    "submit": [("config", REQUIRED), ("tags", None), (KWARGS, 0)],
    "tag": [("key", REQUIRED), ("value", None)],
}

POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _check(cls: type, method: str, documented: Sig) -> None:
    params = [
        p for p in inspect.signature(getattr(cls, method)).parameters.values() if p.name != "self"
    ]
    positional = [p for p in params if p.kind in POSITIONAL]
    wanted = [(n, d) for n, d in documented if n != KWARGS]
    got = [p.name for p in positional[: len(wanted)]]
    assert got == [n for n, _ in wanted], (
        f"{cls.__name__}.{method}: documented positional parameters "
        f"{[n for n, _ in wanted]}, steplog has {[p.name for p in positional]}"
    )
    for (name, default), p in zip(wanted, positional, strict=False):
        if default is not REQUIRED:
            assert p.default == default, (
                f"{cls.__name__}.{method}({name}=...): documented default {default!r}, "
                f"steplog {p.default!r}"
            )
    if any(n == KWARGS for n, _ in documented):
        assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params), (
            f"{cls.__name__}.{method} must accept **kwargs as documented"
        )


@pytest.mark.parametrize("method", sorted(RUN))
def test_run_signature(method: str) -> None:
    _check(Run, method, RUN[method])


@pytest.mark.parametrize("method", sorted(EXPERIMENT))
def test_experiment_signature(method: str) -> None:
    _check(Experiment, method, EXPERIMENT[method])


@pytest.mark.parametrize("name", RUN_ATTRIBUTES)
def test_run_attribute(name: str) -> None:
    assert isinstance(inspect.getattr_static(Run, name), property)


def test_static_methods_are_static() -> None:
    for cls, names in (
        (Run, ["add_type_provider", "get", "list", "list_by_compute", "get_context"]),
        (Experiment, ["delete", "from_directory", "list"]),
    ):
        for name in names:
            assert isinstance(inspect.getattr_static(cls, name), (staticmethod, classmethod)), name


def test_table_covers_the_documented_method_lists() -> None:
    """The methods the documents' tables of contents list, all in the table."""
    run_listed = [
        "add_properties",
        "add_type_provider",
        "cancel",
        "child_run",
        "clean",
        "complete",
        "create_children",
        "download_file",
        "download_files",
        "fail",
        "flush",
        "get",
        "get_all_logs",
        "get_children",
        "get_context",
        "get_detailed_status",
        "get_details",
        "get_details_with_logs",
        "get_environment",
        "get_file_names",
        "get_metrics",
        "get_properties",
        "get_secret",
        "get_secrets",
        "get_snapshot_id",
        "get_status",
        "get_submitted_run",
        "get_tags",
        "list",
        "list_by_compute",
        "log",
        "log_accuracy_table",
        "log_confusion_matrix",
        "log_image",
        "log_list",
        "log_predictions",
        "log_residuals",
        "log_row",
        "log_table",
        "register_model",
        "remove_tags",
        "restore_snapshot",
        "set_tags",
        "start",
        "submit_child",
        "tag",
        "take_snapshot",
        "upload_file",
        "upload_files",
        "upload_folder",
        "wait_for_completion",
    ]
    experiment_listed = [
        "archive",
        "delete",
        "from_directory",
        "get_docs_url",
        "get_runs",
        "list",
        "reactivate",
        "refresh",
        "remove_tags",
        "set_tags",
        "start_logging",
        "submit",
        "tag",
    ]
    assert sorted(set(RUN) - {"__init__"}) == sorted(run_listed)
    assert sorted(set(EXPERIMENT) - {"__init__"}) == sorted(experiment_listed)
