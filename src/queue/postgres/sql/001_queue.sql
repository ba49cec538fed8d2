-- The embedded queue, version 1: its table in the analytics database.
-- IF NOT EXISTS: installations from before the queue had migrations of its own got the
-- same table from analytics migration 1, and keep it (and its rows) as it is.
CREATE SCHEMA IF NOT EXISTS crm_analytics;
REVOKE ALL ON SCHEMA crm_analytics FROM PUBLIC;

CREATE TABLE IF NOT EXISTS crm_analytics.queue (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id uuid NOT NULL,
    body text NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    available_at timestamptz NOT NULL DEFAULT now(),
    last_error text
);
-- Every row is inserted once and deleted once: vacuum early, so that claims do not scan
-- through dead rows (the workers vacuum it too, every CRM_ANALYTICS_VACUUM_INTERVAL).
ALTER TABLE crm_analytics.queue SET (
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0.0,
    autovacuum_vacuum_insert_threshold = 50000
);
