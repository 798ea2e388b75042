-- The W3C trace context (`traceparent`) of the change that wrote an outbox row, so the relay's
-- publish continues that trace. Nullable, no default: adding it rewrites nothing and old rows
-- (and rows written with traces off) simply have none.
SET LOCAL lock_timeout = '5s';
SET LOCAL statement_timeout = '60s';

ALTER TABLE outbox ADD COLUMN IF NOT EXISTS traceparent text;
