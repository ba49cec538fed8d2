//! Query strings the DRF way: unknown parameters are ignored, a repeated one counts by its
//! last value, and a bad value gets a 400 that says what is accepted. Also limit/offset
//! pagination and its next/previous links.

use axum::http::{HeaderMap, Uri};
use chrono::NaiveDate;
use uuid::Uuid;

use super::error::ApiError;

pub const DEFAULT_LIMIT: i64 = 100;
pub const MAX_LIMIT: i64 = 1000;

pub struct Params {
    pairs: Vec<(String, String)>,
}

impl Params {
    pub fn parse(query: Option<&str>) -> Self {
        let pairs = url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        Self { pairs }
    }

    /// The last value of `name`; an empty value counts as absent, as in DRF filters.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    pub fn date(&self, name: &str) -> Result<Option<NaiveDate>, ApiError> {
        self.get(name)
            .map(|v| {
                NaiveDate::parse_from_str(v, "%Y-%m-%d").map_err(|_| {
                    ApiError::BadRequest(format!("{name}={v:?} is not a date; use YYYY-MM-DD"))
                })
            })
            .transpose()
    }

    /// A month as its first day.
    pub fn month(&self, name: &str) -> Result<Option<NaiveDate>, ApiError> {
        self.get(name)
            .map(|v| {
                NaiveDate::parse_from_str(&format!("{v}-01"), "%Y-%m-%d")
                    .ok()
                    .filter(|_| v.len() == 7)
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!("{name}={v:?} is not a month; use YYYY-MM"))
                    })
            })
            .transpose()
    }

    pub fn uuid(&self, name: &str) -> Result<Option<Uuid>, ApiError> {
        self.get(name)
            .map(|v| {
                Uuid::try_parse(v)
                    .map_err(|_| ApiError::BadRequest(format!("{name}={v:?} is not a valid UUID")))
            })
            .transpose()
    }

    pub fn one_of(&self, name: &str, allowed: &[&str]) -> Result<Option<String>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) if allowed.contains(&v) => Ok(Some(v.to_string())),
            Some(v) => Err(ApiError::BadRequest(format!(
                "{name}={v:?} is not one of: {}",
                allowed.join(", ")
            ))),
        }
    }

    /// `from`/`to` as an inclusive range; `from` after `to` is an error.
    pub fn range<T: PartialOrd + Copy>(
        &self,
        parse: impl Fn(&Self, &str) -> Result<Option<T>, ApiError>,
    ) -> Result<(Option<T>, Option<T>), ApiError> {
        let from = parse(self, "from")?;
        let to = parse(self, "to")?;
        if let (Some(f), Some(t)) = (from, to) {
            if f > t {
                return Err(ApiError::BadRequest(format!(
                    "from={:?} is after to={:?}; from must not be later than to",
                    self.get("from").unwrap_or_default(),
                    self.get("to").unwrap_or_default()
                )));
            }
        }
        Ok((from, to))
    }

    pub fn page(&self) -> Result<Page, ApiError> {
        let number = |name: &str, min: i64| -> Result<Option<i64>, ApiError> {
            self.get(name)
                .map(|v| {
                    v.parse::<i64>().ok().filter(|n| *n >= min).ok_or_else(|| {
                        ApiError::BadRequest(format!(
                            "{name}={v:?} is not valid; use a whole number of at least {min}"
                        ))
                    })
                })
                .transpose()
        };
        Ok(Page {
            limit: number("limit", 1)?.unwrap_or(DEFAULT_LIMIT).min(MAX_LIMIT),
            offset: number("offset", 0)?.unwrap_or(0),
        })
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Page {
    pub limit: i64,
    pub offset: i64,
}

impl Page {
    /// DRF's next and previous links: absolute URLs keeping every other parameter.
    pub fn links(
        &self,
        count: i64,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> (Option<String>, Option<String>) {
        let host = headers
            .get(axum::http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost");
        let scheme = headers
            .get("x-forwarded-proto")
            .and_then(|h| h.to_str().ok())
            .filter(|p| *p == "https")
            .unwrap_or("http");
        let base = format!("{scheme}://{host}{}", uri.path());
        let kept: Vec<(String, String)> =
            url::form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
                .filter(|(k, _)| k != "limit" && k != "offset")
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
        let url = |offset: Option<i64>| {
            let mut query = url::form_urlencoded::Serializer::new(String::new());
            for (k, v) in &kept {
                query.append_pair(k, v);
            }
            query.append_pair("limit", &self.limit.to_string());
            if let Some(offset) = offset {
                query.append_pair("offset", &offset.to_string());
            }
            format!("{base}?{}", query.finish())
        };
        let next = (self.offset + self.limit < count).then(|| url(Some(self.offset + self.limit)));
        let previous = (self.offset > 0).then(|| {
            let back = self.offset - self.limit;
            url((back > 0).then_some(back))
        });
        (next, previous)
    }
}
