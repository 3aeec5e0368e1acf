-- The example notes service's schema (examples/axum_app.rs).
-- Ids are UUIDs made by the application, never per-shard sequences, so that
-- rows stay identical when a tenant is copied or dual-written to another shard.
CREATE TABLE IF NOT EXISTS notes (
    tenant_id  text        NOT NULL,
    id         uuid        PRIMARY KEY,
    body       text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS notes_tenant_created ON notes (tenant_id, created_at);
