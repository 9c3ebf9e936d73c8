-- steplog schema v6: quotas per workspace, and what the blob sweep needs.
-- Works on plain PostgreSQL too.

-- Per-workspace overrides of the service's quota settings (ingest/store/quotas.py),
-- set with `steplog-ingest quota set`. NULL: the service's default; 0: unlimited.
CREATE TABLE workspace_quotas (
    workspace      text        PRIMARY KEY,
    points_per_s   bigint      CHECK (points_per_s >= 0),
    bytes_per_s    bigint      CHECK (bytes_per_s >= 0),
    runs           bigint      CHECK (runs >= 0),
    series         bigint      CHECK (series >= 0),
    stored_bytes   bigint      CHECK (stored_bytes >= 0),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- What each workspace holds, kept in the transactions that change it (a run
-- created, a series created, an image point or a file stored), so a hard
-- quota is checked with one row lock, never a scan. stored_bytes counts the
-- bytes the workspace's rows point to (an image logged twice counts twice;
-- an overwritten file counts its new size).
CREATE TABLE workspace_usage (
    workspace      text        PRIMARY KEY,
    runs           bigint      NOT NULL DEFAULT 0,
    series         bigint      NOT NULL DEFAULT 0,
    stored_bytes   bigint      NOT NULL DEFAULT 0
);

INSERT INTO workspace_usage (workspace, runs, series, stored_bytes)
SELECT w.workspace,
       (SELECT count(*) FROM runs r WHERE r.workspace = w.workspace),
       (SELECT count(*) FROM series s JOIN runs r USING (run_id) WHERE r.workspace = w.workspace),
       (SELECT COALESCE(sum(i.size), 0) FROM image_points i
          JOIN series s USING (series_id) JOIN runs r USING (run_id)
         WHERE r.workspace = w.workspace)
       + (SELECT COALESCE(sum(a.size), 0) FROM artifacts a JOIN runs r USING (run_id)
           WHERE r.workspace = w.workspace)
FROM (SELECT DISTINCT workspace FROM runs) w;

-- The last time a writer was about to store (or rely on) a blob: upserted
-- before any byte goes to S3. The sweep (ingest/store/blob_sweep.py) deletes a blob
-- only when no row references it and its touch is older than the grace
-- period, holding this row's lock while it deletes.
CREATE TABLE blob_touches (
    sha256         text        PRIMARY KEY,
    touched_at     timestamptz NOT NULL
);

-- The sweep asks "does any row point to this blob?" by hash.
CREATE INDEX image_points_sha256_idx ON image_points (sha256);
CREATE INDEX artifacts_sha256_idx ON artifacts (sha256);
