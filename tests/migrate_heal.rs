//! `migrate` heals: what the migrations made and someone dropped since (schema `analytics`,
//! one aggregate table, a grant of the reader role, a capture trigger) is recreated and
//! reported, the result is the same as a fresh install, and a second run changes nothing.

mod common;

use common::TestDb;
use crm_analytics::migrate::Installed;
use sqlx::PgPool;

/// The analytics component's catalog, one line per column, constraint, index, trigger,
/// function, grant and default privilege, sorted: equal lines mean equal shapes.
async fn shape(pool: &PgPool) -> Vec<String> {
    let mut lines: Vec<String> = sqlx::query_scalar(
        "SELECT format('column %s #%s %s not-null=%s default=%s', a.attrelid::regclass, a.attnum,
                       format_type(a.atttypid, a.atttypmod), a.attnotnull,
                       pg_get_expr(d.adbin, d.adrelid))
         FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
         LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE c.relnamespace IN ('analytics'::regnamespace, 'crm_analytics'::regnamespace)
           AND c.relkind = 'r' AND a.attnum > 0 AND NOT a.attisdropped
         UNION ALL
         SELECT format('constraint %s %s %s', conrelid::regclass, conname, pg_get_constraintdef(oid))
         FROM pg_constraint
         WHERE connamespace IN ('analytics'::regnamespace, 'crm_analytics'::regnamespace)
         UNION ALL
         SELECT format('index %s', indexdef) FROM pg_indexes
         WHERE schemaname IN ('analytics', 'crm_analytics')
         UNION ALL
         SELECT format('trigger %s', pg_get_triggerdef(t.oid)) FROM pg_trigger t
         JOIN pg_class c ON c.oid = t.tgrelid
         WHERE NOT t.tgisinternal
           AND c.relnamespace IN ('analytics'::regnamespace, 'crm_analytics'::regnamespace)
         UNION ALL
         SELECT format('function %s', pg_get_functiondef(p.oid)) FROM pg_proc p
         WHERE p.pronamespace = 'analytics'::regnamespace
         UNION ALL
         SELECT format('grant %s.%s %s %s', table_schema, table_name, grantee, privilege_type)
         FROM information_schema.role_table_grants
         WHERE grantee = 'analytics_reader' AND table_schema IN ('analytics', 'crm_analytics')
         UNION ALL
         SELECT format('schema usage %s', has_schema_privilege('analytics_reader', 'analytics', 'USAGE'))
         UNION ALL
         SELECT format('default privileges %s', defaclacl) FROM pg_default_acl
         WHERE defaclnamespace = 'analytics'::regnamespace",
    )
    .fetch_all(pool)
    .await
    .expect("read the catalog");
    // The outbox is capture's (its id default holds a per-installation prefix).
    lines.retain(|line| !line.contains("event_outbox"));
    lines.sort();
    lines
}

/// Fails showing only the lines that differ.
fn assert_same_shape(found: &[String], expected: &[String]) {
    let extra: Vec<_> = found.iter().filter(|l| !expected.contains(l)).collect();
    let missing: Vec<_> = expected.iter().filter(|l| !found.contains(l)).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "not the same as a fresh install; extra: {extra:#?}; missing: {missing:#?}"
    );
    assert_eq!(found.len(), expected.len());
}

async fn migrate(pool: &PgPool) -> Installed {
    crm_analytics::migrate::all_reporting(pool, pool, "public", true, None)
        .await
        .expect("migrate")
}

async fn run_sql(pool: &PgPool, sql: &str) {
    sqlx::raw_sql(sql).execute(pool).await.expect(sql);
}

#[tokio::test]
async fn a_dropped_analytics_schema_is_recreated_as_a_fresh_install_has_it() {
    let (fresh, fresh_pool) = TestDb::migrated().await;
    let expected = shape(&fresh_pool).await;
    fresh.finish(fresh_pool).await;

    let (db, pool) = TestDb::migrated().await;
    common::run_workload(&pool, 2, 200, 3).await;
    run_sql(&pool, "DROP SCHEMA analytics CASCADE").await;
    let installed = migrate(&pool).await;
    for wanted in [
        "schema analytics",
        "table analytics.daily_account_metrics",
        "table analytics.event_counts",
        "function analytics.notify_aggregates_changed()",
    ] {
        assert!(
            installed.recreated.iter().any(|r| r == wanted),
            "{wanted} reported: {:?}",
            installed.recreated
        );
    }
    assert_same_shape(&shape(&pool).await, &expected);

    // Rebuilt from the CRM, the recreated tables hold the exact numbers again.
    crm_analytics::backfill::run(&pool, &pool, "public", false)
        .await
        .expect("rebuild");
    common::assert_nontrivial(&pool).await;
    common::assert_exact(&pool).await;

    let again = migrate(&pool).await;
    assert!(again.recreated.is_empty(), "{:?}", again.recreated);
    assert_eq!(again.capture_triggers, 0);
    db.finish(pool).await;
}

#[tokio::test]
async fn a_dropped_table_a_revoked_grant_and_a_dropped_capture_trigger_are_restored_and_reported() {
    let (fresh, fresh_pool) = TestDb::migrated().await;
    let expected = shape(&fresh_pool).await;
    fresh.finish(fresh_pool).await;

    let (db, pool) = TestDb::migrated().await;
    run_sql(
        &pool,
        "DROP TABLE analytics.revenue_metrics;
         DROP TABLE crm_analytics.failed_events;
         REVOKE SELECT ON analytics.lead_funnel_metrics FROM analytics_reader;
         DROP TRIGGER notify_aggregates_changed ON analytics.event_counts;
         DROP TRIGGER crm_analytics_capture ON public.leads;",
    )
    .await;
    let installed = migrate(&pool).await;
    let mut recreated = installed.recreated.clone();
    recreated.sort();
    assert_eq!(
        recreated,
        [
            "select on analytics.lead_funnel_metrics for analytics_reader",
            "table analytics.revenue_metrics",
            "table crm_analytics.failed_events",
            "trigger notify_aggregates_changed on analytics.event_counts",
        ]
    );
    assert!(installed.capture_was_installed);
    assert_eq!(
        installed.capture_triggers, 1,
        "the leads trigger reattached"
    );
    assert_same_shape(&shape(&pool).await, &expected);
    let attached: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_trigger
                        WHERE tgrelid = 'public.leads'::regclass AND tgname = 'crm_analytics_capture')",
    )
    .fetch_one(&pool)
    .await
    .expect("read triggers");
    assert!(attached);

    let again = migrate(&pool).await;
    assert_eq!(
        again,
        Installed {
            capture_was_installed: true,
            ..Installed::default()
        }
    );
    db.finish(pool).await;
}
