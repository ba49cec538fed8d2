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
    -- Someone may have created it before us: it must not be more than we need. Role
    -- attributes and memberships are checked (a membership in pg_read_all_data, say, would
    -- lend its rights to whatever runs inside the trigger); object-level grants are not.
    IF capture.rolsuper OR capture.rolbypassrls OR capture.rolcreaterole OR capture.rolcanlogin
       OR capture.rolcreatedb OR capture.rolreplication THEN
        RAISE EXCEPTION 'role crm_analytics_capture exists with rights it must not have (superuser, BYPASSRLS, CREATEROLE, CREATEDB, REPLICATION or LOGIN)'
            USING HINT = 'ALTER ROLE crm_analytics_capture NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEROLE NOCREATEDB NOREPLICATION, then migrate again.';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_auth_members WHERE member = capture.oid) THEN
        RAISE EXCEPTION 'role crm_analytics_capture is a member of other roles (%), whose rights would run inside the capture trigger',
            (SELECT string_agg(roleid::regrole::text, ', ') FROM pg_auth_members WHERE member = capture.oid)
            USING HINT = 'REVOKE those roles FROM crm_analytics_capture, then migrate again.';
    END IF;
    -- Inheriting nothing anyway: a membership granted later lends no rights by itself.
    IF capture.rolinherit THEN
        BEGIN
            ALTER ROLE crm_analytics_capture NOINHERIT;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE EXCEPTION 'role crm_analytics_capture inherits, and % may not change that', current_user
                USING HINT = 'Have an administrator run: ALTER ROLE crm_analytics_capture NOINHERIT; then migrate again.';
        END;
    END IF;
    -- A migrator that is not a superuser (Supabase's postgres) may hand ownership only to a
    -- role it belongs to; with CREATEROLE it may grant itself that membership.
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
       AND NOT pg_has_role(current_user, 'crm_analytics_capture', 'MEMBER') THEN
        BEGIN
            EXECUTE format('GRANT crm_analytics_capture TO %I', current_user);
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE EXCEPTION '% may not hand the capture functions to role crm_analytics_capture', current_user
                USING HINT = format('Have an administrator (or the role that created crm_analytics_capture) run: '
                                    'GRANT crm_analytics_capture TO %I; then migrate again.', current_user);
        END;
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
