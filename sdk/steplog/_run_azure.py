"""Azure ML `Run` methods that belong to the rest of Azure ML (compute,
environments, secrets, code snapshots, the model registry, job submission),
as a part of steplog.Run: each raises NotApplicableError naming the steplog
way to do it, so a script fails at the call, with advice, not later."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from steplog import _azure

if TYPE_CHECKING:
    from steplog.run import Run


class AzureOnly:
    """steplog.Run's methods for what a run history does not hold."""

    def clean(self) -> list[str]:
        _azure.not_applicable(
            "Run.clean", "steplog has no compute targets; remove local files yourself."
        )

    def get_environment(self) -> Any:
        _azure.not_applicable(
            "Run.get_environment",
            "Record what you need as properties: run.add_properties({'python': ...}).",
        )

    def get_secret(self, name: str) -> str:
        _azure.not_applicable(
            "Run.get_secret", "Read secrets from your environment or secret manager."
        )

    def get_secrets(self, secrets: Sequence[str]) -> dict[str, Any]:
        _azure.not_applicable(
            "Run.get_secrets", "Read secrets from your environment or secret manager."
        )

    def get_snapshot_id(self) -> str:
        _azure.not_applicable(
            "Run.get_snapshot_id",
            "steplog keeps no code snapshots; store code with run.upload_folder('code', path).",
        )

    def restore_snapshot(self, snapshot_id: str | None = None, path: str | None = None) -> str:
        _azure.not_applicable(
            "Run.restore_snapshot",
            "steplog keeps no code snapshots; run.download_files(prefix='code/') restores "
            "files stored with upload_folder.",
        )

    def take_snapshot(self, file_or_folder_path: str) -> str:
        _azure.not_applicable(
            "Run.take_snapshot",
            "steplog keeps no code snapshots; run.upload_folder('code', path) stores the files.",
        )

    def register_model(
        self,
        model_name: str,
        model_path: str | None = None,
        tags: Any = None,
        properties: Any = None,
        model_framework: str | None = None,
        model_framework_version: str | None = None,
        description: str | None = None,
        datasets: Any = None,
        sample_input_dataset: Any = None,
        sample_output_dataset: Any = None,
        resource_configuration: Any = None,
        **kwargs: Any,
    ) -> Any:
        _azure.not_applicable(
            "Run.register_model",
            "steplog has no model registry; store the model with run.upload_file("
            "'outputs/model.pkl', path) and register it in your registry.",
        )

    def submit_child(self, config: Any, tags: Any = None, **kwargs: Any) -> Run:
        _azure.not_applicable(
            "Run.submit_child",
            "Create the child with run.child_run() and start the script yourself with "
            "STEPLOG_RUN_ID=<child id>: Run.get_context() in it attaches to the child.",
        )
