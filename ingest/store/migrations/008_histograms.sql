-- steplog schema: histogram points (steplog.v1.HistogramPoints), validated
-- before they were accepted (ingest/core/histograms.py).
-- Works on plain PostgreSQL too; TimescaleDB-only statements are guarded.

-- One row per histogram: its k + 1 edges and k counts as float8 arrays (8
-- bytes an element; PostgreSQL compresses and moves to TOAST an array row
-- over 2 kB), and the values outside its bins. `step` is the point's step, or
-- its index for an unstepped series, like every other kind.
CREATE TABLE histogram_points (
    time       timestamptz        NOT NULL,
    series_id  bigint             NOT NULL,
    step       bigint             NOT NULL,
    edges      double precision[] NOT NULL,
    counts     double precision[] NOT NULL,
    underflow  double precision   NOT NULL DEFAULT 0,
    overflow   double precision   NOT NULL DEFAULT 0,
    nan_count  double precision   NOT NULL DEFAULT 0,
    hidden     boolean            NOT NULL DEFAULT false
);
CREATE INDEX histogram_points_series_idx ON histogram_points (series_id, step);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        PERFORM create_hypertable('histogram_points', 'time',
                                  chunk_time_interval => INTERVAL '7 days',
                                  create_default_indexes => false);
    END IF;
END
$$;
