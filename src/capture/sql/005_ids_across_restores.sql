-- Capture, version 5: event ids that never repeat across restores, failovers and copies.
-- An id is a 16-hex-digit prefix and the outbox sequence. Version 2 fixed the prefix at
-- install time, so a CRM database restored to an earlier point (or a replica promoted while
-- behind, or a backup restored into another database) handed out the ids again that it
-- had handed out before, and the analytics ledger dropped the new events as duplicates.
-- The prefix is now a hash of what changes with each of those: the cluster's system
-- identifier (another cluster), the current timeline (a point-in-time recovery or a
-- promotion starts a new one), the database's OID (a restore into a new database), and a
-- random salt per installation (capture installed again in the same database). A session
-- computes it on its first event and keeps it in a session setting whose name carries the
-- salt, so a session that outlives a reinstall does not reuse the old prefix; no session
-- outlives a restore or a failover.
SET LOCAL lock_timeout = '5s'; -- the outbox's default changes under a brief exclusive lock
DO $$
DECLARE
    salt text := replace(gen_random_uuid()::text, '-', '');
    setting text := 'crm_analytics.event_prefix_' || left(salt, 12);
BEGIN
    -- Runs as the capture role, inside CRM transactions: whatever the server does not let
    -- it read (a managed service may restrict the control or WAL functions) is left out of
    -- the hash rather than failing the CRM's write.
    EXECUTE format(
        $create$
        CREATE FUNCTION crm_analytics.event_id_prefix() RETURNS text
        LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $body$
        DECLARE
            cluster text;
            timeline text;
            prefix text;
        BEGIN
            BEGIN
                SELECT system_identifier::text INTO cluster FROM pg_catalog.pg_control_system();
            EXCEPTION WHEN OTHERS THEN
                cluster := '';
            END;
            BEGIN
                timeline := left(pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_lsn()), 8);
            EXCEPTION WHEN OTHERS THEN
                BEGIN
                    SELECT timeline_id::text INTO timeline FROM pg_catalog.pg_control_checkpoint();
                EXCEPTION WHEN OTHERS THEN
                    timeline := '';
                END;
            END;
            prefix := left(pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(
                pg_catalog.concat_ws(':', %L, cluster, timeline,
                    (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())),
                'UTF8')), 'hex'), 16);
            PERFORM pg_catalog.set_config(%L, prefix, false);
            RETURN prefix;
        END
        $body$
        $create$,
        salt, setting);
    EXECUTE format(
        'ALTER TABLE crm_analytics.event_outbox ALTER COLUMN event_id SET DEFAULT
            (coalesce(nullif(current_setting(%L, true), %L), crm_analytics.event_id_prefix())
             || lpad(to_hex(nextval(%L::regclass)), 16, %L))::uuid',
        setting, '', 'crm_analytics.event_seq', '0');
END
$$;

-- Only the capture role calls it (the outbox's default, inside the capture trigger).
REVOKE ALL ON FUNCTION crm_analytics.event_id_prefix() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION crm_analytics.event_id_prefix() TO crm_analytics_capture;

-- Called once as the capture role now, so that a missing right fails `migrate`, not the
-- CRM's next write.
SET LOCAL ROLE crm_analytics_capture;
SELECT crm_analytics.event_id_prefix();
RESET ROLE;
