"""Names, tags, properties and run status transitions."""

from __future__ import annotations

import pytest

from ingest.core import model
from ingest.core.errors import ApiError
from ingest.core.model import RunStatus as S


@pytest.mark.parametrize(
    "current,target",
    [
        (S.NOT_STARTED, S.RUNNING),
        (S.RUNNING, S.COMPLETED),
        (S.RUNNING, S.FAILED),
        (S.RUNNING, S.CANCEL_REQUESTED),
        (S.CANCEL_REQUESTED, S.CANCELED),
        (S.QUEUED, S.RUNNING),
        (S.RUNNING, S.FINALIZING),
        (S.FINALIZING, S.COMPLETED),
        (S.RUNNING, S.RUNNING),
    ],
)
def test_allowed_transitions(current: S, target: S) -> None:
    model.check_transition(current, target)


@pytest.mark.parametrize(
    "current,target",
    [
        (S.COMPLETED, S.RUNNING),
        (S.FAILED, S.COMPLETED),
        (S.CANCELED, S.CANCELED),
        (S.COMPLETED, S.COMPLETED),
        (S.FINALIZING, S.RUNNING),
        (S.QUEUED, S.COMPLETED),
    ],
)
def test_forbidden_transitions(current: S, target: S) -> None:
    with pytest.raises(ApiError) as err:
        model.check_transition(current, target)
    assert err.value.code == "FAILED_PRECONDITION" and err.value.field == "status"


def test_not_responding_cannot_be_set() -> None:
    with pytest.raises(ApiError) as err:
        model.check_transition(S.RUNNING, S.NOT_RESPONDING)
    assert err.value.code == "INVALID_ARGUMENT"


@pytest.mark.parametrize("name", ["", "a b", "-x", "x" * 256, "a/b", "../etc"])
def test_bad_experiment_names(name: str) -> None:
    with pytest.raises(ApiError) as err:
        model.experiment_name(name)
    assert err.value.field == "name"


@pytest.mark.parametrize("name", ["mnist", "a", "Exp_1.2-b", "x" * 255])
def test_good_experiment_names(name: str) -> None:
    assert model.experiment_name(name) == name


def test_workspace_default_and_validation() -> None:
    assert model.workspace_name("") == "default"
    with pytest.raises(ApiError):
        model.workspace_name("Team A")


def test_properties_are_add_only() -> None:
    assert model.merge_properties({"a": "1"}, {"a": "1", "b": "2"}) == {"a": "1", "b": "2"}
    with pytest.raises(ApiError) as err:
        model.merge_properties({"a": "1"}, {"a": "2"})
    assert err.value.field == "properties[a]" and err.value.code == "FAILED_PRECONDITION"


def test_tags_validation() -> None:
    assert model.tags([("k", None), ("v", "x")]) == {"k": None, "v": "x"}
    with pytest.raises(ApiError):
        model.tags([("", "x")])
    with pytest.raises(ApiError):
        model.tags([("k", "x\x00")])


def test_new_run_ids_are_valid_and_unique() -> None:
    ids = {model.new_run_id("e" * 200) for _ in range(100)}
    assert len(ids) == 100
    for rid in ids:
        assert model.run_id(rid) == rid
