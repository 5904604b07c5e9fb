-- Optional, recommended: makes every flush idempotent.
--
-- Each daemon records the sequence number of its last committed flush here, in the
-- same transaction as the counts. When the connection breaks exactly while the server
-- answers a flush's COMMIT, the daemon reads its row to learn whether the counts were
-- written, instead of writing them again (which would count them twice). Without this
-- table the daemon works as before and that one fault can double a flush.
--
-- Needs CREATE once (e.g. `ratelimit-policyd init-db`, or as the database owner):
--   mysql policyd < sql/mysql/002_flushlog.sql
-- The daemon itself still needs only SELECT, INSERT, UPDATE, DELETE on the database.
-- Rows are one per running daemon and are removed when it stops.

CREATE TABLE IF NOT EXISTS `ratelimit_flushlog` (
    `daemon` VARCHAR(64) NOT NULL COMMENT 'one running daemon (random per start)',
    `seq` BIGINT UNSIGNED NOT NULL COMMENT 'its last committed flush',
    `updated` TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
    PRIMARY KEY (`daemon`)
) ENGINE = InnoDB;
