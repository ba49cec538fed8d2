//! Bearer-token authentication for /api/ routes. Tokens come from CRM_ANALYTICS_API_TOKENS;
//! they are compared in constant time and never logged.

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;
use std::sync::Arc;
use subtle::ConstantTimeEq;

use super::error::ApiError;

#[derive(Clone)]
pub struct Tokens(Arc<Vec<Vec<u8>>>);

impl Tokens {
    /// Parses a comma-separated list; blanks are ignored.
    pub fn parse(list: &str) -> Self {
        Self(Arc::new(
            list.split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(|t| t.as_bytes().to_vec())
                .collect(),
        ))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn accepts(&self, candidate: &[u8]) -> bool {
        // Every configured token is compared, so timing does not tell which one matched.
        self.0
            .iter()
            .fold(subtle::Choice::from(0), |found, token| {
                found | token.as_slice().ct_eq(candidate)
            })
            .into()
    }
}

pub async fn require_token(
    State(tokens): State<Tokens>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let header = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let Some(value) = header else {
        return Err(ApiError::Unauthorized(
            "Authentication credentials were not provided.",
        ));
    };
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .unwrap_or_default();
    if token.is_empty() || !tokens.accepts(token.as_bytes()) {
        return Err(ApiError::Unauthorized("Invalid token."));
    }
    Ok(next.run(request).await)
}
