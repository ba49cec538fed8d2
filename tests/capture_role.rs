//! Capture runs as a role of its own: code that a CRM table's owner gets to run inside the
//! capture trigger (a cast to json of a column's type) gains no right its author lacks.

mod common;

use common::TestDb;
use sqlx::{Connection, PgConnection};

/// A role that owns a captured table plants a cast to json whose function tries to become
/// superuser and to read a table it may not read; the capture trigger serializes its row.
#[tokio::test]
async fn a_table_owner_gains_nothing_through_a_cast_run_by_the_capture_trigger() {
    let (db, pool) = TestDb::migrated().await;
    let attacker = format!("crm_owner_{}", &db.name[db.name.len() - 8..]);
    sqlx::raw_sql(&format!(
        "CREATE ROLE {attacker} LOGIN;
         GRANT CREATE ON SCHEMA public TO {attacker};
         ALTER TABLE public.leads OWNER TO {attacker};
         CREATE TABLE public.secrets (secret text);
         INSERT INTO public.secrets VALUES ('top secret');"
    ))
    .execute(&pool)
    .await
    .unwrap();

    let mut owner =
        PgConnection::connect(&db.url.replacen("postgres@", &format!("{attacker}@"), 1))
            .await
            .expect("connect as the table owner");
    sqlx::raw_sql(&format!(
        r#"
        CREATE TABLE public.cast_log (who text, super boolean, escalated text, secret text);
        GRANT INSERT ON public.cast_log TO PUBLIC;
        CREATE TYPE public.sneaky AS ENUM ('x');
        CREATE FUNCTION public.sneaky_to_json(v public.sneaky) RETURNS json
        LANGUAGE plpgsql AS $f$
        DECLARE
            escalated text := 'yes';
            secret text;
        BEGIN
            BEGIN
                EXECUTE 'ALTER ROLE {attacker} SUPERUSER';
            EXCEPTION WHEN OTHERS THEN escalated := SQLSTATE || ': ' || SQLERRM;
            END;
            BEGIN
                SELECT s.secret INTO secret FROM public.secrets s;
            EXCEPTION WHEN OTHERS THEN secret := SQLSTATE || ': ' || SQLERRM;
            END;
            INSERT INTO public.cast_log
            SELECT current_user, rolsuper, escalated, secret FROM pg_roles WHERE rolname = current_user;
            RETURN to_json(v::text);
        END
        $f$;
        CREATE CAST (public.sneaky AS json) WITH FUNCTION public.sneaky_to_json(public.sneaky);
        ALTER TABLE public.leads ADD COLUMN sneaky public.sneaky;
        INSERT INTO public.leads (source, sneaky) VALUES ('web', 'x');
        "#
    ))
    .execute(&mut owner)
    .await
    .expect("a table owner may do all of this to its own table");
    owner.close().await.unwrap();

    let log: Vec<(String, bool, String, String)> =
        sqlx::query_as("SELECT who, super, escalated, secret FROM public.cast_log")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        log.len(),
        1,
        "the cast ran once, inside the capture trigger"
    );
    let (who, is_super, escalated, secret) = &log[0];
    assert_eq!(who, crm_analytics::capture::CAPTURE_ROLE);
    assert!(!is_super, "the cast ran with superuser rights");
    assert!(
        escalated.starts_with("42501"), // insufficient_privilege
        "ALTER ROLE ... SUPERUSER inside the trigger: {escalated}"
    );
    assert!(
        secret.starts_with("42501"),
        "read a table neither the owner nor capture may read: {secret}"
    );
    let rights: (bool, bool, bool) = sqlx::query_as(
        "SELECT rolsuper, rolcreaterole, rolbypassrls FROM pg_roles WHERE rolname = $1",
    )
    .bind(&attacker)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        rights,
        (false, false, false),
        "the table owner gained rights"
    );
    // The capture role itself is no more than the outbox's writer.
    let capture: (bool, bool, bool, bool) = sqlx::query_as(
        "SELECT rolsuper, rolcreaterole, rolbypassrls, rolcanlogin FROM pg_roles WHERE rolname = $1",
    )
    .bind(crm_analytics::capture::CAPTURE_ROLE)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(capture, (false, false, false, false));

    // Capture still works: the owner's row and an ordinary row are in the outbox.
    sqlx::query("INSERT INTO accounts (name) VALUES ('Plain')")
        .execute(&pool)
        .await
        .unwrap();
    let types: Vec<String> =
        sqlx::query_scalar("SELECT event_type FROM crm_analytics.event_outbox ORDER BY event_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(types, ["leads.insert", "accounts.insert"]);
    db.finish(pool).await;
    common::drop_role(&attacker).await;
}

/// Supabase's `postgres` is no superuser but may create roles: `migrate` works for it too,
/// and the trigger functions still end up owned by the capture role.
#[tokio::test]
async fn a_createrole_migrator_that_is_not_superuser_can_migrate() {
    let db = TestDb::create().await;
    let migrator = format!("crm_migrator_{}", &db.name[db.name.len() - 8..]);
    let admin = db.pool(2).await;
    sqlx::raw_sql(&format!(
        "CREATE ROLE {migrator} LOGIN CREATEROLE;
         ALTER DATABASE {} OWNER TO {migrator};
         ALTER SCHEMA public OWNER TO {migrator};",
        db.name
    ))
    .execute(&admin)
    .await
    .unwrap();
    let url = db.url.replacen("postgres@", &format!("{migrator}@"), 1);
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    crm_analytics::migrate::all(&pool, &pool, "public", true)
        .await
        .expect("migrate as a CREATEROLE non-superuser");
    // Row images of the metric columns only: per-table functions, handed over the same way.
    crm_analytics::migrate::all_with(
        &pool,
        &pool,
        "public",
        false,
        Some(crm_analytics::capture::CaptureColumns::Metrics),
    )
    .await
    .expect("switch to metrics row images as a CREATEROLE non-superuser");
    let owners: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT pg_get_userbyid(proowner)::text FROM pg_proc
         WHERE pronamespace = 'crm_analytics'::regnamespace AND prorettype = 'trigger'::regtype",
    )
    .fetch_all(&admin)
    .await
    .unwrap();
    assert_eq!(owners, [crm_analytics::capture::CAPTURE_ROLE]);
    let metric_functions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_proc WHERE proname LIKE 'capture\\_%\\_metrics'",
    )
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!(metric_functions, 4);
    sqlx::query("INSERT INTO accounts (name) VALUES ('Captured')")
        .execute(&pool)
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_analytics.event_outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 1);
    pool.close().await;
    db.finish(admin).await;
    common::drop_role(&migrator).await;
}

/// A `crm_analytics_capture` that someone created before `migrate` with more rights than
/// capture needs (a role attribute, or a membership that lends another role's rights) is
/// refused. Tried inside a transaction that rolls back: the role is shared by every
/// database on the server, and nobody else sees the change.
#[tokio::test]
async fn a_capture_role_with_more_rights_than_capture_needs_is_refused() {
    let (db, pool) = TestDb::migrated().await;
    let migration = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/capture/sql/004_capture_role.sql"
    ))
    .expect("read migration 4");
    for (widen, expected) in [
        (
            "GRANT pg_read_all_data TO crm_analytics_capture",
            "member of other roles (pg_read_all_data)",
        ),
        (
            "ALTER ROLE crm_analytics_capture CREATEDB",
            "exists with rights it must not have",
        ),
    ] {
        let mut tx = pool.begin().await.unwrap();
        sqlx::raw_sql(widen).execute(&mut *tx).await.unwrap();
        let error = sqlx::raw_sql(&migration)
            .execute(&mut *tx)
            .await
            .expect_err(widen)
            .to_string();
        assert!(error.contains(expected), "{widen}: {error}");
        tx.rollback().await.unwrap();
    }
    // As created by migrate, the role passes the same checks.
    let mut tx = pool.begin().await.unwrap();
    sqlx::raw_sql(&migration)
        .execute(&mut *tx)
        .await
        .expect("the role migrate created is accepted");
    tx.rollback().await.unwrap();
    db.finish(pool).await;
}
