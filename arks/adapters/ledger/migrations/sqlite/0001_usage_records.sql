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
    ttft_s REAL,
    quota TEXT,
    admitted_at TEXT,
    cost_micros INTEGER
);
-- The report queries: a time range (narrowing to namespaces, users or models filters within it:
-- a one-machine ledger; every index more costs each insert, on the gateway's CPU).
CREATE INDEX usage_records_time ON usage_records (time);
-- Rebuilding a quota's budgets: its records by admission time.
CREATE INDEX usage_records_quota_admitted ON usage_records (quota, admitted_at);
