-- ratelimit-policyd: quota table for SQLite (the embedded default).
--
-- The daemon creates this itself on first start (the database file and its directory
-- included), so applying the file by hand is only needed to prepare a file in advance:
--
--   sqlite3 /var/lib/ratelimit-policyd/ratelimit.sqlite3 < sql/sqlite/001_ratelimit.sql
--
-- The columns are those of the MySQL table (sql/mysql/001_ratelimit.sql), so rows can
-- move between the two. The CHECK constraints make SQLite refuse what MySQL's strict
-- mode refuses (a key longer than VARCHAR(255), a value outside INT UNSIGNED), so a
-- bad key is dropped the same way on both backends. Idempotent.

CREATE TABLE IF NOT EXISTS "ratelimit" (
    "id"      INTEGER PRIMARY KEY,
    "sender"  TEXT    NOT NULL UNIQUE CHECK (length("sender") <= 255),
    "persist" INTEGER NOT NULL DEFAULT 0,
    "quota"   INTEGER NOT NULL DEFAULT 0 CHECK ("quota" BETWEEN 0 AND 4294967295),
    "used"    INTEGER NOT NULL DEFAULT 0 CHECK ("used" BETWEEN 0 AND 4294967295),
    "updated" TEXT    NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "expiry"  INTEGER          DEFAULT NULL CHECK ("expiry" BETWEEN 0 AND 4294967295)
);

-- The same rows with "expiry" as a local date, as the MySQL view shows them.
CREATE VIEW IF NOT EXISTS "view_ratelimit" AS
    SELECT id, sender, persist, quota, used, updated,
           datetime(expiry, 'unixepoch', 'localtime') AS expiry
    FROM "ratelimit";
