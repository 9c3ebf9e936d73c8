-- steplog schema v2: table rows and evaluation documents.
-- Works on plain PostgreSQL too; TimescaleDB-only statements are guarded.

-- The columns of each table series. A column's type is fixed by its first
-- value; `slot` is its index in the row's array of that type, so a row stores
-- no column names and the column set can grow without touching old rows.
-- Written in the transaction that appends the rows (the series row is locked).
CREATE TABLE table_columns (
    series_id  bigint   NOT NULL REFERENCES series,
    position   integer  NOT NULL,   -- order of first appearance, from 0
    name       text     NOT NULL,
    type       smallint NOT NULL,   -- steplog.v1.ColumnType
    slot       integer  NOT NULL,   -- index into the row array of this type, from 0
    PRIMARY KEY (series_id, name),
    UNIQUE (series_id, position),
    UNIQUE (series_id, type, slot)
);

-- One row per table row, cells in typed arrays indexed by slot. A missing cell
-- is a NULL element, or beyond the end of the array (rows logged before the
-- column existed). An array is NULL when the row's request had no column of
-- its type. `step` is the row's step, or its index for an unstepped table, so
-- rows read back in the order they were logged.
CREATE TABLE table_rows (
    time       timestamptz        NOT NULL,
    series_id  bigint             NOT NULL,
    step       bigint             NOT NULL,
    doubles    double precision[],
    ints       bigint[],
    bools      boolean[],
    hidden     boolean            NOT NULL DEFAULT false,
    strings    text[]
);
CREATE INDEX table_rows_series_idx ON table_rows (series_id, step);

-- Evaluation documents (confusion_matrix, accuracy_table, predictions,
-- residuals), validated before they were accepted.
CREATE TABLE evaluation_points (
    time            timestamptz NOT NULL,
    series_id       bigint      NOT NULL,
    step            bigint      NOT NULL,
    schema_type     text        NOT NULL,
    schema_version  text        NOT NULL,
    document        jsonb       NOT NULL,
    hidden          boolean     NOT NULL DEFAULT false
);
CREATE INDEX evaluation_points_series_idx ON evaluation_points (series_id, step);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        PERFORM create_hypertable('table_rows', 'time',
                                  chunk_time_interval => INTERVAL '1 day',
                                  create_default_indexes => false);
        PERFORM create_hypertable('evaluation_points', 'time',
                                  chunk_time_interval => INTERVAL '30 days',
                                  create_default_indexes => false);
    END IF;
END
$$;
