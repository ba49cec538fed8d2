//! Query strings the DRF way: unknown parameters are ignored, a repeated one counts by its
//! last value, and a bad value gets a 400 that says what is accepted. Also limit/offset
//! pagination and its next/previous links.
//!
//! Every accepted value is one PostgreSQL can hold (text without NUL, dates and numbers in
//! range), so that nothing a client sends turns into a database error; the OpenAPI
//! document declares the same constraints (see `routes`).

use axum::http::Uri;
use chrono::NaiveDate;
use std::sync::Arc;
use uuid::Uuid;

use super::error::ApiError;

pub const DEFAULT_LIMIT: i64 = 100;
pub const MAX_LIMIT: i64 = 1000;
/// Largest offset accepted: far beyond any list's length, and small enough that
/// offset + limit can never overflow.
pub const MAX_OFFSET: i64 = 1_000_000_000_000;
/// Longest text filter accepted, in characters. Aggregate keys are btree-indexed, so no
/// stored value is longer than a few kilobytes; a longer filter could never match.
pub const MAX_TEXT_CHARS: usize = 10_000;

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

    /// A free-text filter: any text PostgreSQL can hold, so never a NUL character.
    pub fn text(&self, name: &str) -> Result<Option<&str>, ApiError> {
        match self.get(name) {
            Some(v) if v.contains('\0') => Err(ApiError::BadRequest(format!(
                "{name} contains a NUL character (%00), which no value can hold"
            ))),
            Some(v) if v.chars().count() > MAX_TEXT_CHARS => Err(ApiError::BadRequest(format!(
                "{name} is longer than {MAX_TEXT_CHARS} characters"
            ))),
            other => Ok(other),
        }
    }

    /// A date written exactly YYYY-MM-DD (chrono alone would also take 2026-3-1 or +2026-03-01).
    pub fn date(&self, name: &str) -> Result<Option<NaiveDate>, ApiError> {
        self.get(name)
            .map(|v| {
                Some(v)
                    .filter(|v| digits_and_dashes(v, &[4, 7]) && v.len() == 10)
                    .and_then(|v| NaiveDate::parse_from_str(v, "%Y-%m-%d").ok())
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!(
                            "{name}={} is not a date; use YYYY-MM-DD",
                            shown(v)
                        ))
                    })
            })
            .transpose()
    }

    /// A month written exactly YYYY-MM, as its first day.
    pub fn month(&self, name: &str) -> Result<Option<NaiveDate>, ApiError> {
        self.get(name)
            .map(|v| {
                Some(v)
                    .filter(|v| digits_and_dashes(v, &[4]) && v.len() == 7)
                    .and_then(|v| NaiveDate::parse_from_str(&format!("{v}-01"), "%Y-%m-%d").ok())
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!(
                            "{name}={} is not a month; use YYYY-MM",
                            shown(v)
                        ))
                    })
            })
            .transpose()
    }

    /// A UUID in its hyphenated form (any case), the one the OpenAPI `uuid` format means.
    pub fn uuid(&self, name: &str) -> Result<Option<Uuid>, ApiError> {
        self.get(name)
            .map(|v| {
                Some(v)
                    .filter(|v| v.len() == 36)
                    .and_then(|v| Uuid::try_parse(v).ok())
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!("{name}={} is not a valid UUID", shown(v)))
                    })
            })
            .transpose()
    }

    pub fn one_of(&self, name: &str, allowed: &[&str]) -> Result<Option<String>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) if allowed.contains(&v) => Ok(Some(v.to_string())),
            Some(v) => Err(ApiError::BadRequest(format!(
                "{name}={} is not one of: {}",
                shown(v),
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
                    "from={} is after to={}; from must not be later than to",
                    shown(self.get("from").unwrap_or_default()),
                    shown(self.get("to").unwrap_or_default())
                )));
            }
        }
        Ok((from, to))
    }

    /// limit (at least 1; above MAX_LIMIT it counts as MAX_LIMIT) and offset (0 to MAX_OFFSET).
    pub fn page(&self) -> Result<Page, ApiError> {
        let number = |name: &str, min: i64, max: i64| -> Result<Option<i64>, ApiError> {
            self.get(name)
                .map(|v| {
                    // Digits only: Rust would also take "+5", which the document does not allow.
                    Some(v)
                        .filter(|v| v.bytes().all(|b| b.is_ascii_digit()))
                        .and_then(|v| v.parse::<i64>().ok())
                        .filter(|n| (min..=max).contains(n))
                        .ok_or_else(|| {
                            let accepted = if name == "limit" {
                                format!("a whole number of at least {min} (values above {MAX_LIMIT} count as {MAX_LIMIT})")
                            } else {
                                format!("a whole number from {min} to {max}")
                            };
                            ApiError::BadRequest(format!(
                                "{name}={} is not valid; use {accepted}",
                                shown(v)
                            ))
                        })
                })
                .transpose()
        };
        Ok(Page {
            limit: number("limit", 1, i64::MAX)?
                .unwrap_or(DEFAULT_LIMIT)
                .min(MAX_LIMIT),
            offset: number("offset", 0, MAX_OFFSET)?.unwrap_or(0),
        })
    }
}

/// True if `v` is ASCII digits with a dash exactly at each of `dashes`.
fn digits_and_dashes(v: &str, dashes: &[usize]) -> bool {
    v.bytes().enumerate().all(|(i, b)| {
        if dashes.contains(&i) {
            b == b'-'
        } else {
            b.is_ascii_digit()
        }
    })
}

/// A rejected value as the error message shows it: quoted and escaped, and cut short, so
/// that a 100 KB value does not come back as a 100 KB error.
fn shown(v: &str) -> String {
    const SHOWN_CHARS: usize = 40;
    if v.chars().count() <= SHOWN_CHARS {
        format!("{v:?}")
    } else {
        let head: String = v.chars().take(SHOWN_CHARS).collect();
        format!("{head:?}…")
    }
}

/// Where next/previous links point. Without a configured public URL they are relative
/// (path and query only): nothing a client sends (Host, X-Forwarded-*) ever reaches a
/// response, so a cached answer is the same for every client.
#[derive(Debug, Clone, Default)]
pub struct Links {
    public_url: Option<Arc<str>>,
}

impl Links {
    /// `path` (absolute, from the root of this server) as clients must request it: under
    /// the public URL when one is configured (it may carry a path prefix of a proxy).
    pub fn to(&self, path: &str) -> String {
        format!("{}{path}", self.public_url.as_deref().unwrap_or_default())
    }

    /// `public_url`: scheme, host and any path prefix the API is reached at, without a
    /// trailing slash (see `config::parse_public_url`).
    pub fn new(public_url: Option<&str>) -> Self {
        Self {
            public_url: public_url.map(|u| Arc::from(u.trim_end_matches('/'))),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Page {
    pub limit: i64,
    pub offset: i64,
}

impl Page {
    /// DRF's next and previous links, keeping every other parameter: absolute under the
    /// configured public URL, else relative to the request.
    pub fn links(&self, count: i64, uri: &Uri, links: &Links) -> (Option<String>, Option<String>) {
        let base = format!(
            "{}{}",
            links.public_url.as_deref().unwrap_or_default(),
            uri.path()
        );
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
        // page() bounds offset and limit, so these sums cannot overflow; saturating anyway.
        let after = self.offset.saturating_add(self.limit);
        let next = (after < count && after <= MAX_OFFSET).then(|| url(Some(after)));
        let previous = (self.offset > 0).then(|| {
            let back = self.offset.saturating_sub(self.limit);
            url((back > 0).then_some(back))
        });
        (next, previous)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(query: &str) -> Result<Page, ApiError> {
        Params::parse(Some(query)).page()
    }

    #[test]
    fn links_are_relative_or_under_the_public_url() {
        let uri: Uri = "/api/event-counts/?table=leads&offset=10&limit=10"
            .parse()
            .unwrap();
        let p = page("limit=10&offset=10").unwrap();
        let (next, previous) = p.links(100, &uri, &Links::default());
        assert_eq!(
            next.as_deref(),
            Some("/api/event-counts/?table=leads&limit=10&offset=20")
        );
        assert_eq!(
            previous.as_deref(),
            Some("/api/event-counts/?table=leads&limit=10")
        );
        let public = Links::new(Some("https://analytics.example.com/crm/"));
        let (next, _) = p.links(100, &uri, &public);
        assert_eq!(
            next.as_deref(),
            Some("https://analytics.example.com/crm/api/event-counts/?table=leads&limit=10&offset=20")
        );
    }

    #[test]
    fn offsets_are_bounded_so_links_cannot_overflow() {
        let uri: Uri = "/api/daily-metrics/".parse().unwrap();
        assert!(page(&format!("offset={}", i64::MAX)).is_err());
        assert!(page(&format!("offset={}", MAX_OFFSET + 1)).is_err());
        let last = page(&format!("limit={}&offset={MAX_OFFSET}", i64::MAX)).unwrap();
        assert_eq!(last.limit, MAX_LIMIT);
        let (next, previous) = last.links(i64::MAX, &uri, &Links::default());
        assert_eq!(next, None, "no link to an offset the server refuses");
        assert!(previous.is_some());
    }

    #[test]
    fn text_filters_refuse_nul_and_overlong_values() {
        let nul = Params::parse(Some("source=a%00b"));
        assert!(matches!(nul.text("source"), Err(ApiError::BadRequest(d)) if d.contains("NUL")));
        let long = format!("source={}", "x".repeat(MAX_TEXT_CHARS + 1));
        assert!(Params::parse(Some(&long)).text("source").is_err());
        let odd = Params::parse(Some("source=%ED%A0%80%C0%AF"));
        assert_eq!(
            odd.text("source").unwrap(),
            Some("\u{FFFD}\u{FFFD}\u{FFFD}\u{FFFD}\u{FFFD}")
        );
    }
}
