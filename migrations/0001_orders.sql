-- Orders, their lines, the transactional outbox and the consumer's dedup table.
-- Only new tables; secondary indexes are in 0002 (built CONCURRENTLY).
SET LOCAL lock_timeout = '5s';
SET LOCAL statement_timeout = '60s';

CREATE TABLE IF NOT EXISTS orders (
    id uuid PRIMARY KEY,
    customer_id text NOT NULL CHECK (char_length(customer_id) BETWEEN 1 AND 64),
    status text NOT NULL CHECK (status IN ('pending', 'paid', 'payment_failed', 'cancelled', 'expired')),
    total_cents bigint NOT NULL CHECK (total_cents >= 0),
    idempotency_key text UNIQUE CHECK (char_length(idempotency_key) BETWEEN 1 AND 128),
    request_hash text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS order_items (
    order_id uuid NOT NULL REFERENCES orders (id),
    line_no bigint NOT NULL CHECK (line_no >= 0),
    sku text NOT NULL CHECK (char_length(sku) BETWEEN 1 AND 64),
    quantity bigint NOT NULL CHECK (quantity > 0),
    price_cents bigint NOT NULL CHECK (price_cents >= 0),
    PRIMARY KEY (order_id, line_no)
);

CREATE TABLE IF NOT EXISTS outbox (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id uuid NOT NULL UNIQUE,
    aggregate_id uuid NOT NULL,
    event_type text NOT NULL,
    payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    sent_at timestamptz
);

CREATE TABLE IF NOT EXISTS processed_messages (
    message_id text PRIMARY KEY,
    message_type text NOT NULL,
    order_id uuid,
    effect text NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now()
);
