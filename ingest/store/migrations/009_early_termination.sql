-- steplog schema v9: early-termination policies of sweeps (parent runs).
-- One policy per parent run; the service evaluates it as the children's
-- points of the primary metric are committed (ingest/write/sweeps.py) and
-- records why a child was cancelled in the child's properties
-- ("steplog.early_termination.reason" / ".interval"), so nothing else is
-- stored per child.
CREATE TABLE early_termination_policies (
    workspace   text        NOT NULL,
    run_id      text        NOT NULL,                -- the parent run
    policy      jsonb       NOT NULL,                -- ingest/store/sweeps.py policy_to_json
    labels_key  text        NOT NULL DEFAULT '',     -- canonical labels of the primary metric's series
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace, run_id),
    FOREIGN KEY (workspace, run_id) REFERENCES runs (workspace, run_id) ON DELETE CASCADE
);
