-- steplog schema v7: run ids are per workspace.
-- A run is (workspace, run_id): the same run id can be created in two
-- workspaces, as two runs that know nothing of each other, and a run id used
-- in one workspace neither blocks nor reveals anything in another (before,
-- runs.run_id was a global key, and CreateRun answered ALREADY_EXISTS "run id
-- ... is taken" for an id of another workspace).
--
-- Design: a composite key (workspace, run_id), carried by every table that
-- refers to a run (series, artifacts, a run's parent), rather than an
-- internal surrogate run key. Why:
-- - The tenant is part of every reference, so the database itself keeps a
--   series, a file or a child run inside its run's workspace (the foreign
--   keys include the workspace: a row cannot point across workspaces).
-- - Every lookup the API makes is already by (workspace, run_id); with the
--   workspace in the referencing rows, a query over series or files is
--   scoped by its own columns and the unique indexes, with no join through
--   runs and no id to resolve first (the write path looks series up by
--   (workspace, run_id, name, labels_key) directly).
-- - Points refer to series by series_id (a surrogate already), so the
--   extra text lives only in the series, artifacts and runs rows, never in
--   the hypertables.
-- - It upgrades in place with a fill from runs, without rewriting ids.
-- The writer tables (004) are per (workspace, writer_id) already; quotas and
-- blob touches (006) are per workspace or per blob and refer to no run.
--
-- Upgrades a v6 database in place: run ids were unique, so (workspace, run_id)
-- is unique too, and each series and file takes its run's workspace.

ALTER TABLE series ADD COLUMN workspace text;
UPDATE series s SET workspace = r.workspace FROM runs r WHERE r.run_id = s.run_id;
ALTER TABLE series ALTER COLUMN workspace SET NOT NULL;

ALTER TABLE artifacts ADD COLUMN workspace text;
UPDATE artifacts a SET workspace = r.workspace FROM runs r WHERE r.run_id = a.run_id;
ALTER TABLE artifacts ALTER COLUMN workspace SET NOT NULL;

-- The references to the old key go first, then the key itself.
ALTER TABLE series DROP CONSTRAINT series_run_id_fkey;
ALTER TABLE artifacts DROP CONSTRAINT artifacts_run_id_fkey;
ALTER TABLE runs DROP CONSTRAINT runs_parent_run_id_fkey;
ALTER TABLE runs DROP CONSTRAINT runs_pkey;
ALTER TABLE runs ADD PRIMARY KEY (workspace, run_id);

-- A parent is a run of the same workspace (a run without a parent has a NULL
-- parent_run_id, which the key does not check).
ALTER TABLE runs ADD CONSTRAINT runs_parent_fkey
    FOREIGN KEY (workspace, parent_run_id) REFERENCES runs (workspace, run_id);
DROP INDEX runs_parent_idx;
CREATE INDEX runs_parent_idx ON runs (workspace, parent_run_id) WHERE parent_run_id IS NOT NULL;
DROP INDEX runs_root_idx;
CREATE INDEX runs_root_idx ON runs (workspace, root_run_id);

ALTER TABLE series DROP CONSTRAINT series_run_id_name_labels_key_key;
ALTER TABLE series ADD CONSTRAINT series_run_key
    UNIQUE (workspace, run_id, name, labels_key);
ALTER TABLE series ADD CONSTRAINT series_run_fkey
    FOREIGN KEY (workspace, run_id) REFERENCES runs (workspace, run_id);

ALTER TABLE artifacts DROP CONSTRAINT artifacts_pkey;
ALTER TABLE artifacts ADD PRIMARY KEY (workspace, run_id, path);
ALTER TABLE artifacts ADD CONSTRAINT artifacts_run_fkey
    FOREIGN KEY (workspace, run_id) REFERENCES runs (workspace, run_id);
