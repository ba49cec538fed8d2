//! API errors in Django REST Framework's shape: `{"detail": "..."}` with the right status.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

#[derive(Debug)]
pub enum ApiError {
    /// The request is wrong; the text says what is wrong and what is accepted.
    BadRequest(String),
    Unauthorized(&'static str),
    NotFound,
    /// Our fault or the database's; logged, never echoed in detail.
    Internal(String),
    Unavailable(String),
}

impl From<sqlx::Error> for ApiError {
    /// A database that cannot be reached (or is going away) is a 503, which clients and
    /// load balancers retry, not a 500: nothing is wrong with the request or with us.
    fn from(error: sqlx::Error) -> Self {
        if unreachable(&error) {
            ApiError::Unavailable(error.to_string())
        } else {
            ApiError::Internal(error.to_string())
        }
    }
}

/// Errors that say the database is not there right now, rather than that a query failed.
fn unreachable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08 connection exception, 57P admin shutdown / cannot connect now,
            // 53 insufficient resources, 3D000 database does not exist (dropped).
            code.starts_with("08")
                || code.starts_with("57P")
                || code.starts_with("53")
                || code == "3D000"
        }),
        _ => false,
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(error: anyhow::Error) -> Self {
        ApiError::Internal(format!("{error:#}"))
    }
}

pub fn detail(status: StatusCode, text: &str) -> Response {
    (status, Json(json!({ "detail": text }))).into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::BadRequest(text) => detail(StatusCode::BAD_REQUEST, &text),
            ApiError::Unauthorized(text) => {
                let mut response = detail(StatusCode::UNAUTHORIZED, text);
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
                response
            }
            ApiError::NotFound => detail(StatusCode::NOT_FOUND, "Not found."),
            ApiError::Internal(error) => {
                tracing::error!(%error, "request failed");
                detail(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "A server error occurred.",
                )
            }
            ApiError::Unavailable(error) => {
                tracing::warn!(%error, "not ready");
                detail(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "The database is not reachable.",
                )
            }
        }
    }
}
