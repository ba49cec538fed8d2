-- The analytics component as its migrations (001 to 005) leave it, written so that it can
-- run again at any time: `migrate` runs it when an object the migrations made is missing
-- (a dropped schema, table, trigger or grant) and creates only what is not there. Kept
-- equal to the migrations by a test that compares a healed database with a fresh one.
CREATE SCHEMA IF NOT EXISTS analytics;
CREATE SCHEMA IF NOT EXISTS crm_analytics;
REVOKE ALL ON SCHEMA crm_analytics FROM PUBLIC;

CREATE TABLE IF NOT EXISTS analytics.daily_account_metrics (
    account_id uuid,
    date date,
    leads_created bigint NOT NULL DEFAULT 0,
    leads_converted bigint NOT NULL DEFAULT 0,
    activities bigint NOT NULL DEFAULT 0,
    deals_won bigint NOT NULL DEFAULT 0,
    revenue_won numeric NOT NULL DEFAULT 0,
    CONSTRAINT daily_account_metrics_key UNIQUE NULLS NOT DISTINCT (account_id, date)
);

CREATE TABLE IF NOT EXISTS analytics.lead_funnel_metrics (
    cohort_date date,
    source text,
    new bigint NOT NULL DEFAULT 0,
    contacted bigint NOT NULL DEFAULT 0,
    qualified bigint NOT NULL DEFAULT 0,
    converted bigint NOT NULL DEFAULT 0,
    lost bigint NOT NULL DEFAULT 0,
    total bigint NOT NULL DEFAULT 0,
    CONSTRAINT lead_funnel_metrics_key UNIQUE NULLS NOT DISTINCT (cohort_date, source)
);

CREATE TABLE IF NOT EXISTS analytics.revenue_metrics (
    account_id uuid,
    month date,
    deals_won bigint NOT NULL DEFAULT 0,
    revenue numeric NOT NULL DEFAULT 0,
    CONSTRAINT revenue_metrics_key UNIQUE NULLS NOT DISTINCT (account_id, month)
);

CREATE TABLE IF NOT EXISTS analytics.event_counts (
    date date NOT NULL,
    table_name text NOT NULL,
    operation text NOT NULL CHECK (operation IN ('insert', 'update', 'delete', 'snapshot')),
    processed bigint NOT NULL DEFAULT 0,
    failed bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (date, table_name, operation)
);

CREATE TABLE IF NOT EXISTS crm_analytics.applied_events (
    event_id uuid PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS applied_events_applied_at_brin
    ON crm_analytics.applied_events USING brin (applied_at);

CREATE TABLE IF NOT EXISTS crm_analytics.failed_events (
    event_id uuid PRIMARY KEY,
    event_type text NOT NULL,
    aggregate_id uuid,
    xid bigint,
    created_at timestamptz,
    payload jsonb,
    raw_message text,
    error_message text NOT NULL,
    retry_count integer NOT NULL,
    failed_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS crm_analytics.retried_events (
    event_id uuid PRIMARY KEY,
    retried_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS crm_analytics.snapshot_watermark (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    snapshot text NOT NULL,
    taken_at timestamptz NOT NULL
);

CREATE TABLE IF NOT EXISTS crm_analytics.latency_histogram (
    minute timestamptz NOT NULL,
    bucket integer NOT NULL,
    events bigint NOT NULL,
    PRIMARY KEY (minute, bucket)
);

CREATE OR REPLACE FUNCTION analytics.notify_aggregates_changed() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    PERFORM pg_notify('crm_analytics_aggregates', '');
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER notify_aggregates_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON analytics.daily_account_metrics
    FOR EACH STATEMENT EXECUTE FUNCTION analytics.notify_aggregates_changed();
CREATE OR REPLACE TRIGGER notify_aggregates_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON analytics.lead_funnel_metrics
    FOR EACH STATEMENT EXECUTE FUNCTION analytics.notify_aggregates_changed();
CREATE OR REPLACE TRIGGER notify_aggregates_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON analytics.revenue_metrics
    FOR EACH STATEMENT EXECUTE FUNCTION analytics.notify_aggregates_changed();
CREATE OR REPLACE TRIGGER notify_aggregates_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON analytics.event_counts
    FOR EACH STATEMENT EXECUTE FUNCTION analytics.notify_aggregates_changed();

DO $$
BEGIN
    CREATE ROLE analytics_reader NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL; -- roles are cluster-wide: it may exist already
END
$$;
GRANT USAGE ON SCHEMA analytics TO analytics_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA analytics TO analytics_reader;
ALTER DEFAULT PRIVILEGES IN SCHEMA analytics GRANT SELECT ON TABLES TO analytics_reader;
