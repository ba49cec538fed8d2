-- Capture, version 5: event ids that never repeat across restores, failovers and copies.
-- An id is a 16-hex-digit prefix and the outbox sequence. Version 2 fixed the prefix at
-- install time, so a CRM database restored to an earlier point (or a replica promoted while
-- behind, or a dump or copy restored elsewhere) handed out the ids again that it had handed
-- out before, and the analytics ledger dropped the new events as duplicates. The prefix is
-- now a hash of what changes with each of those: the cluster's system identifier (a new
-- cluster), the current timeline (a point-in-time recovery or a promotion starts a new
-- one), the database's OID (a copy or a restore into a new database), and a random salt
-- per installation (capture installed again in the same database). A session computes it on
-- its first event and keeps it in a session setting: no session outlives a restore or a
-- failover, so each reads the identity of the database it writes to.
DO $$
BEGIN
    EXECUTE format(
        $create$
        CREATE FUNCTION crm_analytics.event_id_prefix() RETURNS text
        LANGUAGE plpgsql SET search_path = pg_catalog AS $body$
        DECLARE
            prefix text := left(md5(concat_ws(':',
                %L,
                (SELECT system_identifier FROM pg_control_system()),
                left(pg_walfile_name(pg_current_wal_lsn()), 8),
                (SELECT oid FROM pg_database WHERE datname = current_database()))), 16);
        BEGIN
            PERFORM set_config('crm_analytics.event_prefix', prefix, false);
            RETURN prefix;
        END
        $body$
        $create$,
        gen_random_uuid()::text);
END
$$;

ALTER TABLE crm_analytics.event_outbox ALTER COLUMN event_id SET DEFAULT
    (coalesce(nullif(current_setting('crm_analytics.event_prefix', true), ''),
              crm_analytics.event_id_prefix())
     || lpad(to_hex(nextval('crm_analytics.event_seq')), 16, '0'))::uuid;
