-- Analytics, version 1: the aggregate tables (schema analytics, for BI tools) and the
-- pipeline's own bookkeeping (schema crm_analytics, private). The embedded queue's table
-- is the queue backend's own migration (src/queue/postgres/sql); installations migrated
-- before that got it from this file, which does not run again once applied.
CREATE SCHEMA IF NOT EXISTS analytics;
CREATE SCHEMA IF NOT EXISTS crm_analytics;
REVOKE ALL ON SCHEMA crm_analytics FROM PUBLIC;

CREATE TABLE analytics.daily_account_metrics (
    account_id uuid NOT NULL,
    date date NOT NULL,
    leads_created bigint NOT NULL DEFAULT 0,
    leads_converted bigint NOT NULL DEFAULT 0,
    activities bigint NOT NULL DEFAULT 0,
    deals_won bigint NOT NULL DEFAULT 0,
    revenue_won numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (account_id, date)
);

CREATE TABLE analytics.lead_funnel_metrics (
    cohort_date date NOT NULL,
    source text NOT NULL,
    new bigint NOT NULL DEFAULT 0,
    contacted bigint NOT NULL DEFAULT 0,
    qualified bigint NOT NULL DEFAULT 0,
    converted bigint NOT NULL DEFAULT 0,
    lost bigint NOT NULL DEFAULT 0,
    total bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (cohort_date, source)
);

-- month is the first day of the month of closed_at (UTC).
CREATE TABLE analytics.revenue_metrics (
    account_id uuid NOT NULL,
    month date NOT NULL,
    deals_won bigint NOT NULL DEFAULT 0,
    revenue numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (account_id, month)
);

CREATE TABLE analytics.event_counts (
    date date NOT NULL,
    table_name text NOT NULL,
    operation text NOT NULL CHECK (operation IN ('insert', 'update', 'delete', 'snapshot')),
    processed bigint NOT NULL DEFAULT 0,
    failed bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (date, table_name, operation)
);

-- Idempotency ledger: an event id is recorded in the same transaction as its effect.
CREATE TABLE crm_analytics.applied_events (
    event_id uuid PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX applied_events_applied_at_brin ON crm_analytics.applied_events USING brin (applied_at);

-- Poison events, parked after the last attempt; `crm-analytics failed` inspects and replays them.
CREATE TABLE crm_analytics.failed_events (
    event_id uuid PRIMARY KEY,
    event_type text NOT NULL,
    aggregate_id uuid,
    xid bigint,
    created_at timestamptz,
    payload jsonb,            -- the event's payload, editable before a retry
    raw_message text,         -- the message as received, when it was not even an event
    error_message text NOT NULL,
    retry_count integer NOT NULL,
    failed_at timestamptz NOT NULL DEFAULT now()
);

-- The CRM snapshot the aggregates were last rebuilt from: events it already saw are skipped.
CREATE TABLE crm_analytics.snapshot_watermark (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    snapshot text NOT NULL,
    taken_at timestamptz NOT NULL
);

-- Commit-to-applied latency, as a histogram per minute (bucket = ceil(log_1.25(ms))).
CREATE TABLE crm_analytics.latency_histogram (
    minute timestamptz NOT NULL,
    bucket integer NOT NULL,
    events bigint NOT NULL,
    PRIMARY KEY (minute, bucket)
);
