-- ourvidz-serve initial schema: the seed platform's jobs, images and videos tables, plus the
-- columns the PostgreSQL-backed queue needs. Released migrations are never edited.
--
-- user_id and project_id are plain UUIDs here. Where these tables live in the platform's own
-- database (Supabase), add the seed's foreign keys with a later migration:
--   ALTER TABLE jobs   ADD CONSTRAINT jobs_user_fk    FOREIGN KEY (user_id)    REFERENCES auth.users(id);
--   ALTER TABLE jobs   ADD CONSTRAINT jobs_project_fk FOREIGN KEY (project_id) REFERENCES projects(id);
--   ALTER TABLE images ADD CONSTRAINT images_user_fk  FOREIGN KEY (user_id)    REFERENCES auth.users(id) ON DELETE CASCADE;
--   ALTER TABLE videos ADD CONSTRAINT videos_user_fk  FOREIGN KEY (user_id)    REFERENCES auth.users(id) ON DELETE CASCADE;

CREATE TABLE jobs (
    id               UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id          UUID NOT NULL,
    job_type         TEXT NOT NULL,
    format           TEXT NOT NULL,
    quality          TEXT NOT NULL,
    model_type       TEXT NOT NULL,
    queue            TEXT NOT NULL,
    status           TEXT NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'processing', 'completed', 'failed', 'cancelled')),
    metadata         JSONB NOT NULL DEFAULT '{}',
    project_id       UUID,
    video_id         UUID,
    image_id         UUID,
    attempts         INTEGER NOT NULL DEFAULT 0,
    idempotency_key  TEXT,
    request_hash     TEXT,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    started_at       TIMESTAMPTZ,
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    completed_at     TIMESTAMPTZ,
    error_message    TEXT
);

CREATE INDEX jobs_queued_idx ON jobs (queue, created_at, id) WHERE status = 'queued';
CREATE INDEX jobs_user_created_idx ON jobs (user_id, created_at DESC, id DESC);
CREATE INDEX jobs_created_idx ON jobs (created_at DESC, id DESC);
CREATE UNIQUE INDEX jobs_idempotency_idx ON jobs (user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE images (
    id               UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id          UUID NOT NULL,
    project_id       UUID,
    job_id           UUID NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    image_index      INTEGER NOT NULL DEFAULT 0,
    prompt           TEXT NOT NULL,
    title            TEXT,
    image_url        TEXT,
    thumbnail_url    TEXT,
    status           TEXT NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'processing', 'completed', 'failed', 'cancelled')),
    quality          TEXT,
    format           TEXT NOT NULL DEFAULT 'png',
    generation_mode  TEXT NOT NULL DEFAULT 'standalone',
    metadata         JSONB NOT NULL DEFAULT '{}',
    created_at       TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    completed_at     TIMESTAMPTZ,
    UNIQUE (job_id, image_index)
);

CREATE TABLE videos (
    id                     UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id                UUID NOT NULL,
    project_id             UUID,
    job_id                 UUID NOT NULL UNIQUE REFERENCES jobs(id) ON DELETE CASCADE,
    prompt                 TEXT NOT NULL,
    title                  TEXT,
    video_url              TEXT,
    thumbnail_url          TEXT,
    signed_url             TEXT,
    signed_url_expires_at  TIMESTAMPTZ,
    status                 TEXT NOT NULL DEFAULT 'queued'
                           CHECK (status IN ('queued', 'processing', 'completed', 'failed', 'cancelled')),
    quality                TEXT,
    format                 TEXT NOT NULL DEFAULT 'mp4',
    generation_mode        TEXT NOT NULL DEFAULT 'standalone',
    metadata               JSONB NOT NULL DEFAULT '{}',
    created_at             TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    updated_at             TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    completed_at           TIMESTAMPTZ
);
