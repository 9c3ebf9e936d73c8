"""Page tokens and page sizes of the query service, and the client's
reassembly of a table split over pages (no I/O)."""

from __future__ import annotations

import pytest

from ingest.api.query import MAX_PAGE_POINTS, decode_token, encode_token, page_size
from ingest.core.errors import ApiError
from steplog.query import merge_series, merge_tables
from steplog.v1 import data_pb2
from steplog.v1 import query_service_pb2 as qs

FIELDS = {"s": int, "e": int, "n": int, "p": int}


def request(**kw: object) -> qs.ReadSeriesRequest:
    return qs.ReadSeriesRequest(run_id="r", name="loss", **kw)  # type: ignore[arg-type]


def test_a_token_round_trips_and_ignores_page_size() -> None:
    token = encode_token(request(page_size=10), s=3, e=99, n=7, p=-(2**63))
    got = decode_token(request(page_size=50), token, FIELDS)
    assert got is not None and (got["s"], got["e"], got["n"], got["p"]) == (3, 99, 7, -(2**63))
    assert decode_token(request(), "", FIELDS) is None


@pytest.mark.parametrize(
    "token",
    ["garbage", "e30", "eyJ2IjoxfQ", "!!!", "x" * 2000, "eyJ2IjoxLCJzIjp0cnVlfQ"],
)
def test_a_token_the_service_did_not_issue_is_invalid(token: str) -> None:
    with pytest.raises(ApiError) as err:
        decode_token(request(), token, FIELDS)
    assert err.value.code == "INVALID_ARGUMENT" and err.value.field == "page_token"


def test_a_token_of_another_request_is_refused() -> None:
    token = encode_token(request(start_step=1), s=3, e=99, n=7, p=5)
    with pytest.raises(ApiError) as err:
        decode_token(request(start_step=2), token, FIELDS)
    assert err.value.field == "page_token" and "another request" in err.value.message


def test_page_size_defaults_caps_and_refuses_negatives() -> None:
    assert page_size(0, MAX_PAGE_POINTS) == MAX_PAGE_POINTS
    assert page_size(7, MAX_PAGE_POINTS) == 7
    assert page_size(10**9, MAX_PAGE_POINTS) == MAX_PAGE_POINTS
    with pytest.raises(ApiError) as err:
        page_size(-1, MAX_PAGE_POINTS)
    assert err.value.field == "page_size"


def column(name: str, **kw: object) -> data_pb2.Column:
    return data_pb2.Column(name=name, **kw)  # type: ignore[arg-type]


def test_table_pieces_merge_with_columns_added_later() -> None:
    i64, dbl = data_pb2.COLUMN_TYPE_INT64, data_pb2.COLUMN_TYPE_DOUBLE
    a = data_pb2.TableColumns(
        row_count=2, steps=[0, 1], columns=[column("a", type=i64, ints=[1, 2])]
    )
    b = data_pb2.TableColumns(
        row_count=2,
        steps=[2, 3],
        columns=[
            column("a", type=i64, ints=[3, 0], present=[True, False]),
            column("b", type=dbl, doubles=[0.5, 1.5]),
        ],
    )
    out = merge_tables([a, b])
    assert out.row_count == 4 and list(out.steps) == [0, 1, 2, 3]
    cols = {c.name: c for c in out.columns}
    assert list(cols["a"].ints) == [1, 2, 3, 0]
    assert list(cols["a"].present) == [True, True, True, False]
    assert list(cols["b"].doubles) == [0.0, 0.0, 0.5, 1.5]
    assert list(cols["b"].present) == [False, False, True, True]


def test_scalar_pieces_concatenate() -> None:
    parts = [
        data_pb2.SeriesData(name="x", scalars=data_pb2.ScalarColumns(steps=[0, 1], values=[1, 2])),
        data_pb2.SeriesData(name="x", scalars=data_pb2.ScalarColumns(steps=[2], values=[3])),
    ]
    merged = merge_series(parts)
    assert list(merged.scalars.steps) == [0, 1, 2] and list(merged.scalars.values) == [1, 2, 3]
