-- no-transaction
-- squawk-ignore-file require-lock-timeout, require-statement-timeout
-- Built CONCURRENTLY so that adding it to a live table blocks no writes; that cannot run in a
-- transaction (hence the first line), and PostgreSQL runs a multi-statement file as one, so
-- this file holds a single statement. lock_timeout is set on the migrating connection by the
-- service (src/db.rs), not here, for the same reason.
CREATE INDEX CONCURRENTLY IF NOT EXISTS orders_created_idx ON orders (created_at DESC, id DESC);
