-- Job control: the latest progress of a running job, as its worker last recorded it
-- ({"step", "total", "at"}; throttled by the worker). Released migrations are never edited.

ALTER TABLE jobs ADD COLUMN progress JSONB;
