//! The REST API against a live server on a real database: every endpoint and filter,
//! pagination edges, every error case, authentication and the OpenAPI document.

mod common;

use common::{get_json, Server, TestDb, TOKEN};
use serde_json::{json, Value};

const A: &str = "00000000-0000-0000-0000-00000000000a";
const B: &str = "00000000-0000-0000-0000-00000000000b";

/// Known aggregate rows, written straight into the analytics tables.
async fn seed(pool: &sqlx::PgPool) {
    sqlx::raw_sql(&format!(
        "INSERT INTO analytics.daily_account_metrics VALUES
            ('{A}', '2026-03-01', 2, 0, 1, 0, 0),
            ('{A}', '2026-03-02', 0, 1, 0, 1, 1234.5),
            ('{B}', '2026-03-01', 1, 0, 0, 0, 0),
            ('{B}', '2026-03-03', 0, 0, 3, 2, 0.1);
         INSERT INTO analytics.lead_funnel_metrics VALUES
            ('2026-03-01', 'web', 1, 1, 0, 2, 0, 4),
            ('2026-03-01', 'event', 0, 0, 0, 0, 1, 1),
            ('2026-03-02', 'web', 1, 0, 0, 0, 0, 1);
         INSERT INTO analytics.revenue_metrics VALUES
            ('{A}', '2026-02-01', 1, 10),
            ('{A}', '2026-03-01', 1, 1234.5),
            ('{B}', '2026-03-01', 2, 0.1);
         INSERT INTO analytics.event_counts VALUES
            ('2026-03-01', 'leads', 'insert', 5, 1),
            ('2026-03-01', 'accounts', 'insert', 2, 0),
            ('2026-03-02', 'leads', 'update', 3, 0);"
    ))
    .execute(pool)
    .await
    .unwrap();
}

async fn setup() -> (TestDb, sqlx::PgPool, Server) {
    let (db, pool) = TestDb::migrated().await;
    seed(&pool).await;
    let server = Server::start(&db).await;
    (db, pool, server)
}

async fn teardown(db: TestDb, pool: sqlx::PgPool, server: Server) {
    server.stop().await;
    db.finish(pool).await;
}

#[tokio::test]
async fn api_routes_need_a_valid_bearer_token_and_probes_do_not() {
    let (db, pool, server) = setup().await;
    let client = common::client();
    for path in [
        "/api/daily-metrics/",
        "/api/funnel-metrics/",
        "/api/revenue-metrics/",
        "/api/event-counts/",
        "/api/health/",
    ] {
        let url = format!("{}{path}", server.base);
        let none = client.get(&url).send().await.unwrap();
        assert_eq!(none.status(), 401, "{path}");
        assert_eq!(none.headers()["www-authenticate"], "Bearer");
        let body: Value = none.json().await.unwrap();
        assert_eq!(
            body,
            json!({"detail": "Authentication credentials were not provided."})
        );
        let wrong = client
            .get(&url)
            .bearer_auth("test-token-12")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401, "{path}");
        let body: Value = wrong.json().await.unwrap();
        assert_eq!(body, json!({"detail": "Invalid token."}));
        let basic = client
            .get(&url)
            .basic_auth("user", Some(TOKEN))
            .send()
            .await
            .unwrap();
        assert_eq!(basic.status(), 401, "{path}");
        let right = client.get(&url).bearer_auth(TOKEN).send().await.unwrap();
        assert_eq!(right.status(), 200, "{path}");
        let second = client
            .get(&url)
            .bearer_auth("other-token")
            .send()
            .await
            .unwrap();
        assert_eq!(second.status(), 200, "every configured token is accepted");
    }
    for path in ["/healthz", "/readyz", "/api/openapi.json", "/metrics", "/"] {
        let response = client
            .get(format!("{}{path}", server.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    teardown(db, pool, server).await;
}

#[tokio::test]
async fn paths_follow_drf_slash_conventions() {
    let (db, pool, server) = setup().await;
    let client = common::client();
    let response = client
        .get(format!(
            "{}/api/daily-metrics?date=2026-03-01&x=%20y",
            server.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 301);
    assert_eq!(
        response.headers()["location"],
        "/api/daily-metrics/?date=2026-03-01&x=%20y"
    );
    let response = client
        .get(format!("{}/api/health", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 301);
    assert_eq!(response.headers()["location"], "/api/health/");
    for path in [
        "/api/nope/",
        "/api/nope",
        "/api/openapi.json/",
        "/api/",
        "/elsewhere",
    ] {
        let response = client
            .get(format!("{}{path}", server.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body, json!({"detail": "Not found."}), "{path}");
    }
    teardown(db, pool, server).await;
}

#[tokio::test]
async fn daily_metrics_filters_orders_and_formats() {
    let (db, pool, server) = setup().await;
    let (status, all) = get_json(&server.base, "/api/daily-metrics/").await;
    assert_eq!(status, 200);
    assert_eq!(all["count"], 4);
    assert_eq!(all["next"], Value::Null);
    assert_eq!(all["previous"], Value::Null);
    assert_eq!(
        all["results"][1],
        json!({"account_id": A, "date": "2026-03-02", "leads_created": 0, "leads_converted": 1,
               "activities": 0, "deals_won": 1, "revenue_won": "1234.50"})
    );
    let keys: Vec<(String, String)> = all["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["account_id"].as_str().unwrap().into(),
                r["date"].as_str().unwrap().into(),
            )
        })
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "ordered by account_id, date");
    assert_eq!(all["results"][0]["revenue_won"], "0.00");
    assert_eq!(all["results"][3]["revenue_won"], "0.10");

    let (_, one_day) = get_json(&server.base, "/api/daily-metrics/?date=2026-03-01").await;
    assert_eq!(one_day["count"], 2);
    let (_, range) = get_json(
        &server.base,
        "/api/daily-metrics/?from=2026-03-02&to=2026-03-03",
    )
    .await;
    assert_eq!(range["count"], 2, "from and to are inclusive");
    let (_, account) = get_json(
        &server.base,
        &format!("/api/daily-metrics/?account_id={B}&from=2026-03-01"),
    )
    .await;
    assert_eq!(account["count"], 2);
    assert!(account["results"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["account_id"] == B));
    let (_, upper) = get_json(
        &server.base,
        &format!("/api/daily-metrics/?account_id={}", B.to_uppercase()),
    )
    .await;
    assert_eq!(upper["count"], 2, "uuids are accepted in any case");
    let (_, ignored) = get_json(&server.base, "/api/daily-metrics/?unknown=1&format=xml").await;
    assert_eq!(ignored["count"], 4, "unknown parameters are ignored");
    teardown(db, pool, server).await;
}

#[tokio::test]
async fn pagination_edges() {
    let (db, pool, server) = setup().await;
    sqlx::query(
        "INSERT INTO analytics.event_counts (date, table_name, operation, processed)
         SELECT DATE '2020-01-01' + i, 'projects', 'delete', 1 FROM generate_series(1, 1200) i",
    )
    .execute(&pool)
    .await
    .unwrap();
    let base = &server.base;
    let (_, first) = get_json(base, "/api/event-counts/?table=projects").await;
    assert_eq!(first["count"], 1200);
    assert_eq!(
        first["results"].as_array().unwrap().len(),
        100,
        "default limit 100"
    );
    assert_eq!(first["previous"], Value::Null);
    assert_eq!(
        first["next"], "/api/event-counts/?table=projects&limit=100&offset=100",
        "relative links without a configured public URL"
    );

    let (_, capped) = get_json(base, "/api/event-counts/?table=projects&limit=5000").await;
    assert_eq!(
        capped["results"].as_array().unwrap().len(),
        1000,
        "limit capped at 1000"
    );

    let (_, middle) = get_json(base, "/api/event-counts/?table=projects&limit=10&offset=15").await;
    assert_eq!(middle["results"][0]["date"], "2020-01-17");
    assert_eq!(
        middle["previous"],
        "/api/event-counts/?table=projects&limit=10&offset=5"
    );
    let (_, near) = get_json(base, "/api/event-counts/?table=projects&limit=10&offset=10").await;
    assert_eq!(
        near["previous"], "/api/event-counts/?table=projects&limit=10",
        "offset 0 is dropped"
    );

    let (_, last) = get_json(
        base,
        "/api/event-counts/?table=projects&limit=100&offset=1100",
    )
    .await;
    assert_eq!(last["results"].as_array().unwrap().len(), 100);
    assert_eq!(last["next"], Value::Null);
    let (status, past) = get_json(base, "/api/event-counts/?table=projects&offset=5000").await;
    assert_eq!(status, 200);
    assert_eq!(past["count"], 1200);
    assert_eq!(past["results"], json!([]));
    let all = common::get_all(base, "/api/event-counts/?table=projects&limit=333").await;
    assert_eq!(all.len(), 1200, "following next visits every row once");
    teardown(db, pool, server).await;
}

#[tokio::test]
async fn funnel_revenue_event_counts_and_health() {
    let (db, pool, server) = setup().await;
    let base = &server.base;
    let (_, funnel) = get_json(base, "/api/funnel-metrics/?from=2026-03-01&to=2026-03-01").await;
    assert_eq!(funnel["count"], 2);
    assert_eq!(
        funnel["results"][0]["source"], "event",
        "ordered by cohort_date, source"
    );
    assert_eq!(
        funnel["results"][1],
        json!({"cohort_date": "2026-03-01", "source": "web", "new": 1, "contacted": 1, "qualified": 0,
               "converted": 2, "lost": 0, "total": 4, "conversion_rate": 0.5})
    );
    let (_, web) = get_json(base, "/api/funnel-metrics/?source=web").await;
    assert_eq!(web["count"], 2);

    let (_, revenue) = get_json(base, "/api/revenue-metrics/?from=2026-03&to=2026-03").await;
    assert_eq!(revenue["count"], 2);
    assert_eq!(
        revenue["results"][0],
        json!({"account_id": A, "month": "2026-03", "deals_won": 1, "revenue": "1234.50"})
    );
    let (_, of_a) = get_json(base, &format!("/api/revenue-metrics/?account_id={A}")).await;
    assert_eq!(of_a["count"], 2);
    assert_eq!(of_a["results"][0]["month"], "2026-02");

    let (_, counts) = get_json(base, "/api/event-counts/?table=leads").await;
    assert_eq!(counts["count"], 2);
    assert_eq!(
        counts["results"][0],
        json!({"date": "2026-03-01", "table": "leads", "operation": "insert", "processed": 5, "failed": 1})
    );
    let (_, day) = get_json(base, "/api/event-counts/?from=2026-03-02").await;
    assert_eq!(day["count"], 1);

    let (status, health) = get_json(base, "/api/health/").await;
    assert_eq!(status, 200);
    assert_eq!(
        health,
        json!({"outbox_lag": 0, "queue_backend": "postgres", "queue_depth": 0,
               "queue_depth_approximate": false, "failed_events": 0,
               "latency_ms": {"p50": null, "p99": null},
               "databases": {"crm": "up", "analytics": "up", "queue": "up"}, "detail": null})
    );
    sqlx::query(
        "INSERT INTO crm_analytics.latency_histogram VALUES (date_trunc('minute', now()), 10, 7)",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO accounts (name) VALUES ('waiting')")
        .execute(&pool)
        .await
        .unwrap();
    let (_, health) = get_json(base, "/api/health/").await;
    assert_eq!(health["outbox_lag"], 1);
    assert!(health["latency_ms"]["p50"].as_f64().unwrap() > 9.0);
    teardown(db, pool, server).await;
}

#[tokio::test]
async fn bad_input_gets_400_with_what_is_wrong() {
    let (db, pool, server) = setup().await;
    let cases = [
        ("/api/daily-metrics/?date=2026-13-01", "date"),
        ("/api/daily-metrics/?date=yesterday", "YYYY-MM-DD"),
        ("/api/daily-metrics/?from=2026-03-05&to=2026-03-01", "from"),
        (
            "/api/daily-metrics/?date=2026-03-01&from=2026-03-01",
            "either",
        ),
        ("/api/daily-metrics/?account_id=not-a-uuid", "UUID"),
        ("/api/daily-metrics/?limit=-1", "limit"),
        ("/api/daily-metrics/?limit=0", "limit"),
        ("/api/daily-metrics/?limit=abc", "limit"),
        ("/api/daily-metrics/?offset=-5", "offset"),
        ("/api/daily-metrics/?offset=1.5", "offset"),
        ("/api/funnel-metrics/?from=2026-02-30", "from"),
        ("/api/revenue-metrics/?from=2026-1", "YYYY-MM"),
        ("/api/revenue-metrics/?to=2026-03-01", "YYYY-MM"),
        ("/api/revenue-metrics/?from=2026-04&to=2026-03", "from"),
        ("/api/revenue-metrics/?account_id=12", "UUID"),
        (
            "/api/event-counts/?table=bogus",
            "accounts, leads, projects, activities",
        ),
        ("/api/event-counts/?limit=99999999999999999999", "limit"),
    ];
    for (path, mentions) in cases {
        let (status, body) = get_json(&server.base, path).await;
        assert_eq!(status, 400, "{path}: {body}");
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(mentions), "{path}: {detail}");
    }
    teardown(db, pool, server).await;
}

#[tokio::test]
async fn openapi_document_lists_exactly_the_routes_and_matches_responses() {
    let (db, pool, server) = setup().await;
    let doc: Value = common::client()
        .get(format!("{}/api/openapi.json", server.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut paths: Vec<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            "/api/daily-metrics/",
            "/api/event-counts/",
            "/api/funnel-metrics/",
            "/api/health/",
            "/api/revenue-metrics/"
        ]
    );
    let schemas = &doc["components"]["schemas"];
    let properties = |name: &str| -> Vec<String> {
        let mut keys: Vec<String> = schemas[name]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("schema {name}"))
            .keys()
            .cloned()
            .collect();
        keys.sort();
        keys
    };
    let keys = |v: &Value| -> Vec<String> {
        let mut keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    };
    for (path, page, item) in [
        ("/api/daily-metrics/", "DailyMetricPage", "DailyMetric"),
        ("/api/funnel-metrics/", "FunnelMetricPage", "FunnelMetric"),
        (
            "/api/revenue-metrics/",
            "RevenueMetricPage",
            "RevenueMetric",
        ),
        ("/api/event-counts/", "EventCountPage", "EventCount"),
    ] {
        let op = &doc["paths"][path]["get"];
        let reference = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
            .as_str()
            .unwrap();
        assert!(reference.ends_with(page), "{path}: {reference}");
        let mut params: Vec<&str> = op["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        params.sort();
        assert!(
            params.contains(&"limit") && params.contains(&"offset"),
            "{path}: {params:?}"
        );
        let (_, body) = get_json(&server.base, path).await;
        assert_eq!(keys(&body), properties(page), "{path}");
        assert_eq!(keys(&body["results"][0]), properties(item), "{path}");
    }
    let (_, health) = get_json(&server.base, "/api/health/").await;
    assert_eq!(keys(&health), properties("Health"));
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    teardown(db, pool, server).await;
}

#[tokio::test]
async fn analytics_reader_reads_analytics_only() {
    let (db, pool) = TestDb::migrated().await;
    seed(&pool).await;
    let login = format!("bi_{}", &db.name[db.name.len() - 10..]);
    sqlx::raw_sql(&format!(
        "CREATE ROLE {login} LOGIN IN ROLE analytics_reader"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let url = format!(
        "{}/{}",
        common::server_url().replace("postgres@", &format!("{login}@")),
        db.name
    );
    let reader = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM analytics.daily_account_metrics")
        .fetch_one(&reader)
        .await
        .unwrap();
    assert_eq!(n, 4);
    for denied in [
        "SELECT 1 FROM crm_analytics.event_outbox",
        "SELECT 1 FROM crm_analytics.failed_events",
        "SELECT 1 FROM public.leads",
        "DELETE FROM analytics.daily_account_metrics",
    ] {
        let error = sqlx::query(denied)
            .execute(&reader)
            .await
            .expect_err(denied);
        assert!(
            error.to_string().contains("permission denied"),
            "{denied}: {error}"
        );
    }
    reader.close().await;
    db.finish(pool).await;
    common::drop_role(&login).await;
}

/// Responses are cached until the aggregates change: with a one-hour time-to-live, only the
/// change notification can make a changed row show up, whoever changed it (here plain SQL,
/// as an operator or a rebuild would) and on every cached route.
#[tokio::test]
async fn cached_responses_follow_every_commit_to_the_aggregates() {
    let (db, pool, server) = setup().await;
    let routes = [
        (
            "/api/daily-metrics/",
            "UPDATE analytics.daily_account_metrics SET activities = activities + 1",
        ),
        (
            "/api/funnel-metrics/",
            "UPDATE analytics.lead_funnel_metrics SET total = total + 1",
        ),
        (
            "/api/revenue-metrics/",
            "UPDATE analytics.revenue_metrics SET deals_won = deals_won + 1",
        ),
        (
            "/api/event-counts/",
            "DELETE FROM analytics.event_counts WHERE table_name = 'accounts'",
        ),
    ];
    for (path, change) in routes {
        let before = get_json(&server.base, path).await;
        assert_eq!(
            get_json(&server.base, path).await,
            before,
            "{path}: same answer while nothing changes"
        );
        sqlx::query(change).execute(&pool).await.unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            if get_json(&server.base, path).await != before {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{path}: still the cached answer 5 s after {change}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    teardown(db, pool, server).await;
}

/// Requests that miss the cache together share one query: with the funnel table locked,
/// eight concurrent requests for one URL leave one query waiting on the lock, not one per
/// request (the API's pool has eight connections), and all get the same answer once it is
/// released. Another URL is another query.
#[tokio::test]
async fn concurrent_misses_share_one_query() {
    let (db, pool, server) = setup().await;
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE analytics.lead_funnel_metrics IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let get = |path: &'static str| {
        let base = server.base.clone();
        tokio::spawn(async move { get_json(&base, path).await })
    };
    let same: Vec<_> = (0..8).map(|_| get("/api/funnel-metrics/")).collect();
    let other = get("/api/funnel-metrics/?limit=1");
    let waiting = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'
               AND query LIKE '%lead_funnel_metrics%'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while waiting().await < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the requests never reached the database"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Time for any further query to reach the lock too.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        waiting().await,
        2,
        "one query for the eight requests of one URL and one for the other URL"
    );
    lock.commit().await.unwrap();
    let mut answers = Vec::new();
    for request in same {
        answers.push(request.await.unwrap());
    }
    assert!(answers.iter().all(|answer| *answer == answers[0]));
    assert_eq!(answers[0].0, 200);
    assert_eq!(other.await.unwrap().0, 200);
    teardown(db, pool, server).await;
}

/// Next/previous links never come from the request's Host or X-Forwarded-* headers: the
/// cache shares one answer between clients, so a link built from one client's Host would
/// send other clients (and the dashboard's bearer token) to that host.
#[tokio::test]
async fn links_never_carry_a_host_from_the_request() {
    let (db, pool, server) = setup().await;
    let path = "/api/event-counts/?limit=1";
    let send = |host: &'static str| {
        common::client()
            .get(format!("{}{path}", server.base))
            .bearer_auth(TOKEN)
            .header("host", host)
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", host)
            .send()
    };
    let first = send("evil.example").await.unwrap().text().await.unwrap();
    assert!(!first.contains("evil.example"), "{first}");
    let second: Value = send("dashboard.example")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(!second.to_string().contains("evil.example"), "{second}");
    assert!(
        !second.to_string().contains("dashboard.example"),
        "{second}"
    );
    assert_eq!(second["next"], "/api/event-counts/?limit=1&offset=1");
    teardown(db, pool, server).await;

    // With a public URL configured, links are absolute under it, whatever Host says.
    let (db, pool) = TestDb::migrated().await;
    seed(&pool).await;
    let server = Server::start_with(&db, true).await;
    let page: Value = common::client()
        .get(format!(
            "{}/api/event-counts/?limit=1&offset=1",
            server.base
        ))
        .bearer_auth(TOKEN)
        .header("host", "evil.example")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        page["next"],
        format!("{}/api/event-counts/?limit=1&offset=2", server.base)
    );
    assert_eq!(
        page["previous"],
        format!("{}/api/event-counts/?limit=1", server.base)
    );
    let all = common::get_all(&server.base, "/api/event-counts/?limit=1").await;
    assert_eq!(all.len(), 3, "following absolute links visits every row");
    // The slash redirect points under the public URL too (it may carry a proxy's prefix).
    let response = common::client()
        .get(format!("{}/api/event-counts?limit=1", server.base))
        .header("host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 301);
    assert_eq!(
        response.headers()["location"],
        format!("{}/api/event-counts/?limit=1", server.base).as_str()
    );
    teardown(db, pool, server).await;
}

/// Offsets are bounded, so offset + limit never overflows (a panic in debug builds, a
/// negative link in release builds).
#[tokio::test]
async fn offset_is_bounded_and_links_never_overflow() {
    let (db, pool, server) = setup().await;
    let max = crm_analytics::api::query::MAX_OFFSET;
    for offset in [
        i64::MAX.to_string(),
        (i64::MAX - 1).to_string(),
        (i64::MAX - 999).to_string(),
        (max + 1).to_string(),
    ] {
        for path in [
            "/api/daily-metrics/",
            "/api/funnel-metrics/",
            "/api/revenue-metrics/",
            "/api/event-counts/",
        ] {
            let (status, body) =
                get_json(&server.base, &format!("{path}?limit=1000&offset={offset}")).await;
            assert_eq!(status, 400, "{path} offset={offset}: {body}");
            let detail = body["detail"].as_str().unwrap_or_default();
            assert!(
                detail.contains("offset") && detail.contains(&max.to_string()),
                "{detail}"
            );
        }
    }
    let (status, last) = get_json(
        &server.base,
        &format!("/api/event-counts/?limit=1000&offset={max}"),
    )
    .await;
    assert_eq!(status, 200, "{last}");
    assert_eq!(last["results"], json!([]));
    assert_eq!(last["next"], Value::Null);
    assert_eq!(
        last["previous"],
        format!("/api/event-counts/?limit=1000&offset={}", max - 1000)
    );
    teardown(db, pool, server).await;
}

/// Values PostgreSQL text cannot hold, or that are not UTF-8, or huge, get a 400 that says
/// why (or an empty page), never a 5xx.
#[tokio::test]
async fn nul_bytes_broken_utf8_and_huge_values_never_get_a_5xx() {
    let (db, pool, server) = setup().await;
    let nul_cases = [
        ("/api/funnel-metrics/?source=web%00", "source"),
        ("/api/funnel-metrics/?source=%00", "source"),
        ("/api/daily-metrics/?date=2026-03-01%00", "date"),
        ("/api/daily-metrics/?account_id=%00", "account_id"),
        ("/api/revenue-metrics/?from=2026-03%00", "from"),
        ("/api/event-counts/?table=leads%00", "table"),
        ("/api/event-counts/?limit=1%00", "limit"),
    ];
    for (path, name) in nul_cases {
        let (status, body) = get_json(&server.base, path).await;
        assert_eq!(status, 400, "{path}: {body}");
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(name), "{path}: {detail}");
    }
    let (_, body) = get_json(&server.base, "/api/funnel-metrics/?source=a%00b").await;
    assert!(
        body["detail"].as_str().unwrap_or_default().contains("NUL"),
        "{body}"
    );
    // Lone surrogates and overlong forms are not UTF-8: they decode to U+FFFD, match nothing.
    for encoded in [
        "%ED%A0%80",
        "%ED%BF%BF",
        "%C0%AF",
        "%C0%80",
        "%E0%80%AF",
        "%FF%FE",
    ] {
        let path = format!("/api/funnel-metrics/?source=web{encoded}");
        let (status, body) = get_json(&server.base, &path).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(body["count"], 0, "{path}");
    }
    let long = "w".repeat(20_000);
    let (status, body) =
        get_json(&server.base, &format!("/api/funnel-metrics/?source={long}")).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["detail"].as_str().unwrap().len() < 200, "{body}");
    // 100 KB: longer than an HTTP request target may be; the server refuses it itself.
    let huge = "w".repeat(100_000);
    for path in ["/api/funnel-metrics/?source=", "/api/daily-metrics/?date="] {
        let status = common::raw_get_status(&server.base, &format!("{path}{huge}")).await;
        assert!((400..500).contains(&status), "{path}…: {status}");
    }
    teardown(db, pool, server).await;
}

/// The document states what the server accepts (schemathesis checks the rest in CI, see
/// .ci/schemathesis): bounds of limit and offset, formats of dates, months and uuids, the
/// tables `table` names, text without NUL, and that an empty value counts as absent.
#[tokio::test]
async fn openapi_document_declares_what_the_server_accepts() {
    let (db, pool, server) = setup().await;
    let doc: Value = common::client()
        .get(format!("{}/api/openapi.json", server.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let max_offset = crm_analytics::api::query::MAX_OFFSET;
    for path in [
        "/api/daily-metrics/",
        "/api/funnel-metrics/",
        "/api/revenue-metrics/",
        "/api/event-counts/",
    ] {
        for parameter in doc["paths"][path]["get"]["parameters"].as_array().unwrap() {
            let name = parameter["name"].as_str().unwrap();
            let schema = &parameter["schema"];
            assert_eq!(parameter["allowEmptyValue"], true, "{path} {name}");
            let expected = match (path, name) {
                (_, "limit") => {
                    json!({"type": "integer", "format": "int64", "minimum": 1, "maximum": i64::MAX})
                }
                (_, "offset") => {
                    json!({"type": "integer", "format": "int64", "minimum": 0, "maximum": max_offset})
                }
                ("/api/revenue-metrics/", "from" | "to") => {
                    json!({"type": "string", "pattern": "^[0-9]{4}-(0[1-9]|1[0-2])$"})
                }
                (_, "date" | "from" | "to") => json!({"type": "string", "format": "date"}),
                (_, "account_id") => json!({"type": "string", "format": "uuid"}),
                (_, "source") => {
                    json!({"type": "string", "maxLength": 10000, "pattern": "^[^\\x00]*$"})
                }
                (_, "table") => json!(["accounts", "leads", "projects", "activities"]),
                ("/api/funnel-metrics/", "source__isnull")
                | ("/api/daily-metrics/" | "/api/revenue-metrics/", "account_id__isnull") => {
                    json!({"type": "boolean"})
                }
                _ => panic!("{path}: undeclared parameter {name}"),
            };
            if name == "table" {
                assert_eq!(schema["enum"], expected, "{path} {name}");
            } else {
                assert_eq!(schema, &expected, "{path} {name}");
            }
        }
    }
    // What the document allows, the server accepts, at the edges.
    for path in [
        "/api/daily-metrics/?limit=9223372036854775807&offset=1000000000000&account_id=00000000-0000-0000-0000-00000000000A",
        "/api/revenue-metrics/?from=0000-01&to=9999-12&limit=&offset=",
        "/api/event-counts/?from=0001-01-01&to=9999-12-31&table=activities",
        "/api/funnel-metrics/?source=%E2%9C%93%F0%9F%98%80",
        "/api/funnel-metrics/?source__isnull=true&limit=1",
        "/api/daily-metrics/?account_id__isnull=false&account_id__isnull=",
        "/api/revenue-metrics/?account_id__isnull=",
    ] {
        let (status, body) = get_json(&server.base, path).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    // What it does not, the server refuses.
    for path in [
        "/api/daily-metrics/?limit=-9223372036854775808",
        "/api/daily-metrics/?limit=+5",
        "/api/daily-metrics/?date=2026-3-1",
        "/api/daily-metrics/?date=+2026-03-01",
        "/api/daily-metrics/?account_id=0000000000000000000000000000000a",
        "/api/daily-metrics/?account_id={00000000-0000-0000-0000-00000000000a}",
        "/api/revenue-metrics/?from=2026-3",
        "/api/revenue-metrics/?from=2026-13",
    ] {
        let (status, body) = get_json(&server.base, path).await;
        assert_eq!(status, 400, "{path}: {body}");
    }
    teardown(db, pool, server).await;
}
