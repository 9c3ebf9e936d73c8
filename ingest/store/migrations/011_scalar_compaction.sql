-- Compaction of numeric scalars (issue 13, after 010_scalar_blocks).
--
-- A commit stores a series' points as one block when it brings at least
-- ingest.store.blocks.MIN_BLOCK_POINTS of them, and as rows of scalar_rows
-- otherwise: a training loop that logs a few points a second per series
-- would make blocks of one or two points, each costing ~270 bytes of row,
-- index and array headers. The service's compaction sweep
-- (ingest/store/compact.py) then moves a series' rows, and its small blocks
-- (fewer than 1024 points), into full blocks, so a series costs about 12
-- bytes a point whatever the rate it was logged at.
--
-- Blocks made here hold the points of one series and one 2,000-second cell
-- of time (floor(epoch / 2000)), at most 4096 of them, in (step, time)
-- order: every time offset fits in int4 microseconds, and two small blocks
-- of a series can be merged exactly when they start in the same cell.

-- The small blocks, found without reading the large ones.
CREATE INDEX scalar_blocks_small_idx ON scalar_blocks (series_id, min_time) WHERE n < 1024;

-- Compact the series `ids`: their rows, and their small blocks in every cell
-- that holds one of those rows or two small blocks or more, become full
-- blocks. At most `most_rows` rows per series (those of its lowest steps;
-- all rows of one step together) and `most_blocks` small blocks per series
-- (the earliest) are taken, so one call's work is bounded however far
-- behind compaction is; what is left is taken by the next call. One
-- statement, so it moves exactly the rows and blocks it read (a row or
-- block committed meanwhile stays for the next round). The caller holds the
-- series rows locked (FOR UPDATE), as every writer, rewind and deletion of
-- those series does first, so no point is hidden, written or deleted under
-- it. Returns per series the points moved, and the rows and blocks taken
-- and the blocks made.
CREATE FUNCTION scalar_compact(ids bigint[], most_rows integer, most_blocks integer)
RETURNS TABLE (series_id bigint, points bigint, rows_in bigint, blocks_in bigint, blocks_out bigint)
LANGUAGE sql VOLATILE AS $$
    WITH lim AS (
        -- The last step taken per series: everything below the row at
        -- offset most_rows, or that one step alone when all of those rows
        -- share it; one inclusive bound, so the DELETE is an index range scan.
        SELECT q.sid,
               CASE WHEN q.bound IS NULL THEN 9223372036854775807
                    WHEN q.bound = q.first_step THEN q.bound
                    ELSE q.bound - 1 END AS upto
        FROM (
            SELECT i.sid,
                   (SELECT y.step FROM scalar_rows y WHERE y.series_id = i.sid
                    ORDER BY y.step OFFSET most_rows LIMIT 1) AS bound,
                   (SELECT z.step FROM scalar_rows z WHERE z.series_id = i.sid
                    ORDER BY z.step LIMIT 1) AS first_step
            FROM unnest(ids) AS i(sid)
        ) q
    ), r AS (
        DELETE FROM scalar_rows x USING lim
        WHERE x.series_id = lim.sid AND x.step <= lim.upto
        RETURNING x.series_id, x.step, x.time, x.value, x.hidden
    ), cells AS (
        SELECT DISTINCT r.series_id, floor(extract(epoch FROM r.time) / 2000)::bigint AS tb FROM r
        UNION
        SELECT b.series_id, floor(extract(epoch FROM b.min_time) / 2000)::bigint
        FROM scalar_blocks b WHERE b.series_id = ANY(ids) AND b.n < 1024
        GROUP BY 1, 2 HAVING count(*) >= 2
    ), picked AS (
        SELECT q.block_id FROM (
            SELECT b.block_id, row_number() OVER (PARTITION BY b.series_id ORDER BY b.min_time) AS k
            FROM scalar_blocks b JOIN cells c
              ON b.series_id = c.series_id
             AND floor(extract(epoch FROM b.min_time) / 2000)::bigint = c.tb
            WHERE b.series_id = ANY(ids) AND b.n < 1024
        ) q WHERE q.k <= most_blocks
    ), bo AS (
        DELETE FROM scalar_blocks b USING picked
        WHERE b.series_id = ANY(ids) AND b.block_id = picked.block_id
        RETURNING b.series_id, b.min_time, b.min_step, b.steps, b.offsets, b.values, b.hidden
    ), p AS (
        SELECT r.series_id, r.step, r.time, r.value, r.hidden, 1 AS from_rows FROM r
        UNION ALL
        SELECT bo.series_id, coalesce(u.s, bo.min_step + (u.o - 1)),
               bo.min_time + u.dt * interval '1 microsecond', u.v, coalesce(u.h, false), 0
        FROM bo, LATERAL unnest(bo.steps, bo.offsets, bo.values, bo.hidden)
                 WITH ORDINALITY AS u(s, dt, v, h, o)
    ), g AS (
        SELECT p.*, floor(extract(epoch FROM p.time) / 2000)::bigint AS tb,
               (row_number() OVER (PARTITION BY p.series_id, floor(extract(epoch FROM p.time) / 2000)
                                   ORDER BY p.step, p.time) - 1) / 4096 AS k
        FROM p
    ), o AS (
        SELECT g.series_id, g.tb, g.k, min(g.time) AS t0 FROM g GROUP BY 1, 2, 3
    ), made AS (
        INSERT INTO scalar_blocks (series_id, min_time, max_time, min_step, max_step, n,
                                   hidden_count, nan_count, min_value, max_value, last_value,
                                   steps, offsets, values, hidden)
        SELECT g.series_id, o.t0, max(g.time), min(g.step), max(g.step), count(*)::int,
               count(*) FILTER (WHERE g.hidden)::int, count(*) FILTER (WHERE g.value = 'NaN')::int,
               min(g.value) FILTER (WHERE g.value <> 'NaN'),
               max(g.value) FILTER (WHERE g.value <> 'NaN'),
               (array_agg(g.value ORDER BY g.step, g.time))[count(*)],
               CASE WHEN max(g.step)::numeric - min(g.step) + 1 = count(*)
                         AND count(DISTINCT g.step) = count(*)
                    THEN NULL ELSE array_agg(g.step ORDER BY g.step, g.time) END,
               array_agg(round(extract(epoch FROM g.time - o.t0) * 1000000)::int
                         ORDER BY g.step, g.time),
               array_agg(g.value ORDER BY g.step, g.time),
               CASE WHEN bool_or(g.hidden) THEN array_agg(g.hidden ORDER BY g.step, g.time) END
        FROM g JOIN o USING (series_id, tb, k)
        GROUP BY g.series_id, g.tb, g.k, o.t0
        RETURNING scalar_blocks.series_id, scalar_blocks.n
    ), taken AS (
        SELECT p.series_id, count(*) AS points, sum(p.from_rows) AS rows_in FROM p GROUP BY 1
    ), bin AS (
        SELECT bo.series_id, count(*) AS blocks_in FROM bo GROUP BY 1
    ), bout AS (
        SELECT made.series_id, count(*) AS blocks_out FROM made GROUP BY 1
    )
    SELECT t.series_id, t.points, t.rows_in, coalesce(bin.blocks_in, 0), coalesce(bout.blocks_out, 0)
    FROM taken t LEFT JOIN bin USING (series_id) LEFT JOIN bout USING (series_id)
$$;

-- Series with something to compact: rows, or two small blocks in one cell.
-- At most `lim`, in series_id order from `after` on (a round resumes there).
CREATE FUNCTION scalar_compact_candidates(after bigint, lim integer)
RETURNS TABLE (series_id bigint)
LANGUAGE sql STABLE AS $$
    SELECT s.series_id FROM (
        SELECT DISTINCT r.series_id FROM scalar_rows r WHERE r.series_id > after
        UNION
        SELECT b.series_id FROM scalar_blocks b WHERE b.n < 1024 AND b.series_id > after
        GROUP BY b.series_id, floor(extract(epoch FROM b.min_time) / 2000) HAVING count(*) >= 2
    ) s ORDER BY s.series_id LIMIT lim
$$;
