-- Numeric scalar points as blocks (issue 13): one row per series per commit,
-- holding that commit's points of the series as columns (arrays), with
-- summary columns so a read touches only the blocks whose steps or times it
-- needs. A point costs about 12 bytes of columns (an 8-byte value, a 4-byte
-- time offset, the steps usually implied) instead of a ~100-byte row with
-- its index entry.
--
-- The points of a block, in the order they were written:
--   values[i]   the value (float8: NaN, +-Inf, -0.0, subnormals kept bit for bit)
--   offsets[i]  the time, in microseconds after min_time (int4: a block spans
--               at most 2^31 - 1 us, about 35 minutes; the writer splits longer ones)
--   steps[i]    the step, or steps IS NULL when the steps are
--               min_step, min_step + 1, ..., min_step + n - 1 (the usual case)
--   hidden[i]   hidden by a rewind or a later write to the step of an
--               out-of-order series, or hidden IS NULL when none is
-- Summaries (over all n points, hidden included): min/max step and time,
-- nan_count, min_value/max_value (NaN left out; NULL when every value is
-- NaN), last_value (the value at position n), and hidden_count.
CREATE SEQUENCE scalar_blocks_id_seq;
CREATE TABLE scalar_blocks (
    block_id     bigint           NOT NULL DEFAULT nextval('scalar_blocks_id_seq'),
    series_id    bigint           NOT NULL,
    min_time     timestamptz      NOT NULL,
    max_time     timestamptz      NOT NULL,
    min_step     bigint           NOT NULL,
    max_step     bigint           NOT NULL,
    n            integer          NOT NULL,
    hidden_count integer          NOT NULL DEFAULT 0,
    nan_count    integer          NOT NULL DEFAULT 0,
    min_value    double precision,
    max_value    double precision,
    last_value   double precision NOT NULL,
    steps        bigint[],
    offsets      integer[]        NOT NULL,
    values       double precision[] NOT NULL,
    hidden       boolean[]
);
-- Values and time offsets barely compress (measured: pglz and lz4 both keep
-- ~100%), so PostgreSQL is not asked to try: stored out of line uncompressed.
ALTER TABLE scalar_blocks ALTER COLUMN values SET STORAGE EXTERNAL;
ALTER TABLE scalar_blocks ALTER COLUMN offsets SET STORAGE EXTERNAL;
CREATE INDEX scalar_blocks_series_idx ON scalar_blocks (series_id, min_step, max_step);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        PERFORM create_hypertable('scalar_blocks', 'min_time',
                                  chunk_time_interval => INTERVAL '7 days',
                                  create_default_indexes => false);
    END IF;
END
$$;

-- The row table stays for rows written straight into scalar_points (the view
-- below takes INSERT and COPY), and is empty after this migration: its rows
-- are converted into blocks here.
ALTER TABLE scalar_points RENAME TO scalar_rows;

-- Every point of a block, unpacked (step, time, value, hidden, and its
-- position `pos`, 1-based).
CREATE FUNCTION scalar_block_points(b scalar_blocks)
RETURNS TABLE (step bigint, "time" timestamptz, value double precision, hidden boolean, pos bigint)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(u.s, b.min_step + (u.o - 1)), b.min_time + u.dt * interval '1 microsecond',
           u.v, coalesce(u.h, false), u.o
    FROM unnest(b.steps, b.offsets, b.values, b.hidden) WITH ORDINALITY AS u(s, dt, v, h, o)
$$;

-- Numeric scalar points as rows, whatever their layout: what every reader
-- (the UI, Grafana, the sweeps' evaluator, tests, ad hoc SQL) selects from.
CREATE VIEW scalar_points AS
    SELECT r.time, r.series_id, r.step, r.value, r.hidden FROM scalar_rows r
    UNION ALL
    SELECT b.min_time + u.dt * interval '1 microsecond', b.series_id,
           coalesce(u.s, b.min_step + (u.o - 1)), u.v, coalesce(u.h, false)
    FROM scalar_blocks b,
         LATERAL unnest(b.steps, b.offsets, b.values, b.hidden) WITH ORDINALITY AS u(s, dt, v, h, o);
ALTER VIEW scalar_points ALTER COLUMN hidden SET DEFAULT false;

-- The visible and hidden points of some series within a step range: reads
-- only the blocks whose step range overlaps [lo, hi] (inlined by the planner).
CREATE FUNCTION scalar_points_in(ids bigint[], lo bigint, hi bigint)
RETURNS TABLE ("time" timestamptz, series_id bigint, step bigint, value double precision, hidden boolean)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT r.time, r.series_id, r.step, r.value, r.hidden FROM scalar_rows r
    WHERE r.series_id = ANY(ids) AND r.step >= lo AND r.step <= hi
    UNION ALL
    SELECT b.min_time + u.dt * interval '1 microsecond', b.series_id, u.step, u.v, u.hidden
    FROM scalar_blocks b,
         LATERAL (SELECT coalesce(x.s, b.min_step + (x.o - 1)) AS step, x.dt, x.v,
                         coalesce(x.h, false) AS hidden
                  FROM unnest(b.steps, b.offsets, b.values, b.hidden) WITH ORDINALITY
                       AS x(s, dt, v, h, o)) u
    WHERE b.series_id = ANY(ids) AND b.max_step >= lo AND b.min_step <= hi
      AND u.step >= lo AND u.step <= hi
$$;

-- One page of a read: the points of some series within [lo, hi] from the
-- resume position (a_sid, a_step) on, reading only the blocks that can hold
-- the first `lim` of them in (series_id, step) order. Blocks are taken in
-- (series_id, min_step) order until those wholly inside the range and past
-- the resume position hold `lim` visible points; the lim-th point is then at
-- or before (series K, X), K that block's series and X the largest step of
-- the blocks taken in it, so a block starting after that is not read. The
-- caller still filters, orders and limits the points.
CREATE FUNCTION scalar_points_page(ids bigint[], lo bigint, hi bigint, a_sid bigint,
                                   a_step bigint, lim bigint)
RETURNS TABLE ("time" timestamptz, series_id bigint, step bigint, value double precision, hidden boolean)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    WITH c AS (
        SELECT b.*, sum(CASE WHEN b.min_step >= lo AND b.max_step <= hi
                              AND (b.series_id > a_sid OR b.min_step >= a_step)
                             THEN b.n - b.hidden_count ELSE 0 END)
                    OVER (ORDER BY b.series_id, b.min_step, b.block_id) AS upto
        FROM scalar_blocks b
        WHERE b.series_id = ANY(ids) AND b.max_step >= lo AND b.min_step <= hi
          AND (b.series_id, b.max_step) >= (a_sid, a_step)
    ), k AS (
        SELECT c.series_id, c.upto FROM c WHERE c.upto >= lim
        ORDER BY c.series_id, c.min_step, c.block_id LIMIT 1
    ), x AS (
        SELECT k.series_id AS sid,
               (SELECT max(c.max_step) FROM c WHERE c.series_id = k.series_id AND c.upto <= k.upto)
               AS step
        FROM k
    )
    (SELECT r.time, r.series_id, r.step, r.value, r.hidden FROM scalar_rows r
     WHERE r.series_id = ANY(ids) AND r.step >= lo AND r.step <= hi
       AND (r.series_id, r.step) >= (a_sid, a_step) AND NOT r.hidden
     ORDER BY r.series_id, r.step LIMIT lim)
    UNION ALL
    SELECT c.min_time + u.dt * interval '1 microsecond', c.series_id, u.step, u.v, u.hidden
    FROM c LEFT JOIN x ON true,
         LATERAL (SELECT coalesce(y.s, c.min_step + (y.o - 1)) AS step, y.dt, y.v,
                         coalesce(y.h, false) AS hidden
                  FROM unnest(c.steps, c.offsets, c.values, c.hidden) WITH ORDINALITY
                       AS y(s, dt, v, h, o)) u
    WHERE (x.sid IS NULL OR c.series_id < x.sid OR (c.series_id = x.sid AND c.min_step <= x.step))
      AND u.step >= lo AND u.step <= hi AND (c.series_id, u.step) >= (a_sid, a_step)
$$;

-- The visible points of a series within [lo, hi] and the last visible step,
-- from the summaries of the blocks wholly inside the range with nothing
-- hidden; only the other blocks are unpacked.
CREATE FUNCTION scalar_count(sid bigint, lo bigint, hi bigint)
RETURNS TABLE (n bigint, last bigint)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT coalesce(sum(c.n), 0)::bigint, max(c.last) FROM (
        SELECT count(*) AS n, max(r.step) AS last FROM scalar_rows r
        WHERE r.series_id = sid AND NOT r.hidden AND r.step >= lo AND r.step <= hi
        UNION ALL
        SELECT sum(b.n), max(b.max_step) FROM scalar_blocks b
        WHERE b.series_id = sid AND b.min_step >= lo AND b.max_step <= hi AND b.hidden_count = 0
        UNION ALL
        SELECT count(*), max(p.step)
        FROM scalar_blocks b, LATERAL scalar_block_points(b) p
        WHERE b.series_id = sid AND b.max_step >= lo AND b.min_step <= hi
          AND NOT (b.min_step >= lo AND b.max_step <= hi AND b.hidden_count = 0)
          AND NOT p.hidden AND p.step >= lo AND p.step <= hi
    ) c
$$;

-- Rows written to the view land in the row table.
CREATE FUNCTION scalar_points_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO scalar_rows (time, series_id, step, value, hidden)
    VALUES (NEW.time, NEW.series_id, NEW.step, NEW.value, coalesce(NEW.hidden, false));
    RETURN NEW;
END
$$;
CREATE TRIGGER scalar_points_insert INSTEAD OF INSERT ON scalar_points
    FOR EACH ROW EXECUTE FUNCTION scalar_points_insert();

-- An UPDATE of the view's value or hidden flag (ad hoc SQL, tests) changes
-- the matching points where they are, rows or blocks (a block's summaries
-- recomputed); a point's series, step and time cannot change.
CREATE FUNCTION scalar_points_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.series_id, NEW.step, NEW.time) IS DISTINCT FROM (OLD.series_id, OLD.step, OLD.time) THEN
        RAISE EXCEPTION 'scalar_points: only value and hidden can be updated';
    END IF;
    UPDATE scalar_rows r SET value = NEW.value, hidden = NEW.hidden
    WHERE r.series_id = OLD.series_id AND r.step = OLD.step AND r.time = OLD.time
      AND r.value = OLD.value AND r.hidden = OLD.hidden;
    WITH t AS (
        SELECT b.block_id,
               array_agg(CASE WHEN x.hit THEN NEW.value ELSE p.value END ORDER BY p.pos) AS v,
               array_agg(CASE WHEN x.hit THEN NEW.hidden ELSE p.hidden END ORDER BY p.pos) AS h
        FROM scalar_blocks b, LATERAL scalar_block_points(b) p,
             LATERAL (SELECT p.step = OLD.step AND p.time = OLD.time AND p.value = OLD.value
                             AND p.hidden = OLD.hidden AS hit) x
        WHERE b.series_id = OLD.series_id AND b.min_step <= OLD.step AND b.max_step >= OLD.step
          AND b.min_time <= OLD.time AND b.max_time >= OLD.time
        GROUP BY b.block_id HAVING bool_or(x.hit)
    )
    UPDATE scalar_blocks b SET "values" = t.v,
        hidden = CASE WHEN (SELECT bool_or(m) FROM unnest(t.h) m) THEN t.h END,
        hidden_count = (SELECT count(*) FROM unnest(t.h) m WHERE m),
        nan_count = (SELECT count(*) FROM unnest(t.v) m WHERE m = 'NaN'),
        min_value = (SELECT min(m) FROM unnest(t.v) m WHERE m <> 'NaN'),
        max_value = (SELECT max(m) FROM unnest(t.v) m WHERE m <> 'NaN'),
        last_value = t.v[array_length(t.v, 1)]
    FROM t WHERE b.series_id = OLD.series_id AND b.block_id = t.block_id;
    RETURN NEW;
END
$$;
CREATE TRIGGER scalar_points_update INSTEAD OF UPDATE ON scalar_points
    FOR EACH ROW EXECUTE FUNCTION scalar_points_update();

-- Hide the visible points of a series whose step is in `p_steps` (an
-- out-of-order series' last write wins) or, with `p_after` not NULL, whose
-- step is greater than `p_after` (a rewind). Returns how many points it hid.
CREATE FUNCTION scalar_hide(p_sid bigint, p_steps bigint[], p_after bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    lo bigint;
    hi bigint;
    from_rows bigint;
    from_blocks bigint;
BEGIN
    IF p_after IS NULL THEN
        SELECT min(s), max(s) INTO lo, hi FROM unnest(p_steps) s;
    ELSIF p_after < 9223372036854775807 THEN
        lo := p_after + 1;
        hi := 9223372036854775807;
    END IF;
    IF lo IS NULL THEN
        RETURN 0;
    END IF;
    UPDATE scalar_rows r SET hidden = true
    WHERE r.series_id = p_sid AND NOT r.hidden AND r.step >= lo AND r.step <= hi
      AND (p_after IS NOT NULL OR r.step = ANY(p_steps));
    GET DIAGNOSTICS from_rows = ROW_COUNT;
    WITH touched AS (
        SELECT b.block_id, b.hidden_count,
               array_agg(p.hidden OR (p.step >= lo AND p.step <= hi
                                      AND (p_after IS NOT NULL OR p.step = ANY(p_steps)))
                         ORDER BY p.pos) AS mask
        FROM scalar_blocks b, LATERAL scalar_block_points(b) p
        WHERE b.series_id = p_sid AND b.max_step >= lo AND b.min_step <= hi
          AND b.hidden_count < b.n
        GROUP BY b.block_id, b.hidden_count
    ), counted AS (
        SELECT t.*, (SELECT count(*) FROM unnest(t.mask) m WHERE m)::int AS now_hidden
        FROM touched t
    ), changed AS (
        UPDATE scalar_blocks b SET hidden = c.mask, hidden_count = c.now_hidden
        FROM counted c
        WHERE b.series_id = p_sid AND b.block_id = c.block_id AND c.now_hidden > c.hidden_count
        RETURNING c.now_hidden - c.hidden_count AS added
    )
    SELECT coalesce(sum(added), 0) INTO from_blocks FROM changed;
    RETURN from_rows + from_blocks;
END
$$;

-- Convert the rows stored so far into blocks: per series, at most 4096
-- points in step order, and cut at 2,000-second time buckets so every time
-- offset fits in int4 microseconds. Every point is kept, hidden ones too.
WITH g AS (
    SELECT series_id, step, time, value, hidden,
           (row_number() OVER (PARTITION BY series_id ORDER BY step, time) - 1) / 4096 AS k,
           floor(extract(epoch FROM time) / 2000)::bigint AS tb
    FROM scalar_rows
), o AS (
    SELECT series_id, k, tb, min(time) AS t0 FROM g GROUP BY series_id, k, tb
)
INSERT INTO scalar_blocks (series_id, min_time, max_time, min_step, max_step, n, hidden_count,
                           nan_count, min_value, max_value, last_value, steps, offsets, values,
                           hidden)
SELECT g.series_id, o.t0, max(g.time), min(g.step), max(g.step), count(*)::int,
       count(*) FILTER (WHERE g.hidden)::int, count(*) FILTER (WHERE g.value = 'NaN')::int,
       min(g.value) FILTER (WHERE g.value <> 'NaN'), max(g.value) FILTER (WHERE g.value <> 'NaN'),
       (array_agg(g.value ORDER BY g.step, g.time))[count(*)],
       CASE WHEN max(g.step)::numeric - min(g.step) + 1 = count(*) AND count(DISTINCT g.step) = count(*)
            THEN NULL ELSE array_agg(g.step ORDER BY g.step, g.time) END,
       array_agg(round(extract(epoch FROM g.time - o.t0) * 1000000)::int ORDER BY g.step, g.time),
       array_agg(g.value ORDER BY g.step, g.time),
       CASE WHEN bool_or(g.hidden) THEN array_agg(g.hidden ORDER BY g.step, g.time) END
FROM g JOIN o USING (series_id, k, tb)
GROUP BY g.series_id, g.k, g.tb, o.t0;
TRUNCATE scalar_rows;
