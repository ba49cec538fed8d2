//! How SQS failures become [`QueueError`]s: which operation, what SQS said, and whether the
//! same call may succeed later.

use aws_sdk_sqs::config::http::HttpResponse;
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

use crate::queue::QueueError;

/// Error codes that mean "too fast" or "try again": SQS's own and the AWS-wide ones.
const RETRYABLE_CODES: &[&str] = &[
    "RequestThrottled",
    "ThrottlingException",
    "Throttling",
    "TooManyRequestsException",
    "KmsThrottled",
    "ServiceUnavailable",
    "InternalError",
    "InternalFailure",
    "RequestTimeout",
    "RequestTimeoutException",
];

/// Whether an error code returned for one entry of a batch call, or a whole call, is worth
/// retrying.
/// SQS answers in its older (query) dialect too, where codes carry a prefix.
pub(super) fn retryable_code(code: &str) -> bool {
    let code = code.strip_prefix("AWS.SimpleQueueService.").unwrap_or(code);
    RETRYABLE_CODES.contains(&code)
}

/// Maps an SDK error: throttling, 5xx, time-outs and connection failures are retryable;
/// access denied, a missing queue, a malformed request are not.
pub(super) fn broker<E>(operation: &'static str, error: SdkError<E, HttpResponse>) -> QueueError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let retryable = match &error {
        SdkError::ConstructionFailure(_) => false,
        SdkError::TimeoutError(_) | SdkError::ResponseError(_) => true,
        // A user error (a malformed endpoint) stays; refused or reset connections do not.
        SdkError::DispatchFailure(failure) => !failure.is_user(),
        SdkError::ServiceError(service) => {
            let status = service.raw().status();
            status.is_server_error()
                || status.as_u16() == 429
                || error.code().is_some_and(retryable_code)
        }
        _ => true,
    };
    // What SQS said, short; anything else (a refused connection, a time-out) with its chain
    // of causes.
    let message = match &error {
        SdkError::ServiceError(service) => format!(
            "{}: {} (HTTP {})",
            error.code().unwrap_or("unknown error"),
            error.message().unwrap_or_default(),
            service.raw().status().as_u16()
        ),
        _ => DisplayErrorContext(&error).to_string(),
    };
    QueueError::Broker {
        backend: "sqs",
        operation,
        message,
        retryable,
    }
}

/// An error of SQS's own making that is not an SDK error (say, an answer missing a field).
pub(super) fn other(operation: &'static str, message: String, retryable: bool) -> QueueError {
    QueueError::Broker {
        backend: "sqs",
        operation,
        message,
        retryable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttling_and_server_trouble_are_retryable_in_either_dialect() {
        assert!(retryable_code("RequestThrottled"));
        assert!(retryable_code("AWS.SimpleQueueService.RequestThrottled"));
        assert!(retryable_code("InternalError"));
        assert!(!retryable_code("AccessDenied"));
        assert!(!retryable_code("AWS.SimpleQueueService.NonExistentQueue"));
    }
}
