-- scalar_points that a join can read series by series (issue 13).
--
-- 010's view was a UNION ALL of scalar_rows and the unpacked blocks. The
-- blocks' half of it (scalar_blocks joined to LATERAL unnest) is two FROM
-- items, so PostgreSQL cannot pull it up into an append relation
-- (is_safe_append_member) and plans it as a subquery scan, into which no join
-- condition is pushed. A join such as
--     FROM scalar_points p JOIN series s USING (series_id) WHERE s.run_id = ...
-- (Grafana's dashboard, ad hoc SQL, tests) therefore unpacked every block of
-- the database, once per matching series when the planner chose a nested
-- loop: minutes on a database of a few million points.
--
-- Here the UNION ALL is of tables only: scalar_blocks, and scalar_rows with
-- each row as a one-point block (steps NULL, offset 0, its value and hidden
-- flag as one-element arrays). Both are single tables, so they become one
-- append relation, and series_id (a plain column of it) is matched by an
-- index scan on each, for constants and join keys alike; then the points
-- are unpacked by one LATERAL unnest. The columns, their order and types, the
-- hidden default and the INSTEAD OF triggers of 010 stay as they were.
CREATE OR REPLACE VIEW scalar_points AS
    SELECT b.min_time + u.dt * interval '1 microsecond' AS "time", b.series_id,
           coalesce(u.s, b.min_step + (u.o - 1)) AS step, u.v AS value,
           coalesce(u.h, false) AS hidden
    FROM (SELECT k.series_id, k.min_step, k.min_time, k.steps, k.offsets, k.values, k.hidden
          FROM scalar_blocks k
          UNION ALL
          SELECT r.series_id, r.step, r.time, NULL::bigint[], ARRAY[0]::integer[],
                 ARRAY[r.value], ARRAY[r.hidden]
          FROM scalar_rows r) b,
         LATERAL unnest(b.steps, b.offsets, b.values, b.hidden) WITH ORDINALITY AS u(s, dt, v, h, o);
