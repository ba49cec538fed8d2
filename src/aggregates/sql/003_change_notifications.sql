-- Every committed change of an aggregate table sends one notification on channel
-- crm_analytics_aggregates (statement-level, and PostgreSQL folds identical notifications
-- of one transaction into one). API servers drop their cached responses when it arrives,
-- whoever changed the table: workers, backfill, rebuild or an operator's own SQL.
CREATE FUNCTION analytics.notify_aggregates_changed() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    PERFORM pg_notify('crm_analytics_aggregates', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER notify_aggregates_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON analytics.daily_account_metrics
    FOR EACH STATEMENT EXECUTE FUNCTION analytics.notify_aggregates_changed();
CREATE TRIGGER notify_aggregates_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON analytics.lead_funnel_metrics
    FOR EACH STATEMENT EXECUTE FUNCTION analytics.notify_aggregates_changed();
CREATE TRIGGER notify_aggregates_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON analytics.revenue_metrics
    FOR EACH STATEMENT EXECUTE FUNCTION analytics.notify_aggregates_changed();
CREATE TRIGGER notify_aggregates_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON analytics.event_counts
    FOR EACH STATEMENT EXECUTE FUNCTION analytics.notify_aggregates_changed();
