//! Opening an SQS queue: the SDK client (standard AWS credential and region chain, hyper +
//! rustls with ring as the HTTP client), the endpoint, and the queue URL (looked up by
//! name, and the queue created when missing).

use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_sqs::config::Credentials;
use aws_sdk_sqs::types::QueueAttributeName;
use aws_sdk_sqs::Client;
use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
use std::time::Duration;

use super::error::{broker, other};
use super::SqsSettings;
use crate::queue::{QueueError, SqsTarget};

/// A connection that cannot be made in this time fails (and is retried) instead of hanging.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// One attempt of one call; above the 20 s of the longest long poll.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// SQS's longest message retention: 14 days.
const MAX_RETENTION_SECONDS: u32 = 14 * 24 * 60 * 60;
/// The region signed for when none is configured and the server is not AWS's: local
/// SQS-compatible servers accept any.
const LOCAL_REGION: &str = "us-east-1";

/// The variables through which the SDK itself takes an endpoint.
const ENDPOINT_VARIABLES: [&str; 2] = ["AWS_ENDPOINT_URL_SQS", "AWS_ENDPOINT_URL"];

/// An SQS client for `target`: settings first, then what the queue URL says, then the
/// standard AWS chain.
pub(super) async fn client(
    target: &SqsTarget,
    settings: &SqsSettings,
) -> Result<Client, QueueError> {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .operation_attempt_timeout(ATTEMPT_TIMEOUT)
        .build();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .timeout_config(timeouts);
    // A queue URL names its region: requests for that queue must go there.
    let region = settings
        .region
        .clone()
        .or_else(|| target.url_region().map(str::to_string));
    if let Some(region) = region {
        loader = loader.region(Region::new(region));
    }
    if let Some(credentials) = &settings.credentials {
        loader = loader.credentials_provider(Credentials::new(
            &credentials.access_key_id,
            &credentials.secret_access_key,
            None,
            None,
            "crm-analytics settings",
        ));
    }
    let endpoint = settings.endpoint.clone().or_else(|| url_endpoint(target));
    if let Some(endpoint) = &endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    let sdk = loader.load().await;
    let mut config = aws_sdk_sqs::config::Builder::from(&sdk);
    if sdk.region().is_none() {
        let custom_endpoint = endpoint.is_some()
            || ENDPOINT_VARIABLES
                .iter()
                .any(|v| std::env::var_os(v).is_some());
        if !custom_endpoint {
            return Err(QueueError::Setting(format!(
                "no AWS region for the SQS queue {target}: set AWS_REGION (or a region in \
                 the AWS profile), or give the queue's URL \
                 (sqs://https://sqs.REGION.amazonaws.com/ACCOUNT/NAME), which names it"
            )));
        }
        tracing::debug!(
            region = LOCAL_REGION,
            "no AWS region set; signing for a default one for the SQS-compatible server"
        );
        config = config.region(Region::new(LOCAL_REGION));
    }
    Ok(Client::from_conf(config.build()))
}

/// The server of a queue URL that is not AWS's (a local SQS-compatible server), unless the
/// SDK's own endpoint variables say where to go.
fn url_endpoint(target: &SqsTarget) -> Option<String> {
    let SqsTarget::Url(url) = target else {
        return None;
    };
    let is_aws = url.host_str().is_some_and(|host| {
        host.ends_with(".amazonaws.com") || host.ends_with(".amazonaws.com.cn")
    });
    if is_aws
        || ENDPOINT_VARIABLES
            .iter()
            .any(|v| std::env::var_os(v).is_some())
    {
        return None;
    }
    Some(url.origin().ascii_serialization())
}

/// The queue's URL: the target's own, or looked up by name and the queue created (with
/// the lease as its visibility timeout) when it does not exist. A URL target is checked to
/// exist, so that a wrong URL or missing permission fails now, not at the first event.
pub(super) async fn queue_url(
    client: &Client,
    target: &SqsTarget,
    lease_seconds: i32,
    creates: bool,
) -> Result<String, QueueError> {
    let name = match target {
        SqsTarget::Url(url) => {
            let url = url.to_string();
            check_existing(client, &url).await?;
            return Ok(url);
        }
        SqsTarget::Name(name) => name,
    };
    match look_up(client, name).await? {
        Some(url) => {
            check_existing(client, &url).await?;
            Ok(url)
        }
        None if creates => create(client, name, target.is_fifo(), lease_seconds).await,
        None => Err(QueueError::Setting(format!(
            "the SQS queue {name} does not exist; relays and workers create it when they \
             start. Check the name in CRM_ANALYTICS_QUEUE"
        ))),
    }
}

/// A queue someone else made: refused when SQS would move events elsewhere on its own
/// (a redrive policy sends a message received maxReceiveCount times to a dead-letter queue
/// the workers never read, so the aggregates would miss it without a trace), and a warning
/// when it keeps messages for less than SQS's longest retention.
async fn check_existing(client: &Client, url: &str) -> Result<(), QueueError> {
    let answer = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::RedrivePolicy)
        .attribute_names(QueueAttributeName::MessageRetentionPeriod)
        .send()
        .await
        .map_err(|e| broker("GetQueueAttributes", e))?;
    let attribute = |name| answer.attributes().and_then(|a| a.get(&name)).cloned();
    if let Some(policy) = attribute(QueueAttributeName::RedrivePolicy).filter(|p| !p.is_empty()) {
        return Err(QueueError::Setting(format!(
            "the SQS queue {url} has a redrive policy ({policy}): SQS would move an event \
             received that many times to a dead-letter queue the workers never read, and the \
             aggregates would miss it silently. Remove the queue's redrive policy (crm-analytics \
             parks events it cannot apply in failed_events itself, after \
             CRM_ANALYTICS_MAX_ATTEMPTS) or name another queue in CRM_ANALYTICS_QUEUE"
        )));
    }
    let retention = attribute(QueueAttributeName::MessageRetentionPeriod)
        .and_then(|seconds| seconds.parse::<u32>().ok());
    if let Some(seconds) = retention.filter(|&s| s < MAX_RETENTION_SECONDS) {
        tracing::warn!(queue = url, retention_s = seconds, "the SQS queue deletes messages older than its retention period: events waiting longer than that (workers stopped) are lost; set MessageRetentionPeriod to 1209600 (14 days)");
    }
    Ok(())
}

/// GetQueueUrl; None when the queue does not exist.
async fn look_up(client: &Client, name: &str) -> Result<Option<String>, QueueError> {
    match client.get_queue_url().queue_name(name).send().await {
        Ok(found) => found
            .queue_url()
            .map(|url| Some(url.to_string()))
            .ok_or_else(|| {
                other(
                    "GetQueueUrl",
                    format!("no URL returned for queue {name:?}"),
                    true,
                )
            }),
        Err(error)
            if error
                .as_service_error()
                .is_some_and(|e| e.is_queue_does_not_exist()) =>
        {
            Ok(None)
        }
        Err(error) => Err(broker("GetQueueUrl", error)),
    }
}

async fn create(
    client: &Client,
    name: &str,
    fifo: bool,
    lease_seconds: i32,
) -> Result<String, QueueError> {
    // SQS's longest retention (14 days, not its default of 4): events that wait in the
    // queue through a long outage of the workers are not deleted by SQS.
    let mut request = client
        .create_queue()
        .queue_name(name)
        .attributes(
            QueueAttributeName::VisibilityTimeout,
            lease_seconds.to_string(),
        )
        .attributes(
            QueueAttributeName::MessageRetentionPeriod,
            MAX_RETENTION_SECONDS.to_string(),
        );
    if fifo {
        request = request.attributes(QueueAttributeName::FifoQueue, "true");
    }
    match request.send().await {
        Ok(created) => {
            let url = created.queue_url().map(str::to_string).ok_or_else(|| {
                other(
                    "CreateQueue",
                    format!("no URL returned for queue {name:?}"),
                    true,
                )
            })?;
            tracing::info!(queue = name, %url, fifo, visibility_timeout_s = lease_seconds, "created the SQS queue");
            Ok(url)
        }
        // Another process created it in the meantime (perhaps with other attributes): use it.
        Err(error) => match look_up(client, name).await {
            Ok(Some(url)) => Ok(url),
            _ => Err(broker("CreateQueue", error)),
        },
    }
}
