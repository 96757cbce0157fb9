-- The usage ledger (issue 13): one row per finished request, its request id the identity.
-- Columns are UsageRecord's fields. `time` is UTC text 'YYYY-MM-DD HH:MM:SS.ffffff' (fixed
-- width: it sorts and compares as time, and SQLite's date functions read it).
CREATE TABLE usage_records (
    time TEXT NOT NULL,
    request_id TEXT NOT NULL PRIMARY KEY,
    namespace TEXT NOT NULL,
    user TEXT NOT NULL,
    model TEXT NOT NULL,
    engine TEXT NOT NULL,
    path TEXT NOT NULL,
    status INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost REAL,
    source TEXT NOT NULL CHECK (source IN ('reported', 'estimated')),
    estimate_reason TEXT,
    duration_s REAL,
    ttft_s REAL
);
-- The report queries: a time range, optionally narrowed to namespaces (and users) or models.
CREATE INDEX usage_records_time ON usage_records (time);
CREATE INDEX usage_records_namespace_user_time ON usage_records (namespace, user, time);
CREATE INDEX usage_records_model_time ON usage_records (model, time);
