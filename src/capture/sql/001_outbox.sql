-- Capture, version 1: the transactional outbox and the trigger functions that fill it.
-- Everything lives in our own schema, never in `public`, and nobody but its owner may use it.
CREATE SCHEMA IF NOT EXISTS crm_analytics;
REVOKE ALL ON SCHEMA crm_analytics FROM PUBLIC;

-- One row per changed CRM row, written in the same transaction as the change.
-- Rows leave this table when the relay hands them to the queue (no UPDATE, so no bloat
-- from marking); processed_at and retry_count keep the original design's columns.
CREATE TABLE crm_analytics.event_outbox (
    event_id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    event_type text NOT NULL,            -- '<table>.<insert|update|delete>'
    aggregate_id uuid,                   -- the changed row's id
    payload jsonb NOT NULL,              -- {"old": row image|null, "new": row image|null}
    xid xid8 NOT NULL DEFAULT pg_current_xact_id(),  -- lets backfill tell which events its snapshot saw
    created_at timestamptz NOT NULL DEFAULT now(),   -- the writing transaction's start
    processed_at timestamptz,
    retry_count integer NOT NULL DEFAULT 0
);
-- A queue table: vacuum it often and early so deleted rows are reclaimed, not scanned.
ALTER TABLE crm_analytics.event_outbox SET (
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0.0,
    autovacuum_vacuum_insert_threshold = 50000
);

-- Relayed events are copied here only when an outbox retention is configured.
CREATE TABLE crm_analytics.event_outbox_processed (LIKE crm_analytics.event_outbox);
CREATE INDEX event_outbox_processed_at_brin ON crm_analytics.event_outbox_processed USING brin (processed_at);

-- Row trigger: one outbox row per changed row, old and new image, timestamps in UTC.
-- SECURITY DEFINER so that the CRM's roles need (and get) no right on the outbox.
CREATE FUNCTION crm_analytics.capture_row_change() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET timezone = 'UTC'
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO crm_analytics.event_outbox (event_type, aggregate_id, payload)
        VALUES (TG_TABLE_NAME || '.insert', NEW.id, jsonb_build_object('new', to_jsonb(NEW)));
        RETURN NEW;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO crm_analytics.event_outbox (event_type, aggregate_id, payload)
        VALUES (TG_TABLE_NAME || '.update', NEW.id,
                jsonb_build_object('old', to_jsonb(OLD), 'new', to_jsonb(NEW)));
        RETURN NEW;
    ELSE
        INSERT INTO crm_analytics.event_outbox (event_type, aggregate_id, payload)
        VALUES (TG_TABLE_NAME || '.delete', OLD.id, jsonb_build_object('old', to_jsonb(OLD)));
        RETURN OLD;
    END IF;
END;
$$;

-- Statement trigger: wakes the relay. NOTIFY folds duplicates within a transaction,
-- so a bulk statement costs one notification, delivered only if the transaction commits.
CREATE FUNCTION crm_analytics.notify_outbox() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pg_notify('crm_analytics_outbox', '');
    RETURN NULL;
END;
$$;

-- TRUNCATE fires no row trigger, so it would silently desync the analytics: refuse it.
CREATE FUNCTION crm_analytics.refuse_truncate() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION 'TRUNCATE on %.% is refused while crm-analytics captures it', TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING HINT = 'Use DELETE instead, or disable trigger crm_analytics_no_truncate, truncate, enable it again and run `crm-analytics rebuild`.';
END;
$$;

REVOKE ALL ON FUNCTION crm_analytics.capture_row_change() FROM PUBLIC;
REVOKE ALL ON FUNCTION crm_analytics.notify_outbox() FROM PUBLIC;
