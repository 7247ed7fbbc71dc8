-- The LoRA registry's statements (migration 0009), by name. Loaded by
-- ourvidz_serve.persistence.queries; the repository is the only code that runs them.

-- name: insert_lora
-- A new live name. The partial unique index refuses a second live row of one name: the
-- repository answers 409.
-- $1 name, $2 digest, $3 storage key, $4 rank, $5 size, $6 format, $7 dtype, $8 targets,
-- $9 who uploaded it.
INSERT INTO loras (name, digest, storage_key, rank, size_bytes, format, dtype, targets,
                   created_by)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
RETURNING {lora_columns};

-- name: list_loras
-- The live registry, by name.
SELECT {lora_columns} FROM loras WHERE retired_at IS NULL ORDER BY name;

-- name: live_loras
-- The live rows of the names given ($1 text[]); a name missing from the answer is unknown or
-- retired.
SELECT {lora_columns} FROM loras WHERE retired_at IS NULL AND name = ANY($1::text[]);

-- name: retire_lora
-- Retire a live name ($1). Its row and file stay: jobs already queued with it still run.
UPDATE loras SET retired_at = clock_timestamp()
 WHERE name = $1 AND retired_at IS NULL
RETURNING {lora_columns};
