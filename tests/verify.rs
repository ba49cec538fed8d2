//! `verify`: finds every kind of difference in every aggregate table (a row missing, a row
//! too many, a row changed, NULL keys included), and streams instead of loading tables, so
//! its memory stays bounded however many rows differ.

mod common;

use common::TestDb;
use std::process::Command;

/// Some CRM rows, with NULL keys among them, loaded into the aggregates by backfill.
const CRM: &str = "
    INSERT INTO accounts (id, name) VALUES
        ('00000000-0000-0000-0000-00000000000a', 'A'), ('00000000-0000-0000-0000-00000000000b', 'B');
    INSERT INTO leads (account_id, source, status, created_at) VALUES
        ('00000000-0000-0000-0000-00000000000a', 'web', 'new', '2026-03-01 10:00+00'),
        ('00000000-0000-0000-0000-00000000000b', 'ads', 'lost', '2026-03-02 10:00+00'),
        (NULL, 'web', 'contacted', '2026-03-03 10:00+00');
    INSERT INTO activities (account_id, activity_type, occurred_at) VALUES
        ('00000000-0000-0000-0000-00000000000a', 'call', '2026-03-04 10:00+00'),
        (NULL, 'call', '2026-03-04 10:00+00');
    INSERT INTO projects (account_id, name, status, amount, closed_at) VALUES
        ('00000000-0000-0000-0000-00000000000a', 'P1', 'won', 10.00, '2026-03-05 12:00+00'),
        ('00000000-0000-0000-0000-00000000000b', 'P2', 'won', 20.00, '2026-04-05 12:00+00'),
        ('00000000-0000-0000-0000-00000000000b', 'P3', 'won', 30.00, '2026-05-05 12:00+00');
";

/// In each table: one row deleted, one row added (under a NULL key), one row changed.
const CORRUPT: &str = "
    DELETE FROM analytics.daily_account_metrics
     WHERE account_id = '00000000-0000-0000-0000-00000000000b' AND date = '2026-03-02';
    INSERT INTO analytics.daily_account_metrics (account_id, date, activities)
        VALUES (NULL, NULL, 7);
    UPDATE analytics.daily_account_metrics SET activities = activities + 1
     WHERE account_id = '00000000-0000-0000-0000-00000000000a' AND date = '2026-03-04';

    DELETE FROM analytics.lead_funnel_metrics WHERE source = 'ads';
    INSERT INTO analytics.lead_funnel_metrics (cohort_date, source, new, total)
        VALUES ('2026-03-01', NULL, 1, 1);
    UPDATE analytics.lead_funnel_metrics SET total = total + 1 WHERE cohort_date = '2026-03-03';

    DELETE FROM analytics.revenue_metrics WHERE month = '2026-05-01';
    INSERT INTO analytics.revenue_metrics (account_id, month, deals_won, revenue)
        VALUES (NULL, '2026-03-01', 1, 5);
    UPDATE analytics.revenue_metrics SET revenue = revenue + 0.01 WHERE month = '2026-04-01';
";

#[tokio::test]
async fn verify_reports_a_missing_an_extra_and_a_changed_row_in_every_table() {
    let (db, pool) = TestDb::migrated().await;
    sqlx::raw_sql(CRM).execute(&pool).await.unwrap();
    crm_analytics::backfill::run(&pool, &pool, "public", false)
        .await
        .unwrap();
    common::assert_exact(&pool).await;
    sqlx::raw_sql(CORRUPT).execute(&pool).await.unwrap();

    let found = crm_analytics::aggregates::verify::verify(&pool, &pool, "public", 100)
        .await
        .unwrap();
    assert_eq!(found.differences, 9, "{:#?}", found.shown);
    for table in [
        "daily_account_metrics",
        "lead_funnel_metrics",
        "revenue_metrics",
    ] {
        let lines: Vec<&String> = found
            .shown
            .iter()
            .filter(|l| l.starts_with(&format!("{table} ")))
            .collect();
        assert_eq!(lines.len(), 3, "{table}: {lines:#?}");
        assert!(
            lines.iter().any(|l| l.ends_with("found no row")),
            "{lines:#?}"
        );
        assert!(
            lines.iter().any(|l| l.contains("expected no row")),
            "{lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| !l.ends_with("found no row") && !l.contains("expected no row")),
            "{lines:#?}"
        );
    }
    assert!(found
        .shown
        .iter()
        .any(|l| l.starts_with("daily_account_metrics (None, None): expected no row")));

    // Only the first few are described; all are counted.
    let capped = crm_analytics::aggregates::verify::verify(&pool, &pool, "public", 2)
        .await
        .unwrap();
    assert_eq!((capped.differences, capped.shown.len()), (9, 2));

    let output = Command::new(common::binary())
        .arg("verify")
        .env("DATABASE_URL", &db.url)
        .env_remove("ANALYTICS_DATABASE_URL")
        .output()
        .expect("run verify");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("9 differences"), "{stdout}");
    db.finish(pool).await;
}

#[tokio::test]
async fn verify_memory_stays_bounded_when_every_row_differs() {
    let (db, pool) = TestDb::migrated().await;
    // 400,000 aggregate rows the (empty) CRM does not explain: each one is a difference.
    sqlx::raw_sql(
        "INSERT INTO analytics.daily_account_metrics (account_id, date, activities)
         SELECT gen_random_uuid(), date '2026-01-01' + (i % 365), 1
         FROM generate_series(1, 400000) i",
    )
    .execute(&pool)
    .await
    .unwrap();
    let output = Command::new(common::binary())
        .arg("verify")
        .env("DATABASE_URL", &db.url)
        .env_remove("ANALYTICS_DATABASE_URL")
        .output()
        .expect("run verify");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stdout.contains("400000 differences"),
        "{}",
        &stdout[stdout.len().saturating_sub(300)..]
    );
    assert!(
        stdout.lines().count() < 1100,
        "differences beyond the first thousand are counted, not printed"
    );
    // Peak resident memory of the largest child this test process waited for.
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .expect("getrusage");
    let peak_mb = usage.max_rss() / 1024;
    eprintln!("verify peak RSS: {peak_mb} MB");
    assert!(
        peak_mb < 60,
        "verify peaked at {peak_mb} MB for 400,000 differing rows: it must stream"
    );
    db.finish(pool).await;
}
