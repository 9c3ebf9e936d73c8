-- steplog schema v3: image points and run files (artifacts).
-- The bytes live in S3-compatible storage under content-addressed keys
-- (blobs/sha256/<first 2 hex>/<other 62 hex>); these rows point to them and
-- are written only after the blob is stored.
-- Works on plain PostgreSQL too; TimescaleDB-only statements are guarded.

-- One row per image point. `sha256` is the blob address (lower-case hex);
-- content type, width and height were read from the bytes and checked
-- against what the client declared. `hidden` as for scalar points.
CREATE TABLE image_points (
    time          timestamptz NOT NULL,
    series_id     bigint      NOT NULL,
    step          bigint      NOT NULL,
    sha256        text        NOT NULL,
    size          bigint      NOT NULL,
    content_type  text        NOT NULL,
    width         integer     NOT NULL,
    height        integer     NOT NULL,
    hidden        boolean     NOT NULL DEFAULT false
);
CREATE INDEX image_points_series_idx ON image_points (series_id, step);

-- The files of a run: a relative path -> a blob. Uploading a path again with
-- other content replaces the row only when the client asks to overwrite.
CREATE TABLE artifacts (
    run_id        text        NOT NULL REFERENCES runs,
    path          text        NOT NULL,
    sha256        text        NOT NULL,
    size          bigint      NOT NULL,
    content_type  text        NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, path)
);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        PERFORM create_hypertable('image_points', 'time',
                                  chunk_time_interval => INTERVAL '7 days',
                                  create_default_indexes => false);
    END IF;
END
$$;
