-- steplog schema v4: writer progress per (workspace, writer), the outcome of
-- each writer's last batches, and expiry of idle writers.
-- Upgrades a v3 database in place: a writer_id was unique before, so it is
-- unique within its workspace too.

-- A writer is (workspace, writer_id): a writer id used in two workspaces is
-- two writers, and neither can move the other's high-water mark.
ALTER TABLE writers DROP CONSTRAINT writers_pkey;
ALTER TABLE writers ADD PRIMARY KEY (workspace, writer_id);

-- The retention sweep deletes writers idle since before a cutoff, oldest first.
CREATE INDEX writers_updated_idx ON writers (updated_at);

-- What the commit of each of a writer's last batches decided (accepted,
-- duplicates, rejected, by reason, the first rejected points), written in the
-- transaction that stored its points, so a batch that arrives again (its
-- acknowledgement was lost) is answered with the original result. The service
-- keeps the last few per writer (ingest/store/timescale.py OUTCOMES_KEPT), each
-- bounded in bytes; they go with their writer when it expires.
CREATE TABLE writer_batches (
    workspace  text   NOT NULL,
    writer_id  text   NOT NULL,
    sequence   bigint NOT NULL,
    result     bytea  NOT NULL,   -- compact JSON, see timescale.encode_outcome
    PRIMARY KEY (workspace, writer_id, sequence),
    FOREIGN KEY (workspace, writer_id) REFERENCES writers ON DELETE CASCADE
);
