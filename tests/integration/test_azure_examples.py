"""The examples of Azure ML's `Run` and `Experiment` documents and of the "log
metrics" how-to (../shared/seeds), ported literally with only the import
changed (`from azureml.core import ...` -> `from steplog import ...`), each
asserting the outcome the documents give. Against the real service.

Where an example needs something outside a run history (submit, a model
registry, sklearn), that line is ported as is and asserted to raise the
documented NotApplicableError, or the data is made with numpy.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from steplog import Experiment, Run, Workspace, _azure
from steplog.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotApplicableError,
    NotFoundError,
)
from tests import imagegen
from tests.support import ROOT


@pytest.fixture
def ws(url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Workspace:
    """`ws = Workspace.from_config()`: the service comes from STEPLOG_URL."""
    monkeypatch.setenv("STEPLOG_URL", url)
    monkeypatch.delenv("STEPLOG_WORKSPACE", raising=False)
    monkeypatch.delenv("STEPLOG_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    return Workspace.from_config()


@pytest.fixture
def experiment(ws: Workspace, experiment_name: str) -> Experiment:
    return Experiment(ws, experiment_name)


# -- Run: the overview's metric kinds -------------------------------------------------------------


def test_overview_metric_kinds(experiment: Experiment, tmp_path: Path) -> None:
    path = tmp_path / "roc.png"
    path.write_bytes(imagegen.png(4, 4, seed=3))
    run = experiment.start_logging()
    run.log("accuracy", 0.95)
    run.log_list("accuracies", [0.6, 0.7, 0.87])
    run.log_row("Y over X", x=1, y=0.4)
    run.log_table("Y over X", {"x": [1, 2, 3], "y": [0.6, 0.7, 0.89]})
    run.log_image("ROC", str(path))
    run.complete()
    metrics = run.get_metrics()
    assert metrics["accuracy"] == 0.95
    assert metrics["accuracies"] == [0.6, 0.7, 0.87]
    assert metrics["Y over X"] == {"x": [1, 1, 2, 3], "y": [0.4, 0.6, 0.7, 0.89]}
    assert "ROC" in metrics
    assert run.rejections() == []


# -- Run.get_context ------------------------------------------------------------------------------


def test_get_context_example(experiment: Experiment, monkeypatch: pytest.MonkeyPatch) -> None:
    owner = experiment.start_logging()
    monkeypatch.setenv("STEPLOG_RUN_ID", owner.id)
    run = Run.get_context()  # allow_offline=True by default, so can be run locally as well
    for e, err in enumerate([0.5, 0.25]):
        run.log("Accuracy", 0.98)
        run.log_row("Performance", epoch=e, error=err)
    metrics = run.get_metrics()
    assert metrics["Accuracy"] == [0.98, 0.98]
    assert metrics["Performance"] == {"epoch": [0, 1], "error": [0.5, 0.25]}


def test_get_context_used_for_context_manager(
    experiment: Experiment, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = experiment.start_logging()
    monkeypatch.setenv("STEPLOG_RUN_ID", owner.id)
    with Run.get_context(used_for_context_manager=True) as run:
        run.log("loss", 1.0)
    # The attached process flushed; the owner finishes the run.
    assert owner.get_status() == "Running"
    assert owner.get_metrics() == {"loss": 1.0}
    monkeypatch.delenv("STEPLOG_RUN_ID")
    offline = Run.get_context()
    offline.log("x", 1)
    assert offline.get_metrics() == {}


# -- Run.get_detailed_status, get_details, get_status ---------------------------------------------


def test_get_detailed_status_example(experiment: Experiment) -> None:
    with pytest.raises(NotApplicableError, match="STEPLOG_RUN_ID"):
        run = experiment.submit(object())
    run = experiment.start_logging()
    details = run.get_detailed_status()
    assert details == {"status": "Running"}
    run.cancel()
    assert run.get_detailed_status() == {"status": "Canceled"}


def test_get_details_example(experiment: Experiment, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEPLOG_SUBMITTED_BY", "Alan Turing")
    run = experiment.start_logging()

    details = run.get_details()
    assert details["runId"] == run.id
    assert details["status"] == "Running"
    assert details["startTimeUtc"].endswith("Z")
    assert "endTimeUtc" not in details  # absent while the run is in progress
    for key in ("target", "properties", "inputDatasets", "outputDatasets", "logFiles"):
        assert key in details
    assert details["target"] == "sdk"
    assert "runDefinition" in details and details["submittedBy"] == "Alan Turing"
    run.complete()
    assert run.get_details()["endTimeUtc"].endswith("Z")
    assert run.get_details_with_logs()["logFiles"] == {}


def test_get_status_example(experiment: Experiment) -> None:
    with pytest.raises(NotApplicableError):
        run = experiment.submit(object())
    run = experiment.start_logging()
    run.complete()
    deadline = time.monotonic() + 10
    while run.get_status() not in ["Completed", "Failed"]:  # For example purposes only
        print(f"Run {run.id} not in terminal state")
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert run.get_status() == "Completed"


# -- Run.get_metrics ------------------------------------------------------------------------------


def test_get_metrics_example(experiment: Experiment) -> None:
    run = experiment.start_logging()  # run id: 123
    run.log("A", 1)
    with run.child_run() as child:  # run id: 456
        child.log("A", 2)

    metrics = run.get_metrics()
    assert metrics == {"A": 1}

    metrics = run.get_metrics(recursive=True)
    assert metrics == {run.id: {"A": 1}, child.id: {"A": 2}}  # note key is runId


def test_get_metrics_run_type_and_populate(experiment: Experiment) -> None:
    run = experiment.start_logging(run_type="sweep")
    run.log("A", 1)
    with run.child_run(run_type="trial") as child:
        child.log("A", 2)
    assert run.get_metrics(recursive=True, run_type="trial") == {child.id: {"A": 2}}
    assert run.get_metrics(run_type="trial") == {}
    assert run.get_metrics(run_type="sweep", populate=True) == {"A": 1}


# -- Run.list, get_children, get_runs -------------------------------------------------------------


def test_run_list_example(experiment: Experiment) -> None:
    done = experiment.start_logging()
    done.tag("favorite")
    done.child_run().complete()
    done.complete()
    other = experiment.start_logging()

    favorite_completed_runs = Run.list(experiment, status="Completed", tags="favorite")

    all_distinct_runs = Run.list(experiment)
    and_their_children = Run.list(experiment, include_children=True)

    only_script_runs = Run.list(experiment, type="azureml.scriptrun")
    assert [r.id for r in favorite_completed_runs] == [done.id]
    assert {r.id for r in all_distinct_runs} == {done.id, other.id}
    assert len(and_their_children) == 3
    assert only_script_runs == []


def test_properties_filter_as_a_string(experiment: Experiment) -> None:
    parent = experiment.start_logging()
    staged = parent.child_run()
    staged.add_properties({"stage": "train"})
    parent.child_run()
    parent.add_properties({"stage": "all"})
    assert [c.id for c in parent.get_children(properties="stage")] == [staged.id]
    assert [c.id for c in parent.get_children(properties={"stage": "train"})] == [staged.id]
    assert [r.id for r in Run.list(experiment, properties="stage")] == [parent.id]
    assert [r.id for r in experiment.get_runs(properties="stage")] == [parent.id]
    assert len(list(experiment.get_runs(properties="stage", include_children=True))) == 2


# -- the evaluation documents, exactly as the documents give them ---------------------------------

ACCURACY_TABLE = {
    "schema_type": "accuracy_table",
    "schema_version": "1.0.1",
    "data": {
        "probability_tables": [
            [
                [82, 118, 0, 0],
                [75, 31, 87, 7],
                [66, 9, 109, 16],
                [46, 2, 116, 36],
                [0, 0, 118, 82],
            ],
            [
                [60, 140, 0, 0],
                [56, 20, 120, 4],
                [47, 4, 136, 13],
                [28, 0, 140, 32],
                [0, 0, 140, 60],
            ],
            [
                [58, 142, 0, 0],
                [53, 29, 113, 5],
                [40, 10, 132, 18],
                [24, 1, 141, 34],
                [0, 0, 142, 58],
            ],
        ],
        "percentile_tables": [
            [[82, 118, 0, 0], [82, 67, 51, 0], [75, 26, 92, 7], [48, 3, 115, 34], [3, 0, 118, 79]],
            [[60, 140, 0, 0], [60, 89, 51, 0], [60, 41, 99, 0], [46, 5, 135, 14], [3, 0, 140, 57]],
            [[58, 142, 0, 0], [56, 93, 49, 2], [54, 47, 95, 4], [41, 10, 132, 17], [3, 0, 142, 55]],
        ],
        "probability_thresholds": [0.0, 0.25, 0.5, 0.75, 1.0],
        "percentile_thresholds": [0.0, 0.01, 0.24, 0.98, 1.0],
        "class_labels": ["0", "1", "2"],
    },
}
CONFUSION_MATRIX = {
    "schema_type": "confusion_matrix",
    "schema_version": "1.0.0",
    "data": {
        "class_labels": ["0", "1", "2", "3"],
        "matrix": [[3, 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 1]],
    },
}
PREDICTIONS = {
    "schema_type": "predictions",
    "schema_version": "1.0.0",
    "data": {
        "bin_averages": [0.25, 0.75],
        "bin_errors": [0.013, 0.042],
        "bin_counts": [56, 34],
        "bin_edges": [0.0, 0.5, 1.0],
    },
}
RESIDUALS = {
    "schema_type": "residuals",
    "schema_version": "1.0.0",
    "data": {"bin_edges": [50, 100, 200, 300, 350], "bin_counts": [0.88, 20, 30, 50.99]},
}


def test_evaluation_document_examples(experiment: Experiment) -> None:
    run = experiment.start_logging()
    run.log_accuracy_table("accuracy", ACCURACY_TABLE)
    run.log_confusion_matrix("confusion", CONFUSION_MATRIX)
    run.log_predictions("predictions", PREDICTIONS)
    run.log_residuals("residuals", RESIDUALS)
    run.complete()
    assert run.rejections() == []
    metrics = run.get_metrics()
    assert metrics["accuracy"] == ACCURACY_TABLE
    assert metrics["confusion"] == CONFUSION_MATRIX
    assert metrics["predictions"] == PREDICTIONS
    assert metrics["residuals"] == RESIDUALS  # float bin_counts, as documented


def test_log_row_citrus_example(experiment: Experiment) -> None:
    run = experiment.start_logging()
    citrus = ["orange", "lemon", "lime"]
    sizes = [10, 7, 3]
    for index in range(len(citrus)):
        run.log_row("citrus", fruit=citrus[index], size=sizes[index])
    assert run.get_metrics()["citrus"] == {"fruit": citrus, "size": sizes}


# -- tags and properties --------------------------------------------------------------------------


def test_tag_example(experiment: Experiment, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VSTS_BUILD_ID", "4711")
    run = experiment.start_logging()
    run.tag("DeploymentCandidate")
    run.tag("modifiedBy", "Master CI")
    run.tag("modifiedBy", "release pipeline")  # Careful, tags are mutable

    run.add_properties({"BuildId": os.environ.get("VSTS_BUILD_ID")})  # Properties are not

    tags = run.get_tags()
    assert tags == {"DeploymentCandidate": None, "modifiedBy": "release pipeline"}
    with pytest.raises(FailedPreconditionError):
        run.add_properties({"BuildId": "other"})
    assert run.remove_tags(["modifiedBy"]) == {"DeploymentCandidate": None}
    run.set_tags("plain")
    assert run.get_tags() == {"DeploymentCandidate": None, "plain": None}


def test_experiment_tag_example(experiment: Experiment) -> None:
    # Documented difference: an empty tag key is refused (it cannot be shown
    # or filtered on); the rest of Azure's example is the same.
    with pytest.raises(InvalidArgumentError):
        experiment.tag("")
    experiment.tag("DeploymentCandidate")
    experiment.tag("modifiedBy", "Master CI")
    experiment.tag("modifiedBy", "release pipeline")  # Careful, tags are mutable
    assert experiment.refresh().tags == {
        "DeploymentCandidate": None,
        "modifiedBy": "release pipeline",
    }


# -- files ----------------------------------------------------------------------------------------


def _files(*paths: str) -> None:
    for p in paths:
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        Path(p).write_text(f"contents of {p}")


def test_upload_file_example(experiment: Experiment) -> None:
    _files("path/on/disk/file.txt")
    run = experiment.start_logging()
    run.upload_file(name="important_file", path_or_stream="path/on/disk/file.txt")
    assert run.get_file_names() == ["important_file"]


def test_upload_files_example(experiment: Experiment, tmp_path: Path) -> None:
    _files("path/on/disk/file_1.txt", "other/path/on/disk/file_2.txt")
    os.chdir(tmp_path / "other")

    run = experiment.start_logging()
    file_name_1 = "important_file_1"
    file_name_2 = "important_file_2"
    run.upload_files(
        names=[file_name_1, file_name_2],
        paths=[str(tmp_path / "path/on/disk/file_1.txt"), "path/on/disk/file_2.txt"],
    )

    (tmp_path / "fresh").mkdir()
    os.chdir(tmp_path / "fresh")  # so that os.mkdir("path") below starts from nothing
    run.download_file(file_name_1, "file_1.txt")

    os.mkdir("path")  # The path must exist
    run.download_file(file_name_2, "path/file_2.txt")
    assert Path("file_1.txt").read_text() == "contents of path/on/disk/file_1.txt"
    assert Path("path/file_2.txt").read_text() == "contents of other/path/on/disk/file_2.txt"


def test_upload_files_return_artifacts_timeout_datastore(experiment: Experiment) -> None:
    _files("a.txt")
    run = experiment.start_logging()
    _azure._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        infos = run.upload_files(
            ["a"], ["a.txt"], return_artifacts=True, timeout_seconds=60, datastore_name="blobs"
        )
    assert [i.name for i in infos] == ["a"]
    assert any("datastore_name" in str(w.message) for w in caught)


def test_upload_folder_example(experiment: Experiment) -> None:
    _files("path/on/disk/existing_file.txt")
    run = experiment.start_logging()
    run.upload_folder(name="important_files", path="path/on/disk")

    run.download_file("important_files/existing_file.txt", "local_file.txt")
    assert Path("local_file.txt").read_text() == "contents of path/on/disk/existing_file.txt"


def test_download_files_positional_order(experiment: Experiment) -> None:
    _files("src/a.txt", "src/b.txt")
    run = experiment.start_logging()
    run.upload_folder("outputs", "src")
    # download_files(prefix, output_directory, output_paths, batch_size, append_prefix, ...)
    got = run.download_files("outputs/", None, ["x/1.txt", "x/2.txt"], 1, True, 60)
    assert got == ["x/1.txt", "x/2.txt"]
    assert Path("x/2.txt").read_text() == "contents of src/b.txt"
    kept = run.download_files("outputs/", "d", None, 100, False)
    assert sorted(Path(p).name for p in kept) == ["a.txt", "b.txt"]
    assert Path("d/a.txt").exists()


def test_outputs_directory_uploaded_at_completion(experiment: Experiment) -> None:
    run = experiment.start_logging(outputs="outputs")
    _files("outputs/model.pkl")
    run.complete()
    assert run.get_file_names() == ["outputs/model.pkl"]


# -- lifecycle ------------------------------------------------------------------------------------


def test_flush_timeout_seconds(experiment: Experiment) -> None:
    run = experiment.start_logging()
    run.log("x", 1.0)
    assert run.flush(timeout_seconds=300) is True
    assert run.flush() is True


def test_not_applicable_methods_name_the_steplog_way(experiment: Experiment) -> None:
    run = experiment.start_logging()
    with pytest.raises(NotApplicableError, match="upload_file"):
        model = run.register_model(model_name="best_model", model_path="outputs/model.pkl")  # noqa: F841
    with pytest.raises(NotApplicableError, match="child_run"):
        run.submit_child(object())
    with pytest.raises(NotApplicableError, match="upload_folder"):
        run.take_snapshot(".")
    with pytest.raises(NotImplementedError):
        run.get_environment()
    with pytest.raises(NotImplementedError):
        Run.list_by_compute(object())


# -- Experiment -----------------------------------------------------------------------------------


def test_experiment_constructor_example(ws: Workspace) -> None:
    workspace = ws
    experiment = Experiment(workspace, "MyExperiment")
    assert experiment.name == "MyExperiment"
    assert Experiment(workspace=ws, name="MyExperiment").id == experiment.id


def test_start_logging_example(ws: Workspace, experiment_name: str) -> None:
    workspace = ws
    # "My Experiment" breaks the documented rule (letters, digits, _ and -).
    with pytest.raises(InvalidArgumentError) as err:
        experiment = Experiment(workspace, "My Experiment")
    assert err.value.field == "name"
    experiment = Experiment(workspace, experiment_name)
    _azure._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = experiment.start_logging(outputs=None, snapshot_directory=".", display_name="My Run")
    assert any("snapshot_directory" in str(w.message) for w in caught)
    accuracy = 0.9
    run.log_metric("Accuracy", accuracy)
    run.complete()
    assert run.display_name == "My Run"
    assert run.get_metrics() == {"Accuracy": 0.9}


def test_experiment_list_view_types(ws: Workspace, experiment_name: str) -> None:
    exp = Experiment(ws, experiment_name)
    exp.archive()
    active = {e.name for e in Experiment.list(ws, view_type="ActiveOnly")}
    archived = {e.name for e in Experiment.list(ws, view_type="ArchivedOnly")}
    everything = {e.name for e in Experiment.list(ws, view_type="All")}
    assert experiment_name not in active
    assert experiment_name in archived and experiment_name in everything
    assert [e.name for e in Experiment.list(ws, experiment_name=experiment_name)] == []
    assert [e.name for e in Experiment.list(ws, experiment_name, "All")] == [experiment_name]
    with pytest.raises(InvalidArgumentError) as err:
        Experiment.list(ws, view_type="Archived")
    assert err.value.field == "view_type"


def test_experiment_delete(ws: Workspace, experiment_name: str) -> None:
    exp = Experiment(ws, experiment_name)
    run = exp.start_logging()
    run.log("loss", 1.0)
    run.upload_file("outputs/a.txt", b"a")
    child = run.child_run()
    # Azure's rule: not while a run is unfinished.
    with pytest.raises(FailedPreconditionError) as err:
        Experiment.delete(ws, exp.id)
    assert err.value.field == "experiment_id"
    child.complete()
    run.complete()
    Experiment.delete(ws, exp.id)
    assert experiment_name not in {e.name for e in Experiment.list(ws, view_type="All")}
    with pytest.raises(NotFoundError):
        Run.get(ws, run.id)
    with pytest.raises(NotFoundError):
        Experiment.delete(ws, exp.id)
    with pytest.raises(InvalidArgumentError):
        Experiment.delete(ws, "not-an-id")
    # The name is free again: a new, empty experiment.
    again = Experiment(ws, experiment_name)
    assert again.id != exp.id and list(again.get_runs()) == []


def test_azure_strict_name_rule(
    ws: Workspace, experiment_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "a.b." + experiment_name  # steplog's rule allows dots; Azure's does not
    assert Experiment(ws, name).name == name
    monkeypatch.setenv("STEPLOG_AZURE_STRICT", "1")
    with pytest.raises(InvalidArgumentError, match="Azure"):
        Experiment(ws, name)
    with pytest.raises(InvalidArgumentError, match="Azure"):
        Experiment(ws, "x" * 37)
    assert Experiment(ws, name, _skip_name_validation=True).name == name
    assert Experiment(ws, experiment_name).name == experiment_name


# -- the "log metrics" how-to ---------------------------------------------------------------------


def test_howto_train_within_notebook(ws: Workspace) -> None:
    rng = np.random.default_rng(0)
    preds, truth = rng.normal(size=20), rng.normal(size=20)

    def mean_squared_error(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.mean((a - b) ** 2))

    # Get an experiment object from Azure Machine Learning
    experiment = Experiment(workspace=ws, name="train-within-notebook")

    # Create a run object in the experiment
    run = experiment.start_logging()
    # Log the algorithm parameter alpha to the run
    run.log("alpha", 0.03)
    run.log("mse", mean_squared_error(truth, preds))

    # Save the model to the outputs directory for capture
    model_file_name = "outputs/model.pkl"
    _files(model_file_name)

    # upload the model file explicitly into artifacts
    run.upload_file(name=model_file_name, path_or_stream=model_file_name)

    # Complete the run
    run.complete()
    assert run.get_status() == "Completed"
    assert run.get_metrics() == {"alpha": 0.03, "mse": mean_squared_error(truth, preds)}
    assert "outputs/model.pkl" in run.get_file_names()


def test_howto_charts(experiment: Experiment) -> None:
    run = experiment.start_logging()
    run.log_list(name="Fibonacci", value=[0, 1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89])
    sines: dict[str, list[float]] = {"angle": [], "sine": []}
    for i in range(-10, 10):
        run.log(name="Sigmoid", value=1 / (1 + np.exp(-i)))
        angle = i / 2.0
        run.log_row(name="Cosine Wave", angle=angle, cos=np.cos(angle))
        sines["angle"].append(angle)
        sines["sine"].append(np.sin(angle))
    run.log_table(name="Sine Wave", value=sines)
    run.log_list("phases", ["warmup", "train", "eval"])  # "float, integer or string"
    metrics = run.get_metrics()
    assert metrics["Fibonacci"] == [0, 1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89]
    assert len(metrics["Sigmoid"]) == 20
    assert len(metrics["Cosine Wave"]["cos"]) == 20
    assert metrics["Sine Wave"]["angle"] == sines["angle"]
    assert metrics["phases"] == ["warmup", "train", "eval"]
    with pytest.raises(InvalidArgumentError, match="all numbers or all strings"):
        run.log_list("mixed", [1, "a"])


def test_howto_run_by_id(experiment: Experiment) -> None:
    started = experiment.start_logging()
    run_id = started.id
    run = Run(experiment, run_id)
    assert run.id == run_id and run.get_status() == "Running"


# -- item 5: the transformers AzureMLCallback pattern ---------------------------------------------


def test_azureml_callback_pattern(experiment: Experiment, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' AzureMLCallback: Run.get_context() once, then on every
    logging step run.log(k, v, description=k) for each numeric entry."""
    owner = experiment.start_logging()
    monkeypatch.setenv("STEPLOG_RUN_ID", owner.id)
    azureml_run = Run.get_context()
    steps = 30
    for step in range(steps):
        logs = {"loss": 1.0 / (step + 1), "learning_rate": 1e-4, "epoch": step / 10, "note": "x"}
        for k, v in logs.items():
            if isinstance(v, (int, float)):
                azureml_run.log(k, v, description=k)
    assert azureml_run.flush(timeout_seconds=60)
    assert azureml_run.rejections() == []
    metrics = owner.get_metrics()
    assert len(metrics["loss"]) == steps and metrics["loss"][-1] == 1.0 / steps
    assert metrics["learning_rate"] == [1e-4] * steps
    assert "note" not in metrics


# -- item 4: RunFunction, many processes appending rows to one table ------------------------------

ENTRY_SCRIPT = textwrap.dedent(
    """
    import sys
    from steplog import Run

    def init():
        global run
        run = Run.get_context()

    def run_batch(mini_batch):
        for item in mini_batch:
            run.log_row("results", item=item, worker=int(sys.argv[1]), score=item / 7)

    init()
    worker, count, per = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    for b in range(0, per, 25):
        run_batch([worker * per + i for i in range(b, min(b + 25, per))])
    assert run.flush(timeout_seconds=120)
    assert run.rejections() == [], run.rejections()
    """
)


def test_run_function_many_processes_append_rows(
    experiment: Experiment, url: str, tmp_path: Path
) -> None:
    run = experiment.start_logging(display_name="parallel")
    script = tmp_path / "entry.py"
    script.write_text(ENTRY_SCRIPT)
    workers, per = 4, 300
    env = {
        **os.environ,
        "STEPLOG_URL": url,
        "STEPLOG_RUN_ID": run.id,
        "STEPLOG_FLUSH_INTERVAL": "0.01",
        "PYTHONPATH": str(ROOT / "sdk"),
    }
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(w), str(workers), str(per)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for w in range(workers)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out
    run.complete()
    table = run.get_metrics()["results"]
    items = table["item"]
    assert len(items) == workers * per  # nothing lost, nothing doubled
    assert sorted(items) == list(range(workers * per))
    # Each worker's rows keep their order; the workers' rows interleave.
    for w in range(workers):
        mine = [i for i, k in zip(items, table["worker"], strict=True) if k == w]
        assert mine == list(range(w * per, (w + 1) * per))
    assert run.get_metrics()["results"]["score"][0] == items[0] / 7


# -- the rest of the documented methods, by their documented semantics --------------------------


def test_create_children_rules(experiment: Experiment) -> None:
    parent = experiment.start_logging()
    # "Either count OR tag_key AND tag_values must be specified."
    assert len(parent.create_children(count=2)) == 2
    tagged = parent.create_children(tag_key="lr", tag_values=["0.1", "0.01"])
    assert [c.get_tags() for c in tagged] == [{"lr": "0.1"}, {"lr": "0.01"}]
    with pytest.raises(InvalidArgumentError):
        parent.create_children(tag_key="lr")
    with pytest.raises(InvalidArgumentError):
        parent.create_children()


def test_wait_for_completion_and_logs(experiment: Experiment, tmp_path: Path) -> None:
    run = experiment.start_logging()
    run.upload_file("logs/driver.txt", b"hello")
    run.complete()
    status = run.wait_for_completion(show_output=False, wait_post_processing=True)
    assert status["status"] == "Completed"
    names = run.get_all_logs(destination=str(tmp_path / "logs_here"))
    assert [Path(n).read_text() for n in names] == ["hello"]
    failed = experiment.start_logging()
    failed.fail(error_details="boom", error_code="UserError")
    with pytest.raises(FailedPreconditionError, match="boom"):
        failed.wait_for_completion(raise_on_error=True)
    assert failed.wait_for_completion(raise_on_error=False)["error"]["error"] == {
        "code": "UserError",
        "message": "boom",
    }


def test_add_type_provider(experiment: Experiment) -> None:
    class HyperDriveRun(Run):
        pass

    parent = experiment.start_logging(run_type="hyperdrive")
    Run.add_type_provider(
        "hyperdrive", lambda exp, run: HyperDriveRun(exp, _proto=run._proto, _client=run._client)
    )
    try:
        listed = Run.list(experiment)
        assert [type(r) for r in listed] == [HyperDriveRun]
        assert [type(r) for r in Run.list(experiment, _rehydrate_runs=False)] == [Run]
    finally:
        from steplog import run as run_module

        run_module._TYPE_PROVIDERS.clear()
    assert listed[0].id == parent.id


def test_get_submitted_run_is_deprecated(
    experiment: Experiment, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = experiment.start_logging()
    monkeypatch.setenv("STEPLOG_RUN_ID", owner.id)
    with pytest.warns(DeprecationWarning, match="get_context"):
        run = Run.get_submitted_run()
    assert run.id == owner.id
