//! The dashboard as a person sees it: headless Chromium loads the page from a live server,
//! runs its script against the API, and the panels must show the numbers the API returns.
//! A screenshot is saved next to the test's build output.

mod common;

use common::{Server, TestDb};
use std::path::{Path, PathBuf};
use std::process::Command;

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            let out = Command::new("which").arg(name).output().ok()?;
            out.status
                .success()
                .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        })
}

/// Runs headless Chromium on `url` with the flags this machine needs, plus `extra`.
fn headless(browser: &Path, profile: &Path, url: &str, extra: &[&str]) -> String {
    let output = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1400,1000",
            "--virtual-time-budget=10000",
            &format!("--user-data-dir={}", profile.display()),
        ])
        .args(extra)
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The data-value of the element with `id` in the rendered DOM.
fn value_of(dom: &str, id: &str) -> String {
    let marker = format!("id=\"{id}\" data-value=\"");
    let start = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no element {id} in the page"))
        + marker.len();
    dom[start..]
        .split('"')
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The text of the element with `id` in the rendered DOM.
fn text_of(dom: &str, id: &str) -> String {
    let marker = format!("id=\"{id}\"");
    let start = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no element {id} in the page"));
    let rest = &dom[start..];
    let text = &rest[rest.find('>').expect("tag end") + 1..];
    text.split('<').next().unwrap_or_default().to_string()
}

/// The sum of the revenue bars' values.
fn revenue_bars(dom: &str) -> rust_decimal::Decimal {
    dom.split("<rect class=\"b\"")
        .skip(1)
        .map(|rect| {
            let value = rect.split("data-value=\"").nth(1).unwrap_or_default();
            value
                .split('"')
                .next()
                .unwrap_or_default()
                .parse::<rust_decimal::Decimal>()
                .unwrap()
        })
        .sum()
}

/// The page at `base` with `hash` after the token, rendered by Chromium; its DOM.
fn render(browser: &Path, db: &TestDb, base: &str, hash: &str) -> String {
    let profile = std::env::temp_dir().join(format!("chromium-{}", db.name));
    let url = format!("{base}/#token={}{hash}", common::TOKEN);
    let dom = headless(browser, &profile, &url, &["--dump-dom"]);
    let _ = std::fs::remove_dir_all(&profile);
    dom
}

/// A server whose CRM database is down (nothing listens at its address); analytics is up.
async fn server_with_crm_down(db: &TestDb) -> Server {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let crm = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(std::time::Duration::from_secs(2))
        .connect_lazy(&format!("postgres://postgres@127.0.0.1:{port}/crm"))
        .expect("lazy pool");
    let options = crm_analytics::api::ServeOptions {
        tokens: crm_analytics::api::auth::Tokens::parse(common::TOKEN),
        cache_ttl: std::time::Duration::from_secs(3600),
        public_url: None,
    };
    Server::serve(crm, db.pool(8).await, options).await
}

fn browser_or_skip() -> Option<PathBuf> {
    let browser = chromium();
    if browser.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install chromium (see .ci/run)"
        );
        eprintln!("skipping the browser test: no chromium on this machine");
    }
    browser
}

/// With the CRM down, /api/health/ answers 503: the panels that need only analytics still
/// show, and the outbox lag (a CRM number) reads "unreachable", not "0".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_crm_down_the_dashboard_still_shows_analytics() {
    let Some(browser) = browser_or_skip() else {
        return;
    };
    let (db, pool) = TestDb::migrated().await;
    let today = chrono::Utc::now().date_naive();
    sqlx::query(
        "INSERT INTO analytics.lead_funnel_metrics
             (cohort_date, source, new, contacted, qualified, converted, lost, total)
         VALUES ($1, 'web', 1, 1, 1, 2, 2, 7)",
    )
    .bind(today)
    .execute(&pool)
    .await
    .unwrap();
    let server = server_with_crm_down(&db).await;
    let (status, health) = common::get_json(&server.base, "/api/health/").await;
    assert_eq!(status, 503, "{health}");
    assert!(health["outbox_lag"].is_null() && health["queue_depth"].is_u64());

    let dom = render(&browser, &db, &server.base, "");
    assert!(
        dom.contains("data-ready=\"1\""),
        "the page rendered its data: {}",
        &dom[..dom.len().min(500)]
    );
    assert_eq!(value_of(&dom, "kpi-leads"), "7");
    assert_eq!(value_of(&dom, "funnel-converted"), "2");
    assert_eq!(text_of(&dom, "health-outbox"), "unreachable");
    assert_eq!(value_of(&dom, "health-outbox"), "unreachable");
    assert_eq!(
        value_of(&dom, "health-queue"),
        health["queue_depth"].to_string()
    );
    assert!(
        dom.contains("unreachable database: crm"),
        "the page says which database is down"
    );
    server.stop().await;
    db.finish(pool).await;
}

/// With the range cleared ("all time"), daily rows without a date (a deal won without
/// closed_at) reach the page: their revenue counts in the tile and shows as a "(none)" bar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_without_a_date_get_a_none_bar_over_all_time() {
    let Some(browser) = browser_or_skip() else {
        return;
    };
    let (db, pool) = TestDb::migrated().await;
    sqlx::raw_sql(
        "INSERT INTO analytics.daily_account_metrics
             (account_id, date, leads_created, leads_converted, activities, deals_won, revenue_won)
         VALUES ('00000000-0000-0000-0000-00000000000a', '2026-03-02', 1, 0, 3, 1, 10.25),
                ('00000000-0000-0000-0000-00000000000a', NULL, 0, 1, 0, 1, 7.50),
                (NULL, NULL, 0, 0, 0, 1, 2.00);",
    )
    .execute(&pool)
    .await
    .unwrap();
    let server = Server::start(&db).await;

    let dom = render(&browser, &db, &server.base, "&from=&to=");
    assert!(
        dom.contains("data-ready=\"1\""),
        "the page rendered its data: {}",
        &dom[..dom.len().min(500)]
    );
    assert!(dom.contains("closed all time"), "the range was cleared");
    assert_eq!(value_of(&dom, "kpi-deals"), "3");
    assert_eq!(value_of(&dom, "kpi-revenue"), "19.75");
    assert_eq!(
        revenue_bars(&dom),
        "19.75".parse::<rust_decimal::Decimal>().unwrap(),
        "the revenue bars add up to the Revenue won tile"
    );
    assert!(
        dom.contains("data-key=\"(none)\" data-value=\"9.50\""),
        "the rows without a date have their own bar"
    );
    assert!(dom.contains("data-key=\"2026-03\" data-value=\"10.25\""));
    server.stop().await;
    db.finish(pool).await;
}

// Multi-threaded: the server must keep answering while this thread waits for Chromium.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_what_the_api_returns() {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install chromium (see .ci/run)"
        );
        eprintln!("skipping the browser test: no chromium on this machine");
        return;
    };
    let (db, pool) = TestDb::migrated().await;
    common::workload_through_pipeline(&db, &pool, 2, 250, 5).await;
    let to = chrono::Utc::now().date_naive();
    let from = to - chrono::Duration::days(89);
    // Over 1,000 daily rows in range, so that the page must follow `next` (a relative link)
    // to count them all; each adds one deal and 1.00 of revenue to the tiles.
    sqlx::query(
        "INSERT INTO analytics.daily_account_metrics
             (account_id, date, leads_created, leads_converted, activities, deals_won, revenue_won)
         SELECT ('ffffffff-ffff-ffff-ffff-' || lpad(a::text, 12, '0'))::uuid, d::date, 0, 0, 1, 1, 1.00
         FROM generate_series(1, 12) a, generate_series($1::date, $2::date, interval '1 day') d",
    )
    .bind(from)
    .bind(to)
    .execute(&pool)
    .await
    .unwrap();
    let server = Server::start(&db).await;

    // What the page should show for its default range, the last 90 days (UTC), from the API.
    let funnel = common::get_all(
        &server.base,
        &format!("/api/funnel-metrics/?from={from}&to={to}&limit=1000"),
    )
    .await;
    let daily = common::get_all(
        &server.base,
        &format!("/api/daily-metrics/?from={from}&to={to}&limit=1000"),
    )
    .await;
    let sum = |rows: &[serde_json::Value], field: &str| {
        rows.iter().map(|r| r[field].as_i64().unwrap()).sum::<i64>()
    };
    let (total, converted, lost) = (
        sum(&funnel, "total"),
        sum(&funnel, "converted"),
        sum(&funnel, "lost"),
    );
    let revenue: rust_decimal::Decimal = daily
        .iter()
        .map(|r| {
            r["revenue_won"]
                .as_str()
                .unwrap()
                .parse::<rust_decimal::Decimal>()
                .unwrap()
        })
        .sum();
    assert!(
        total > 50 && sum(&daily, "deals_won") > 5,
        "enough data to show"
    );
    assert!(daily.len() > 1000, "more than one page of daily rows");

    let profile = std::env::temp_dir().join(format!("chromium-{}", db.name));
    let url = format!("{}/#token={}", server.base, common::TOKEN);
    let dom = headless(&browser, &profile, &url, &["--dump-dom"]);
    assert!(
        dom.contains("data-ready=\"1\""),
        "the page rendered its data: {}",
        &dom[..dom.len().min(500)]
    );
    assert_eq!(value_of(&dom, "kpi-leads"), total.to_string());
    assert_eq!(
        value_of(&dom, "kpi-conversion"),
        format!("{:.4}", converted as f64 / total as f64)
    );
    assert_eq!(
        value_of(&dom, "kpi-deals"),
        sum(&daily, "deals_won").to_string()
    );
    assert_eq!(value_of(&dom, "kpi-revenue"), format!("{revenue:.2}"));
    assert_eq!(value_of(&dom, "funnel-total"), total.to_string());
    assert_eq!(value_of(&dom, "funnel-converted"), converted.to_string());
    assert_eq!(value_of(&dom, "funnel-lost"), lost.to_string());
    let (_, health) = common::get_json(&server.base, "/api/health/").await;
    assert_eq!(
        value_of(&dom, "health-outbox"),
        health["outbox_lag"].to_string()
    );
    assert_eq!(
        value_of(&dom, "health-queue"),
        health["queue_depth"].to_string()
    );
    assert_eq!(
        value_of(&dom, "health-failed"),
        health["failed_events"].to_string()
    );
    assert!(!value_of(&dom, "health-p50").is_empty() && !value_of(&dom, "health-p99").is_empty());
    // The monthly bars cover the tile's range, not whole months: they add up to the tile.
    let bars = revenue_bars(&dom);
    assert_eq!(
        bars, revenue,
        "the revenue bars add up to the Revenue won tile"
    );
    let range = format!("closed {from} – {to}");
    assert!(dom.contains(&range), "the tiles name their range: {range}");
    assert!(
        dom.contains("Bars add up to Revenue won"),
        "the chart says what it covers"
    );
    // The workload leaves some leads and activities without an account: a null key, which
    // the account filter offers as "(none)".
    assert!(daily.iter().any(|r| r["account_id"].is_null()));
    assert!(
        dom.contains("<option value=\"(none)\">(none)</option>"),
        "rows without an account are listed as (none)"
    );
    let revenue_bars = dom.matches("<rect class=\"b\"").count();
    let activity_bars = dom.matches("<rect class=\"a\"").count();
    assert!(
        (3..=4).contains(&revenue_bars),
        "one bar per month in range: {revenue_bars}"
    );
    assert!(
        activity_bars > 30,
        "one bar per active day: {activity_bars}"
    );

    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    headless(
        &browser,
        &profile,
        &url,
        &[&format!("--screenshot={}", shot.display())],
    );
    let size = std::fs::metadata(&shot).expect("screenshot written").len();
    assert!(
        size > 20_000,
        "a screenshot of a filled page, not a blank one: {size} bytes"
    );
    println!("dashboard screenshot: {}", shot.display());

    let _ = std::fs::remove_dir_all(&profile);
    server.stop().await;
    db.finish(pool).await;
}
