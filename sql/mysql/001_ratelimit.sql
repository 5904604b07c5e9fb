-- ratelimit-policyd: quota table for MySQL / MariaDB.
--
-- This is the table of the Perl ratelimit-policyd (onlime/ratelimit-policyd,
-- mysql-schema.sql), column for column, so that an existing table and its rows are used
-- as they are: the Python daemon needs no ALTER on a database the Perl daemon used.
--
-- How to apply it (as a user allowed to create databases and users):
--
--   CREATE DATABASE policyd;
--   CREATE USER policyd@'localhost' IDENTIFIED BY '********';
--   GRANT SELECT, INSERT, UPDATE, DELETE ON policyd.* TO policyd@'localhost';
--   -- then, from the shell:
--   mariadb policyd < sql/mysql/001_ratelimit.sql
--
-- or let the daemon do it: `ratelimit-policyd init-db` (needs CREATE and CREATE VIEW
-- once; the daemon itself only ever needs the four grants above, as the Perl one did).
-- The file is idempotent: running it again changes nothing.
--
-- Notes on the columns:
--   sender   the key (SASL username, or its domain); utf8_bin: compared byte for byte,
--            so the daemon lower-cases keys itself. Note that utf8 here is MySQL's
--            3-byte utf8 (utf8mb3): a key with a 4-byte character (emoji) is refused.
--   quota    recipients allowed per window; 0 blocks the key.
--   used     recipients counted in the current window (the daemon only ever adds to it
--            or resets it, in one statement: never a value read earlier).
--   expiry   Unix time at which the window ends; NULL or 0 (rows written by old
--            versions) count as expired.
--   persist  1 keeps `quota` when the window resets; 0 puts the default quota back.

CREATE TABLE IF NOT EXISTS `ratelimit` (
    `id`      INT(11)          NOT NULL AUTO_INCREMENT,
    `sender`  VARCHAR(255) CHARACTER SET 'utf8' COLLATE 'utf8_bin' NOT NULL
              COMMENT 'sender address (SASL username)',
    `persist` TINYINT(1)       NOT NULL DEFAULT '0'
              COMMENT 'Do not reset the given quota to the default value after expiry reached.',
    `quota`   INT(10) UNSIGNED NOT NULL DEFAULT '0'
              COMMENT 'hourly|daily|weekly|monthly recipient quota limit',
    `used`    INT(10) UNSIGNED NOT NULL DEFAULT '0'
              COMMENT 'current recipient counter',
    `updated` TIMESTAMP        NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP
              COMMENT 'when used counter was last updated',
    `expiry`  INT(10) UNSIGNED DEFAULT NULL
              COMMENT 'expiry (Unix-timestamp) after which the counter gets reset',
    PRIMARY KEY (`id`),
    UNIQUE INDEX `idx_sender` (`sender` ASC)
) ENGINE = InnoDB DEFAULT CHARACTER SET = utf8;

-- The same rows with `expiry` as a date, for people reading the table by hand.
CREATE OR REPLACE VIEW `view_ratelimit` AS
    SELECT id, sender, persist, quota, used, updated, FROM_UNIXTIME(expiry) AS expiry
    FROM ratelimit;
