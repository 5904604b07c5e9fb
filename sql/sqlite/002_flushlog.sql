-- ratelimit-policyd: which spooled counts are in the database already (SQLite).
--
-- Counts that could not be written at a stop (database unreachable) are spooled to
-- <state_dir>/pending-counts.jsonl; the next start writes them, recording the spool
-- section's name here in the same transaction, and removes the file afterwards. A
-- crash between the two leaves the file, and this row tells the following start that
-- the counts are written already. Rows are removed once their file is gone.
--
-- The daemon creates this table itself (also in a file made before it existed).
-- Idempotent.

CREATE TABLE IF NOT EXISTS "ratelimit_flushlog" (
    "daemon"  TEXT    NOT NULL PRIMARY KEY,
    "seq"     INTEGER NOT NULL,
    "updated" TEXT    NOT NULL DEFAULT CURRENT_TIMESTAMP
);
