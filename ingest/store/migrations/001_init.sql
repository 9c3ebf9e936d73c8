-- steplog schema v1: metadata in ordinary tables, points in hypertables.
-- Works on plain PostgreSQL too; TimescaleDB-only statements are guarded.

CREATE TABLE experiments (
    experiment_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workspace      text        NOT NULL,
    name           text        NOT NULL,
    tags           jsonb       NOT NULL DEFAULT '{}',   -- key -> value (or null)
    archived       boolean     NOT NULL DEFAULT false,
    created_at     timestamptz NOT NULL DEFAULT now(),
    run_count      bigint      NOT NULL DEFAULT 0,      -- the last run number handed out
    UNIQUE (workspace, name)
);

CREATE TABLE runs (
    run_id         text        PRIMARY KEY,
    workspace      text        NOT NULL,
    experiment_id  bigint      NOT NULL REFERENCES experiments,
    number         bigint      NOT NULL,
    display_name   text        NOT NULL DEFAULT '',
    description    text        NOT NULL DEFAULT '',
    run_type       text        NOT NULL DEFAULT '',
    parent_run_id  text        REFERENCES runs (run_id),
    root_run_id    text        NOT NULL,
    status         text        NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    start_time     timestamptz,
    end_time       timestamptz,
    error_message  text,
    error_code     text,
    tags           jsonb       NOT NULL DEFAULT '{}',
    properties     jsonb       NOT NULL DEFAULT '{}',
    last_seen      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (experiment_id, number)
);
CREATE INDEX runs_parent_idx ON runs (parent_run_id) WHERE parent_run_id IS NOT NULL;
CREATE INDEX runs_root_idx ON runs (root_run_id);

-- Series state is authoritative here: the write pipeline locks a series row
-- (SELECT ... FOR UPDATE) in the transaction that appends its points, so two
-- service processes can never both accept a conflicting step.
CREATE TABLE series (
    series_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id         text        NOT NULL REFERENCES runs,
    name           text        NOT NULL,
    labels         jsonb       NOT NULL DEFAULT '{}',
    labels_key     text        NOT NULL DEFAULT '',     -- canonical form of labels
    kind           smallint    NOT NULL,                -- steplog.v1.SeriesKind
    value_type     smallint    NOT NULL DEFAULT 0,      -- scalars: 0 numeric, 1 text
    stepped        boolean     NOT NULL,
    out_of_order   boolean     NOT NULL DEFAULT false,
    description    text        NOT NULL DEFAULT '',
    last_step      bigint,                              -- last accepted step (or index)
    last_value     double precision,
    last_text      text,
    point_count    bigint      NOT NULL DEFAULT 0,
    last_time      timestamptz,
    UNIQUE (run_id, name, labels_key)
);

-- Exactly-once: a writer's high-water mark commits with its points.
CREATE TABLE writers (
    writer_id      text        PRIMARY KEY,
    workspace      text        NOT NULL,
    last_sequence  bigint      NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Points. `hidden` marks points a rewind (or a later write to the same step of
-- an out-of-order series) took out of query results; they stay for audit.
CREATE TABLE scalar_points (
    time       timestamptz      NOT NULL,
    series_id  bigint           NOT NULL,
    step       bigint           NOT NULL,
    value      double precision NOT NULL,
    hidden     boolean          NOT NULL DEFAULT false
);
CREATE INDEX scalar_points_series_idx ON scalar_points (series_id, step);

CREATE TABLE text_points (
    time       timestamptz NOT NULL,
    series_id  bigint      NOT NULL,
    step       bigint      NOT NULL,
    value      text        NOT NULL,
    hidden     boolean     NOT NULL DEFAULT false
);
CREATE INDEX text_points_series_idx ON text_points (series_id, step);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        PERFORM create_hypertable('scalar_points', 'time',
                                  chunk_time_interval => INTERVAL '1 day',
                                  create_default_indexes => false);
        PERFORM create_hypertable('text_points', 'time',
                                  chunk_time_interval => INTERVAL '7 days',
                                  create_default_indexes => false);
    END IF;
END
$$;
