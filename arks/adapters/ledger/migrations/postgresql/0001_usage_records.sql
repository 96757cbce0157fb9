-- The usage ledger (issue 13): one row per finished request. Columns are UsageRecord's fields.
--
-- usage_records is range-partitioned by month on `time` (partitions usage_records_yYYYYmMM are
-- created by the store: ahead at start-up, and on demand for a record whose month has none).
-- Retention drops whole partitions (PostgresLedger.drop_before).
--
-- Idempotency: a unique index on a partitioned table must contain the partition key, so
-- (request_id, time) cannot stop the same request id arriving with another time (another
-- replica's clock, a month boundary). usage_request_ids holds every stored request id once
-- (not partitioned, primary key request_id); a batch is inserted there first with ON CONFLICT
-- DO NOTHING, and only the ids it returns go into usage_records, in the same transaction.
CREATE TABLE usage_records (
    time timestamptz NOT NULL,
    request_id text NOT NULL,
    namespace text NOT NULL,
    "user" text NOT NULL,
    model text NOT NULL,
    engine text NOT NULL,
    path text NOT NULL,
    status integer NOT NULL,
    prompt_tokens bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    cost double precision,
    source text NOT NULL CHECK (source IN ('reported', 'estimated')),
    estimate_reason text,
    duration_s double precision,
    ttft_s double precision,
    PRIMARY KEY (request_id, time)
) PARTITION BY RANGE (time);

CREATE TABLE usage_request_ids (
    request_id text PRIMARY KEY,
    time timestamptz NOT NULL
);

-- The report queries: a time range (records arrive nearly in time order: BRIN is tiny and
-- cheap to keep), optionally narrowed to namespaces (and users) or models.
CREATE INDEX usage_records_time ON usage_records USING brin (time);
CREATE INDEX usage_records_namespace_user_time ON usage_records (namespace, "user", time);
CREATE INDEX usage_records_model_time ON usage_records (model, time);
