-- steplog schema v5: bearer tokens (auth=token).
-- A token's text is `stl_<token_id>_<secret>`; only the token id (the lookup
-- key, safe to show) and HMAC-SHA256(pepper, secret) are stored, never the
-- secret. Tokens are revoked, not deleted, so the audit trail keeps them.

CREATE TABLE tokens (
    token_id      text        PRIMARY KEY,
    name          text        NOT NULL DEFAULT '',
    workspace     text        NOT NULL,
    role          text        NOT NULL CHECK (role IN ('reader', 'writer', 'admin')),
    secret_hash   bytea       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    -- who made it: 'cli' or the token id of the admin that called CreateToken
    created_by    text        NOT NULL DEFAULT '',
    expires_at    timestamptz,
    last_used_at  timestamptz,
    revoked_at    timestamptz
);
CREATE INDEX tokens_workspace_idx ON tokens (workspace, created_at);
