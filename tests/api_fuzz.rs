//! Property: random query strings and headers on every route never get a 500 and never
//! panic the server; /api/ answers are always JSON. Values include NUL characters, bytes
//! that are not UTF-8 (lone surrogates, overlong forms), offsets up to i64::MAX and long
//! texts; 100 KB values go to a live server, since no request target can be that long.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::TestDb;
use crm_analytics::api::{auth::Tokens, cache::ResponseCache, query::Links, router, AppState};
use http_body_util::BodyExt;
use proptest::prelude::*;
use std::time::Duration;
use tower::ServiceExt;

const ROUTES: [&str; 12] = [
    "/api/daily-metrics/",
    "/api/funnel-metrics/",
    "/api/revenue-metrics/",
    "/api/event-counts/",
    "/api/health/",
    "/api/daily-metrics",
    "/api/openapi.json",
    "/api/unknown/",
    "/healthz",
    "/readyz",
    "/metrics",
    "/",
];
const NAMES: [&str; 14] = [
    "date",
    "from",
    "to",
    "account_id",
    "source",
    "account_id__isnull",
    "source__isnull",
    "table",
    "limit",
    "offset",
    "x",
    "",
    "limit[]",
    "%",
];

/// Raw query values, already percent-encoded: bytes no text can hold.
const RAW: [&str; 9] = [
    "%00",
    "web%00",
    "%ED%A0%80",
    "%ED%BF%BF",
    "a%ED%B0%80b",
    "%C0%AF",
    "%C0%80",
    "%E0%80%AF",
    "%F8%88%80%80%80",
];

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => text_value().prop_map(|v| url::form_urlencoded::byte_serialize(v.as_bytes()).collect()),
        1 => prop::sample::select(RAW.to_vec()).prop_map(str::to_string),
    ]
}

fn text_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("2026-03-01".to_string()),
        Just("2026-03".to_string()),
        Just("00000000-0000-0000-0000-00000000000a".to_string()),
        Just("leads".to_string()),
        Just("true".to_string()),
        Just("false".to_string()),
        (-5i64..5_000).prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        "[ -~]{0,12}",
        "\\PC{0,8}",
        Just("%ZZ%00%FF".to_string()),
        Just("9".repeat(40)),
        "[a-z]{0,3}\\x00[a-z]{0,3}",
        (i64::MAX - 2_000..=i64::MAX).prop_map(|n| n.to_string()),
        Just((crm_analytics::api::query::MAX_OFFSET + 1).to_string()),
        Just("\u{10FFFF}\u{FFFD}".to_string()),
        (9_990usize..10_010).prop_map(|n| "s".repeat(n)),
        Just("x".repeat(60_000)),
    ]
}

fn query() -> impl Strategy<Value = String> {
    prop::collection::vec((prop::sample::select(NAMES.to_vec()), value()), 0..6).prop_map(|pairs| {
        pairs
            .into_iter()
            .map(|(k, v)| {
                // Sometimes raw, sometimes encoded: both must be safe.
                if v.len() % 3 == 0 {
                    format!("{k}={v}")
                } else {
                    format!("{k}={}", v.replace('+', " ").replace(' ', "%20"))
                }
            })
            .collect::<Vec<_>>()
            .join("&")
    })
}

fn authorization() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        Just(Some(format!("Bearer {}", common::TOKEN))),
        Just(Some("Bearer ".to_string())),
        Just(Some("Basic dXNlcjpwYXNz".to_string())),
        "[ -~]{0,40}".prop_map(Some),
    ]
}

/// A router over a fresh database with a row in two lists, and the runtime it runs on.
fn app() -> (tokio::runtime::Runtime, TestDb, axum::Router) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (db, app) = runtime.block_on(async {
        let (db, pool) = TestDb::migrated().await;
        sqlx::raw_sql(
            "INSERT INTO analytics.daily_account_metrics VALUES ('00000000-0000-0000-0000-00000000000a', '2026-03-01', 1, 0, 0, 0, 1.5);
             INSERT INTO analytics.lead_funnel_metrics VALUES ('2026-03-01', 'web', 1, 0, 0, 0, 0, 1);",
        )
        .execute(&pool)
        .await
        .unwrap();
        let queue = common::open_queue(&pool, u64::MAX).await;
        let state = AppState { crm: pool.clone(), analytics: pool.clone(), queue };
        let cache = ResponseCache::start(&pool, Duration::from_secs(3600)).await;
        assert!(cache.is_some(), "the response cache listens for changes");
        (db, router(state, Tokens::parse(common::TOKEN), cache, Links::default()))
    });
    (runtime, db, app)
}

/// Status and body of one GET with the token.
fn get(
    runtime: &tokio::runtime::Runtime,
    app: &axum::Router,
    uri: &str,
) -> Option<(StatusCode, axum::body::Bytes)> {
    let mut request = Request::get(uri).body(Body::empty()).ok()?;
    let token = axum::http::HeaderValue::from_str(&format!("Bearer {}", common::TOKEN)).ok()?;
    request.headers_mut().insert("authorization", token);
    Some(runtime.block_on(async {
        let response = app.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        (
            status,
            response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes(),
        )
    }))
}

/// Property: one hostile value (NUL, bytes that are not UTF-8, huge numbers, long text) in
/// any filter of any list, next to valid ones, gets a 200 or a 400 that names the filter.
#[test]
fn a_hostile_value_in_any_filter_gets_a_400_naming_it_or_a_page() {
    let (runtime, db, app) = app();
    let lists = [
        (
            "/api/daily-metrics/",
            &[
                "date",
                "account_id",
                "account_id__isnull",
                "limit",
                "offset",
            ][..],
        ),
        (
            "/api/funnel-metrics/",
            &["from", "to", "source", "source__isnull", "limit", "offset"][..],
        ),
        (
            "/api/revenue-metrics/",
            &[
                "from",
                "to",
                "account_id",
                "account_id__isnull",
                "limit",
                "offset",
            ][..],
        ),
        (
            "/api/event-counts/",
            &["from", "to", "table", "limit", "offset"][..],
        ),
    ];
    let config = ProptestConfig {
        cases: 300,
        ..ProptestConfig::default()
    };
    proptest!(config, |((route, names) in prop::sample::select(lists.to_vec()), pick in any::<prop::sample::Index>(), hostile in value())| {
        let name = names[pick.index(names.len())];
        let uri = format!("{route}?limit=5&{name}={hostile}");
        let Some((status, body)) = get(&runtime, &app, &uri) else { return Ok(()); };
        prop_assert!(status == StatusCode::OK || status == StatusCode::BAD_REQUEST, "{uri}: {status} {body:?}");
        let json: serde_json::Value = serde_json::from_slice(&body).map_err(|e| TestCaseError::fail(format!("{uri}: {e}")))?;
        if status == StatusCode::BAD_REQUEST {
            let detail = json["detail"].as_str().unwrap_or_default();
            prop_assert!(detail.contains(name), "{uri}: {detail}");
        }
        if hostile.contains("%00") {
            prop_assert_eq!(status, StatusCode::BAD_REQUEST, "{}: NUL", uri);
        }
    });
    runtime.block_on(db.drop_db());
}

#[test]
fn random_queries_and_headers_never_get_a_500() {
    let (runtime, db, app) = app();
    let config = ProptestConfig {
        cases: 400,
        ..ProptestConfig::default()
    };
    proptest!(config, |(route in prop::sample::select(ROUTES.to_vec()), query in query(), auth in authorization(),
                        accept in prop::option::of("[ -~]{0,20}"), host in prop::option::of("[a-z0-9.:-]{0,20}"))| {
        let uri = if query.is_empty() { route.to_string() } else { format!("{route}?{query}") };
        let Ok(mut request) = Request::get(&uri).body(Body::empty()) else { return Ok(()); };
        for (name, value) in [("authorization", auth), ("accept", accept), ("host", host)] {
            if let Some(Ok(value)) = value.map(|v| axum::http::HeaderValue::from_str(&v)) {
                request.headers_mut().insert(name, value);
            }
        }
        let (status, body) = runtime.block_on(async {
            let response = app.clone().oneshot(request).await.expect("infallible");
            let status = response.status();
            (status, response.into_body().collect().await.expect("body").to_bytes())
        });
        prop_assert!(status != StatusCode::INTERNAL_SERVER_ERROR, "{uri}: 500 {body:?}");
        prop_assert!(status.as_u16() < 500, "{uri}: {status}");
        if route.starts_with("/api/") && status != StatusCode::MOVED_PERMANENTLY {
            prop_assert!(serde_json::from_slice::<serde_json::Value>(&body).is_ok(), "{uri}: {status} not JSON");
        }
    });
    runtime.block_on(db.drop_db());
}

/// 100 KB values for every parameter of every route, through a live server's HTTP parser:
/// refused with a 4xx (the request target is too long), never a 5xx or a dropped connection.
#[tokio::test]
async fn hundred_kilobyte_values_never_get_a_5xx() {
    let (db, pool) = TestDb::migrated().await;
    let server = common::Server::start(&db).await;
    let huge = "7".repeat(100_000);
    for route in ROUTES {
        for name in NAMES {
            let target = format!("{route}?{name}={huge}");
            let status = common::raw_get_status(&server.base, &target).await;
            assert!((400..500).contains(&status), "{route}?{name}=…: {status}");
        }
    }
    server.stop().await;
    db.finish(pool).await;
}
