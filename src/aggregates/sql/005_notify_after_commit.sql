-- Analytics, version 5: a transaction may send its change notification after it commits
-- instead of from the triggers of version 3.
--
-- Why: a transaction that notifies takes PostgreSQL's one cluster-wide notification lock
-- at commit and holds it until its commit record is flushed to disk, so every notifying
-- commit waits for the flush of the one before it. The workers commit a batch at a time,
-- all notifying: they queued behind each other for one disk flush each. A worker now sets
-- crm_analytics.notify_after_commit for its transaction (set_config(..., true)) and sends
-- the notification in a statement of its own right after the commit; that statement
-- writes nothing to the log, so it holds the lock for no flush. Everyone else (backfill,
-- rebuild, parking, an operator's own SQL) still notifies from the triggers.
CREATE OR REPLACE FUNCTION analytics.notify_aggregates_changed() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    IF current_setting('crm_analytics.notify_after_commit', true) IS DISTINCT FROM 'on' THEN
        PERFORM pg_notify('crm_analytics_aggregates', '');
    END IF;
    RETURN NULL;
END
$$;
