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
    fn from(error: sqlx::Error) -> Self {
        ApiError::Internal(error.to_string())
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
