-- Per-request SDXL LoRAs: the registry, and the adapters each job names. Released
-- migrations are never edited.

-- The registry (POST/GET/DELETE /v1/loras). A file is stored once, under its content's sha256
-- in the `loras` bucket; a name points at one. Retiring a name (DELETE) keeps its row and its
-- file: jobs already queued with it still run, new jobs naming it are refused. A retired name
-- may be uploaded again, as a new row.
CREATE TABLE loras (
    id          UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    name        TEXT NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'),
    digest      TEXT NOT NULL CHECK (digest ~ '^[0-9a-f]{64}$'),
    storage_key TEXT NOT NULL,
    rank        INTEGER NOT NULL CHECK (rank > 0),
    size_bytes  BIGINT NOT NULL CHECK (size_bytes > 0),
    format      TEXT NOT NULL CHECK (format IN ('kohya', 'diffusers')),
    dtype       TEXT NOT NULL,
    targets     TEXT[] NOT NULL,
    created_by  TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    retired_at  TIMESTAMPTZ
);
-- One live row per name; what a submission looks up.
CREATE UNIQUE INDEX loras_live_name_idx ON loras (name) WHERE retired_at IS NULL;

-- The content digests of the LoRAs a job applies (empty: none). A claim prefers, among the
-- head of the fair order, jobs whose adapters the claiming replica already holds
-- (`adapters <@ held`). A constant default is kept in the catalog (PostgreSQL 11+): the
-- table is not rewritten, and existing rows name no adapters.
ALTER TABLE jobs ADD COLUMN adapters TEXT[] NOT NULL DEFAULT '{}';
