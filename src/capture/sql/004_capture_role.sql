-- Capture, version 4: the trigger functions run as a role of their own with only the rights
-- capture needs. A SECURITY DEFINER function runs as its owner, and serializing a row runs
-- code the table's owner chose (a cast to json of a column's type, for one): owned by the
-- role that ran `migrate`, often a superuser, that code would run with its rights.
-- Roles are cluster-wide and several databases may migrate at once: create it race-safely.
DO $$
DECLARE
    capture pg_roles%ROWTYPE;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'crm_analytics_capture') THEN
        BEGIN
            CREATE ROLE crm_analytics_capture
                NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT;
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN NULL;  -- created concurrently
            WHEN insufficient_privilege THEN
                RAISE EXCEPTION 'cannot create role crm_analytics_capture: % lacks CREATEROLE', current_user
                    USING HINT = format('Have an administrator run: CREATE ROLE crm_analytics_capture NOLOGIN; '
                                        'GRANT crm_analytics_capture TO %I; then migrate again.', current_user);
        END;
    END IF;
    SELECT * INTO capture FROM pg_roles WHERE rolname = 'crm_analytics_capture';
    -- Someone may have created it before us: it must not be more than we need.
    IF capture.rolsuper OR capture.rolbypassrls OR capture.rolcreaterole OR capture.rolcanlogin THEN
        RAISE EXCEPTION 'role crm_analytics_capture exists with rights it must not have (superuser, BYPASSRLS, CREATEROLE or LOGIN)'
            USING HINT = 'ALTER ROLE crm_analytics_capture NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEROLE, then migrate again.';
    END IF;
    -- A migrator that is not a superuser (Supabase's postgres) may hand ownership only to a
    -- role it belongs to; with CREATEROLE it may grant itself that membership.
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
       AND NOT pg_has_role(current_user, 'crm_analytics_capture', 'MEMBER') THEN
        EXECUTE format('GRANT crm_analytics_capture TO %I', current_user);
    END IF;
END
$$;

-- Exactly what the triggers do: append to the outbox (the event id's default draws from the
-- sequence) and read the relay's sleep flag. Nothing on the CRM tables: a trigger receives
-- its rows, it does not read them.
GRANT USAGE ON SCHEMA crm_analytics TO crm_analytics_capture;
GRANT INSERT ON crm_analytics.event_outbox TO crm_analytics_capture;
GRANT USAGE ON SEQUENCE crm_analytics.event_seq TO crm_analytics_capture;
GRANT SELECT ON SEQUENCE crm_analytics.relay_asleep TO crm_analytics_capture;

-- Handing a function over needs CREATE on its schema for the new owner (unless a superuser
-- does it); granted and taken back within this transaction, so nobody ever sees it.
GRANT CREATE ON SCHEMA crm_analytics TO crm_analytics_capture;
ALTER FUNCTION crm_analytics.capture_row_change() OWNER TO crm_analytics_capture;
ALTER FUNCTION crm_analytics.notify_outbox() OWNER TO crm_analytics_capture;
-- Not SECURITY DEFINER (it runs as whoever truncates), moved along so that every trigger
-- function of ours has the same owner.
ALTER FUNCTION crm_analytics.refuse_truncate() OWNER TO crm_analytics_capture;
REVOKE CREATE ON SCHEMA crm_analytics FROM crm_analytics_capture;
