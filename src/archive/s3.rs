//! The archive on S3 and S3-compatible servers (MinIO, Ceph, R2, moto, ...).
//!
//! Owns how an `s3://bucket/prefix` location becomes an object store: settings from the
//! usual AWS_* variables (read by `object_store`), then CRM_ANALYTICS_S3_ENDPOINT and any
//! explicit [`S3Options`] on top; plain http allowed when the endpoint is http; path-style
//! requests (`{endpoint}/{bucket}/{key}`) unless AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true. Also
//! owns the start-up probe that finds a wrong endpoint, a missing bucket or bad credentials
//! before the first batch does.

use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::{BackoffConfig, RetryConfig};
use std::time::Duration;

use super::ArchiveError;

/// Settings that override the AWS_* variables (all optional).
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// The S3-compatible server's URL (CRM_ANALYTICS_S3_ENDPOINT), e.g. http://127.0.0.1:9000.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

/// Longest the start-up probe waits for an answer (a black-holed endpoint, a credentials
/// service that does not answer): the process then stops saying so rather than hanging.
const PROBE_TIMEOUT: Duration = Duration::from_secs(15);

/// Retries of one archive write. The write happens inside the batch's transaction, so the
/// store does not retry for long: past this the batch fails as a whole, its transaction
/// rolls back and the worker retries it later (object_store's default is 10 retries within
/// 3 minutes, which would hold the batch's locks that long).
fn write_retries() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: 3,
        retry_timeout: Duration::from_secs(30),
    }
}

/// Retries of the start-up probe: one, so that a connection refused is reported at once.
fn probe_retries() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: 1,
        retry_timeout: Duration::from_secs(5),
    }
}

/// An http(s) URL without query, fragment or credentials, without a trailing slash: the
/// value of CRM_ANALYTICS_S3_ENDPOINT.
pub fn parse_endpoint(text: &str) -> Result<String, String> {
    let example = "write the server's URL, e.g. http://127.0.0.1:9000 or https://s3.example.com";
    // Never the text itself in an error: it may carry a password.
    let shown = crate::config::redact_userinfo(text);
    let url =
        url::Url::parse(text).map_err(|e| format!("{shown:?} is not a URL ({e}); {example}"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "{shown:?} carries credentials; put them in AWS_ACCESS_KEY_ID and \
             AWS_SECRET_ACCESS_KEY and {example}"
        ));
    }
    let plain = matches!(url.scheme(), "http" | "https")
        && url.host().is_some()
        && url.query().is_none()
        && url.fragment().is_none();
    if plain {
        Ok(url.as_str().trim_end_matches('/').to_string())
    } else {
        Err(format!("{shown:?} is not a plain http(s) URL; {example}"))
    }
}

/// An S3 bucket opened for the archive: the store that writes and the probe that checks it.
pub(super) struct S3Bucket {
    pub store: AmazonS3,
    probe: AmazonS3,
    location: String,
    bucket: String,
    /// Where requests go and the setting that said so, for error messages.
    server: String,
}

impl S3Bucket {
    /// Builds the stores for `location` = `s3://{rest}`; no request is made yet.
    pub fn open(location: &str, rest: &str, options: &S3Options) -> Result<Self, ArchiveError> {
        let fail = |reason: String| ArchiveError::Location {
            location: location.to_string(),
            reason,
        };
        let bucket = rest.split('/').next().unwrap_or_default();
        if bucket.is_empty() {
            return Err(fail(
                "it names no bucket; write s3://bucket or s3://bucket/prefix".into(),
            ));
        }
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        let env_endpoint = builder.get_config_value(&AmazonS3ConfigKey::Endpoint);
        let (endpoint, server) = match (&options.endpoint, env_endpoint) {
            (Some(endpoint), _) => {
                let endpoint =
                    parse_endpoint(endpoint).map_err(|reason| ArchiveError::Endpoint {
                        setting: "CRM_ANALYTICS_S3_ENDPOINT",
                        reason,
                    })?;
                builder = builder.with_endpoint(&endpoint);
                let server = format!("{endpoint} (CRM_ANALYTICS_S3_ENDPOINT)");
                (endpoint, server)
            }
            (None, Some(endpoint)) => {
                let setting = "AWS_ENDPOINT_URL (or AWS_ENDPOINT)";
                let endpoint = parse_endpoint(&endpoint)
                    .map_err(|reason| ArchiveError::Endpoint { setting, reason })?;
                builder = builder.with_endpoint(&endpoint);
                let server = format!("{endpoint} ({setting})");
                (endpoint, server)
            }
            (None, None) => (
                String::new(),
                "AWS S3 (CRM_ANALYTICS_S3_ENDPOINT is unset)".to_string(),
            ),
        };
        // An http endpoint is a choice the operator made (a server on the local network):
        // object_store refuses plain http unless told.
        if endpoint.starts_with("http://") {
            builder = builder.with_allow_http(true);
        }
        // Path-style requests are object_store's default, and what S3-compatible servers
        // expect; AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true (read by from_env) still switches.
        if let Some(region) = &options.region {
            builder = builder.with_region(region);
        }
        if let Some(key) = &options.access_key_id {
            builder = builder.with_access_key_id(key);
        }
        if let Some(secret) = &options.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        let build = |retries: RetryConfig| {
            builder
                .clone()
                .with_retry(retries)
                .build()
                .map_err(|e| fail(e.to_string()))
        };
        Ok(Self {
            store: build(write_retries())?,
            probe: build(probe_retries())?,
            location: location.to_string(),
            bucket: bucket.to_string(),
            server,
        })
    }

    /// Lists at most one key under `prefix`: a missing bucket, a wrong endpoint, a server
    /// that is down or credentials it refuses are found at start, not by the first batch.
    /// A bucket that only lets us write (no s3:ListBucket) passes with a warning.
    pub async fn check(&self, prefix: &str) -> Result<(), ArchiveError> {
        let options = PaginatedListOptions {
            max_keys: Some(1),
            ..Default::default()
        };
        let prefix = (!prefix.is_empty()).then(|| format!("{prefix}/"));
        let listed = tokio::time::timeout(
            PROBE_TIMEOUT,
            self.probe.list_paginated(prefix.as_deref(), options),
        )
        .await;
        let error = match listed {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("no answer within {PROBE_TIMEOUT:?}"),
        };
        if error.contains("NoSuchBucket") || error.contains("status code: 404") {
            return Err(ArchiveError::MissingBucket {
                location: self.location.clone(),
                bucket: self.bucket.clone(),
                server: self.server.clone(),
            });
        }
        if error.contains("AccessDenied") {
            tracing::warn!(
                archive = %self.location,
                %error,
                "the archive's bucket cannot be listed with these credentials, so it was not \
                 checked at start; writes will show whether it exists"
            );
            return Ok(());
        }
        Err(ArchiveError::Unavailable {
            location: self.location.clone(),
            server: self.server.clone(),
            reason: error,
        })
    }
}
