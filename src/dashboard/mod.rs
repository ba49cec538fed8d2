//! Dashboard: the built-in live dashboard, one HTML page with its styles and script
//! embedded in the binary (nothing is fetched from the internet). It reads the same JSON
//! API with the token the user enters once (kept in the browser's localStorage).

use axum::http::header;
use axum::response::IntoResponse;

const PAGE: &str = include_str!("index.html");

pub async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
}
