-- Analytics, version 2: a read-only role for BI tools (Metabase, Superset, Grafana).
-- No login of its own: grant it to a login role, e.g.
--   CREATE ROLE metabase LOGIN PASSWORD '...' IN ROLE analytics_reader;
DO $$
BEGIN
    CREATE ROLE analytics_reader NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL; -- roles are cluster-wide: another database of the cluster created it already
END
$$;
GRANT USAGE ON SCHEMA analytics TO analytics_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA analytics TO analytics_reader;
ALTER DEFAULT PRIVILEGES IN SCHEMA analytics GRANT SELECT ON TABLES TO analytics_reader;
