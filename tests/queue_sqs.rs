//! The SQS queue backend against a real SQS-compatible server (moto): publish, receive and
//! settle with attributes, delayed retries, leases kept alive while a batch is held,
//! batches split by count and size, depth, FIFO queues, and the whole pipeline over SQS
//! down to exact aggregates and a replay of parked events.

mod common;

use common::TestDb;
use crm_analytics::queue::sqs::{SqsQueue, SqsSettings, StaticCredentials, MAX_MESSAGE_BYTES};
use crm_analytics::queue::{
    Message, Queue, QueueError, QueueOptions, QueueSpec, ReceivedBatch, Settlement, SqsTarget,
};
use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Options reaching the local server with fixed credentials and region: nothing is read
/// from the environment or the instance.
fn options(endpoint: &str, lease: Duration) -> QueueOptions {
    QueueOptions {
        capacity: u64::MAX,
        lease,
        sqs: SqsSettings {
            endpoint: Some(endpoint.to_string()),
            region: Some("us-east-1".to_string()),
            credentials: Some(StaticCredentials::new("test", "test")),
        },
        ..QueueOptions::default()
    }
}

/// A queue name of this test's own.
fn fresh_target(suffix: &str) -> SqsTarget {
    SqsTarget::Name(format!(
        "crm-analytics-test-{}{suffix}",
        Uuid::new_v4().simple()
    ))
}

/// A new queue of this test's own (created on open), or None to skip outside CI.
async fn fresh_queue(lease: Duration) -> Option<(SqsQueue, SqsTarget, QueueOptions)> {
    let endpoint = common::aws_endpoint()?;
    let target = fresh_target("");
    let options = options(&endpoint, lease);
    let queue = SqsQueue::open(&target, &options)
        .await
        .expect("open SQS queue");
    Some((queue, target, options))
}

async fn delete_queue(queue: &SqsQueue) {
    let _ = queue
        .client()
        .delete_queue()
        .queue_url(queue.url())
        .send()
        .await;
}

fn message(event_type: &str, body: String) -> Message {
    Message {
        event_id: Uuid::new_v4(),
        event_type: event_type.to_string(),
        body,
    }
}

/// Receives until `count` deliveries came or `timeout` passed; returns the batches.
async fn receive_at_least(
    queue: &dyn Queue,
    count: usize,
    timeout: Duration,
) -> Vec<Box<dyn ReceivedBatch>> {
    let deadline = Instant::now() + timeout;
    let mut batches = Vec::new();
    let mut received = 0;
    while received < count {
        assert!(
            Instant::now() < deadline,
            "only {received} of {count} messages arrived in {timeout:?}"
        );
        let batch = queue
            .receive(1000, Duration::from_secs(1))
            .await
            .expect("receive");
        received += batch.deliveries().len();
        if !batch.deliveries().is_empty() {
            batches.push(batch);
        }
    }
    batches
}

async fn wait_for_depth(queue: &dyn Queue, events: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let depth = queue.depth().await.expect("depth");
        assert!(depth.approximate, "SQS counts are approximate");
        if depth.events == events {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "depth stayed {} instead of {events}",
            depth.events
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn messages_round_trip_with_their_attributes_and_are_gone_once_done() {
    let Some((queue, _, _)) = fresh_queue(Duration::from_secs(30)).await else {
        return;
    };
    assert_eq!(queue.backend(), "sqs");
    let sent: Vec<Message> = (0..3)
        .map(|i| {
            message(
                "leads.insert",
                format!("{{\"n\":{i},\"odd\":\"\u{FFFF}\"}}"),
            )
        })
        .collect();
    let started = Instant::now();
    queue.publish_messages(&sent).await.expect("publish");
    let batches = receive_at_least(&queue, 3, Duration::from_secs(30)).await;
    eprintln!("publish to receive of 3 messages: {:?}", started.elapsed());

    let mut seen = HashSet::new();
    for batch in &batches {
        for delivery in batch.deliveries() {
            let original = sent
                .iter()
                .find(|m| Some(m.event_id) == delivery.event_id)
                .expect("the event_id attribute names a published message");
            let body: serde_json::Value =
                serde_json::from_str(&delivery.body).expect("the body is still JSON");
            let expected: serde_json::Value = serde_json::from_str(&original.body).unwrap();
            assert_eq!(body, expected, "same JSON value, U+FFFF included");
            assert_eq!(delivery.attempt, 1);
            seen.insert(original.event_id);
        }
    }
    assert_eq!(seen.len(), 3, "each message once");
    common::settle_all(batches).await;
    wait_for_depth(&queue, 0, Duration::from_secs(20)).await;
    let again = queue
        .receive(10, Duration::from_secs(1))
        .await
        .expect("receive");
    assert!(
        again.deliveries().is_empty(),
        "settled messages are deleted"
    );
    drop(again);

    // A batch dropped unsettled comes back at once, not when its 30 s lease runs out.
    let dropped = message("leads.update", "{}".into());
    queue
        .publish_messages(std::slice::from_ref(&dropped))
        .await
        .unwrap();
    // (Bounds well under the lease but generous: the local server answers slowly while
    // the whole suite runs.)
    drop(receive_at_least(&queue, 1, Duration::from_secs(25)).await);
    let released = Instant::now();
    let batches = receive_at_least(&queue, 1, Duration::from_secs(25)).await;
    assert!(released.elapsed() < Duration::from_secs(25));
    let delivery = &batches[0].deliveries()[0];
    assert_eq!(
        (delivery.event_id, delivery.attempt),
        (Some(dropped.event_id), 2)
    );
    common::settle_all(batches).await;

    // One message at a time: how long from publish until a waiting receive returns it.
    let mut latencies = Vec::new();
    for _ in 0..5 {
        let waiting = tokio::spawn({
            let queue_url = queue.url().to_string();
            let client = queue.client().clone();
            async move {
                let answer = client
                    .receive_message()
                    .queue_url(queue_url)
                    .wait_time_seconds(5)
                    .send()
                    .await
                    .expect("receive");
                (Instant::now(), answer)
            }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let published = Instant::now();
        queue
            .publish_messages(&[message("leads.insert", "{}".into())])
            .await
            .expect("publish");
        let (arrived, answer) = waiting.await.expect("receiver");
        assert_eq!(answer.messages().len(), 1);
        latencies.push(arrived.saturating_duration_since(published));
        for m in answer.messages() {
            queue
                .client()
                .delete_message()
                .queue_url(queue.url())
                .receipt_handle(m.receipt_handle().unwrap())
                .send()
                .await
                .expect("delete");
        }
    }
    eprintln!("publish to long-poll receive, one message: {latencies:?}");
    delete_queue(&queue).await;
}

#[tokio::test]
async fn a_retried_message_stays_hidden_for_its_delay_and_comes_back_as_attempt_two() {
    let Some((queue, _, _)) = fresh_queue(Duration::from_secs(30)).await else {
        return;
    };
    let sent = message("projects.update", "{}".into());
    queue
        .publish_messages(std::slice::from_ref(&sent))
        .await
        .unwrap();
    let mut batches = receive_at_least(&queue, 1, Duration::from_secs(30)).await;
    let batch = batches.pop().unwrap();
    assert_eq!(batch.deliveries()[0].attempt, 1);
    let retried = Instant::now();
    batch
        .settle(Settlement {
            done: Vec::new(),
            retry: vec![(0, Duration::from_secs(3), "boom".into())],
        })
        .await
        .expect("settle");
    // Not visible before the delay (the first seconds of it, with room for slow runs).
    let early = queue
        .receive(10, Duration::from_secs(1))
        .await
        .expect("receive");
    assert!(
        early.deliveries().is_empty() || retried.elapsed() >= Duration::from_secs(3),
        "delivered again before its delay"
    );
    drop(early);
    let mut batches = receive_at_least(&queue, 1, Duration::from_secs(30)).await;
    let waited = retried.elapsed();
    assert!(
        waited >= Duration::from_millis(2900),
        "came back after {waited:?}"
    );
    let batch = batches.pop().unwrap();
    let delivery = &batch.deliveries()[0];
    assert_eq!(delivery.event_id, Some(sent.event_id));
    assert_eq!(delivery.attempt, 2, "SQS's receive count");
    common::settle_all(vec![batch]).await;
    wait_for_depth(&queue, 0, Duration::from_secs(20)).await;
    delete_queue(&queue).await;
}

#[tokio::test]
async fn a_batch_held_past_its_lease_stays_leased_and_comes_back_once_dropped() {
    // A lease long enough that a busy local server answering an extension late (seconds,
    // when the whole suite runs) does not let it lapse; the hold still spans two leases.
    let lease = Duration::from_secs(10);
    let Some((queue, target, options)) = fresh_queue(lease).await else {
        return;
    };
    // A second consumer: its own client, the same queue (found by name this time).
    let other = SqsQueue::open(&target, &options).await.expect("open again");
    assert_eq!(other.url(), queue.url());
    let sent = message("activities.insert", "{}".into());
    queue
        .publish_messages(std::slice::from_ref(&sent))
        .await
        .unwrap();
    let mut batches = receive_at_least(&queue, 1, Duration::from_secs(30)).await;
    let held = batches.pop().unwrap();

    // Held for 21 s, over two leases: the other consumer never gets it.
    let holding = Instant::now();
    while holding.elapsed() < Duration::from_secs(21) {
        let batch = other
            .receive(10, Duration::from_secs(1))
            .await
            .expect("receive");
        assert!(
            batch.deliveries().is_empty(),
            "delivered to a second consumer while leased, after {:?}",
            holding.elapsed()
        );
    }
    // Dropped unsettled: back to the other consumer promptly, not a lease later.
    drop(held);
    let dropped = Instant::now();
    let mut batches = receive_at_least(&other, 1, Duration::from_secs(30)).await;
    eprintln!("redelivered {:?} after the drop", dropped.elapsed());
    let batch = batches.pop().unwrap();
    assert_eq!(batch.deliveries()[0].event_id, Some(sent.event_id));
    assert_eq!(batch.deliveries()[0].attempt, 2);
    common::settle_all(vec![batch]).await;
    delete_queue(&queue).await;
}

#[tokio::test]
async fn many_and_large_messages_are_split_into_calls_within_sqs_limits() {
    let Some((queue, _, _)) = fresh_queue(Duration::from_secs(30)).await else {
        return;
    };
    // One message over the limit: refused whole, before anything is sent, not retryable.
    let too_big = vec![
        message("leads.insert", "{}".into()),
        message("notes.insert", "x".repeat(MAX_MESSAGE_BYTES)),
    ];
    let error = queue.publish_messages(&too_big).await.expect_err("too big");
    assert!(!error.is_retryable(), "{error}");
    assert!(
        error.to_string().contains("at most 262144 bytes"),
        "{error}"
    );
    wait_for_depth(&queue, 0, Duration::from_secs(20)).await;

    // 25 small messages around 6 of 200 KiB in a row: 1.2 MiB, more than a whole call may
    // carry even on servers that take 1 MiB per call, so calls must be cut by size too.
    let mut sent: Vec<Message> = (0..25)
        .map(|i| message("leads.insert", format!("{{\"n\":{i}}}")))
        .collect();
    for i in 3..9 {
        sent.insert(i, message("notes.insert", "y".repeat(200 * 1024)));
    }
    let total: usize = sent.iter().map(|m| m.body.len()).sum();
    assert!(total > 4 * MAX_MESSAGE_BYTES);
    queue.publish_messages(&sent).await.expect("publish");
    wait_for_depth(&queue, 31, Duration::from_secs(20)).await;

    // One receive fills its batch past SQS's 10 per call.
    let first = queue
        .receive(1000, Duration::from_secs(2))
        .await
        .expect("receive");
    eprintln!(
        "one receive of up to 1000 returned {}",
        first.deliveries().len()
    );
    assert!(
        first.deliveries().len() > 10,
        "{}",
        first.deliveries().len()
    );
    let mut batches = vec![first];
    let mut bodies = std::collections::BTreeSet::new();
    let mut deliveries = 0;
    // (A local server may hand one message to two concurrent receives: at least once.)
    while bodies.len() < sent.len() {
        for delivery in batches.iter().flat_map(|b| b.deliveries().iter()) {
            bodies.insert((delivery.event_id.expect("event id"), delivery.body.len()));
            deliveries += 1;
        }
        let missing = sent.len().saturating_sub(bodies.len()).max(1);
        common::settle_all(std::mem::take(&mut batches)).await;
        if bodies.len() < sent.len() {
            batches = receive_at_least(&queue, missing, Duration::from_secs(30)).await;
        }
    }
    let expected: std::collections::BTreeSet<(Uuid, usize)> =
        sent.iter().map(|m| (m.event_id, m.body.len())).collect();
    assert_eq!(bodies, expected, "every message, bodies whole");
    eprintln!("{} messages in {deliveries} deliveries", sent.len());
    wait_for_depth(&queue, 0, Duration::from_secs(20)).await;
    delete_queue(&queue).await;
}

#[tokio::test]
async fn depth_counts_waiting_and_leased_messages_and_bounds_publishers() {
    let Some((queue, target, options)) = fresh_queue(Duration::from_secs(30)).await else {
        return;
    };
    let sent: Vec<Message> = (0..15)
        .map(|_| message("leads.insert", "{}".into()))
        .collect();
    queue.publish_messages(&sent).await.unwrap();
    let depth = queue.depth().await.unwrap();
    assert_eq!((depth.events, depth.approximate), (15, true));
    assert!(!queue.is_full().await.unwrap(), "no capacity bound");

    let bounded = |capacity| {
        let options = QueueOptions {
            capacity,
            ..options.clone()
        };
        let target = target.clone();
        async move { SqsQueue::open(&target, &options).await.unwrap() }
    };
    assert!(bounded(15).await.is_full().await.unwrap());
    assert!(!bounded(16).await.is_full().await.unwrap());

    // Leased messages still count: they are not done yet.
    let batches = receive_at_least(&queue, 15, Duration::from_secs(30)).await;
    wait_for_depth(&queue, 15, Duration::from_secs(20)).await;
    common::settle_all(batches).await;
    wait_for_depth(&queue, 0, Duration::from_secs(20)).await;
    delete_queue(&queue).await;
}

#[tokio::test]
async fn fifo_queues_are_created_and_keep_each_tables_order() {
    let Some(endpoint) = common::aws_endpoint() else {
        return;
    };
    let target = fresh_target(".fifo");
    let queue = SqsQueue::open(&target, &options(&endpoint, Duration::from_secs(30)))
        .await
        .expect("open FIFO queue");
    let sent: Vec<Message> = (0..12)
        .map(|i| {
            let table = if i % 2 == 0 { "leads" } else { "projects" };
            message(&format!("{table}.insert"), format!("{{\"n\":{i}}}"))
        })
        .collect();
    queue.publish_messages(&sent).await.expect("publish");
    // The same events again (a relay that rolled back): delivered again, at least once.
    queue
        .publish_messages(&sent[..2])
        .await
        .expect("publish again");
    // Each batch settled before the next receive: SQS holds back a group's later messages
    // while earlier ones are leased.
    let mut order: Vec<(String, i64)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while order.len() < 14 {
        assert!(
            Instant::now() < deadline,
            "only {} of 14 arrived",
            order.len()
        );
        let batch = queue.receive(1000, Duration::from_secs(1)).await.unwrap();
        for delivery in batch.deliveries() {
            let body: serde_json::Value = serde_json::from_str(&delivery.body).unwrap();
            let sent = sent
                .iter()
                .find(|m| Some(m.event_id) == delivery.event_id)
                .expect("known event");
            order.push((sent.event_type.clone(), body["n"].as_i64().unwrap()));
        }
        common::settle_all(vec![batch]).await;
    }
    for table in ["leads.insert", "projects.insert"] {
        let ns: Vec<i64> = order
            .iter()
            .filter(|(t, _)| t == table)
            .map(|(_, n)| *n)
            .collect();
        let first_run = &ns[..6];
        assert!(first_run.windows(2).all(|w| w[0] < w[1]), "{table}: {ns:?}");
    }
    wait_for_depth(&queue, 0, Duration::from_secs(20)).await;
    delete_queue(&queue).await;
}

#[tokio::test]
async fn the_pipeline_over_sqs_is_exact_and_replays_parked_events() {
    let Some(endpoint) = common::aws_endpoint() else {
        return;
    };
    let (db, pool) = TestDb::migrated().await;
    let mut args = db.args();
    args.max_attempts = 2;
    args.retry_backoff = Duration::from_millis(200);
    // Backpressure through SQS's approximate depth; it also keeps the local server's queue
    // short (its receives slow down with its length; SQS's do not).
    args.queue_capacity = 150;
    let target = fresh_target("");
    // A short lease: a message the local server loses track of (its deletes race under
    // concurrent calls) comes back within seconds instead of half a minute.
    let options = options(&endpoint, Duration::from_secs(5));
    // Through the same factory as the binary.
    let queue = crm_analytics::queue::open(&QueueSpec::Sqs(target.clone()), &pool, &options)
        .await
        .expect("open SQS queue");
    assert_eq!(queue.backend(), "sqs");
    let running = common::start_with(&db, &args, {
        let queue = queue.clone();
        move |_| queue
    })
    .await;

    // A poison event among ordinary ones: parked after two deliveries.
    let lead = Uuid::new_v4();
    common::insert_poison_lead(&pool, lead).await;
    let stats = common::run_workload(&pool, 2, 120, 23).await;
    assert!(stats.committed() > 200);
    common::drain_through(&pool, &*queue, Duration::from_secs(150)).await;
    let parked: Vec<(Uuid, i32)> =
        sqlx::query_as("SELECT event_id, retry_count FROM crm_analytics.failed_events")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(parked[0].1, 2, "parked at the second delivery");

    // The operator replays it with the CLI, which reaches SQS through the standard AWS
    // variables and --sqs-endpoint: the event is on the queue again.
    // The fixed event stands for a lead the CRM has: written with triggers off (SET LOCAL:
    // this transaction only), so that the replay is its only event.
    common::fix_poison_lead(&pool, lead).await;
    let output = Command::new(common::binary())
        .args(["failed", "retry", "--all"])
        .env("DATABASE_URL", &db.url)
        .env_remove("ANALYTICS_DATABASE_URL")
        .env("CRM_ANALYTICS_QUEUE", target.to_string())
        .env("CRM_ANALYTICS_SQS_ENDPOINT", &endpoint)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .expect("run crm-analytics");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 events put back"),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    common::drain_through(&pool, &*queue, Duration::from_secs(120)).await;
    running.stop().await;
    let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_analytics.failed_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(parked, 0, "the replayed event applied");
    common::assert_nontrivial(&pool).await;
    common::assert_exact(&pool).await;
    drop(queue);
    delete_queue(&SqsQueue::open(&target, &options).await.unwrap()).await;
    db.finish(pool).await;
}

#[tokio::test]
async fn a_missing_queue_is_a_lasting_error_and_an_unreachable_server_a_passing_one() {
    let Some(endpoint) = common::aws_endpoint() else {
        return;
    };
    let options = options(&endpoint, Duration::from_secs(30));
    let missing: QueueSpec = format!(
        "sqs://{endpoint}/123456789012/no-such-queue-{}",
        Uuid::new_v4().simple()
    )
    .parse()
    .expect("a queue URL");
    let QueueSpec::Sqs(missing) = missing else {
        panic!("not SQS: {missing:?}");
    };
    let Err(error) = SqsQueue::open(&missing, &options).await else {
        panic!("a queue URL that does not exist opened");
    };
    assert!(!error.is_retryable(), "{error}");
    assert!(error.to_string().contains("GetQueueAttributes"), "{error}");

    // Nothing listens on port 9 of this machine: connection refused.
    let unreachable = QueueOptions {
        sqs: SqsSettings {
            endpoint: Some("http://127.0.0.1:9".into()),
            ..options.sqs.clone()
        },
        ..options.clone()
    };
    let Err(error) = SqsQueue::open(&fresh_target(""), &unreachable).await else {
        panic!("opened a queue on a server that is not there");
    };
    assert!(error.is_retryable(), "{error}");
    assert!(error.to_string().contains("GetQueueUrl"), "{error}");
}

/// One attribute of the queue, as SQS reports it.
async fn queue_attribute(
    queue: &SqsQueue,
    name: aws_sdk_sqs::types::QueueAttributeName,
) -> Option<String> {
    queue
        .client()
        .get_queue_attributes()
        .queue_url(queue.url())
        .attribute_names(name.clone())
        .send()
        .await
        .expect("attributes")
        .attributes()
        .and_then(|a| a.get(&name))
        .cloned()
}

#[tokio::test]
async fn a_queue_created_by_name_keeps_messages_for_sqs_longest_retention() {
    let Some(endpoint) = common::aws_endpoint() else {
        return;
    };
    let target = fresh_target("");
    let queue = SqsQueue::open(&target, &options(&endpoint, Duration::from_secs(30)))
        .await
        .expect("open");
    let retention = queue_attribute(
        &queue,
        aws_sdk_sqs::types::QueueAttributeName::MessageRetentionPeriod,
    )
    .await;
    assert_eq!(
        retention.as_deref(),
        Some("1209600"),
        "14 days, not SQS's default 4"
    );
    delete_queue(&queue).await;
}

#[tokio::test]
async fn messages_carry_the_event_id_and_type_as_attributes_for_operators() {
    let Some((queue, _, _)) = fresh_queue(Duration::from_secs(30)).await else {
        return;
    };
    let sent = message("projects.update", "{}".into());
    queue
        .publish_messages(std::slice::from_ref(&sent))
        .await
        .expect("publish");
    // As a console or another SQS client sees the message.
    let received = queue
        .client()
        .receive_message()
        .queue_url(queue.url())
        .message_attribute_names("All")
        .wait_time_seconds(5)
        .send()
        .await
        .expect("receive");
    let message = received.messages().first().expect("the message");
    let attribute = |name: &str| {
        message
            .message_attributes()
            .and_then(|a| a.get(name))
            .and_then(|v| v.string_value())
            .map(str::to_string)
    };
    assert_eq!(
        attribute(crm_analytics::queue::sqs::EVENT_ID),
        Some(sent.event_id.to_string())
    );
    assert_eq!(
        attribute(crm_analytics::queue::sqs::EVENT_TYPE).as_deref(),
        Some("projects.update")
    );
    delete_queue(&queue).await;
}

#[tokio::test]
async fn a_queue_that_would_move_events_to_a_dead_letter_queue_is_refused() {
    let Some(endpoint) = common::aws_endpoint() else {
        return;
    };
    // Made by someone else, with SQS's own dead-lettering after 3 receives: a worker
    // crash or two would move an event where the workers never look.
    let dead = fresh_target("");
    let dead = SqsQueue::open(&dead, &options(&endpoint, Duration::from_secs(30)))
        .await
        .expect("open the dead-letter queue");
    let arn = queue_attribute(&dead, aws_sdk_sqs::types::QueueAttributeName::QueueArn)
        .await
        .expect("an ARN");
    let SqsTarget::Name(name) = fresh_target("") else {
        unreachable!("fresh targets are names")
    };
    dead.client()
        .create_queue()
        .queue_name(&name)
        .attributes(
            aws_sdk_sqs::types::QueueAttributeName::RedrivePolicy,
            format!(r#"{{"deadLetterTargetArn":"{arn}","maxReceiveCount":"3"}}"#),
        )
        .send()
        .await
        .expect("create a queue with a redrive policy");
    let error = SqsQueue::open(
        &SqsTarget::Name(name.clone()),
        &options(&endpoint, Duration::from_secs(30)),
    )
    .await
    .err()
    .expect("refused");
    let text = error.to_string();
    assert!(
        matches!(error, QueueError::Setting(_)) && text.contains("redrive policy"),
        "{text}"
    );
    let url = dead
        .client()
        .get_queue_url()
        .queue_name(&name)
        .send()
        .await
        .expect("url");
    let _ = dead
        .client()
        .delete_queue()
        .queue_url(url.queue_url().unwrap_or_default())
        .send()
        .await;
    delete_queue(&dead).await;
}

/// An event over SQS's size limit can never be published: the relay parks it in
/// failed_events, saying why, and relays everything else instead of retrying the batch
/// that holds it forever.
#[tokio::test]
async fn an_event_sqs_cannot_take_is_parked_and_the_rest_flows() {
    let Some(endpoint) = common::aws_endpoint() else {
        return;
    };
    let (db, pool) = TestDb::migrated().await;
    let target = fresh_target("");
    let queue: std::sync::Arc<dyn Queue> = std::sync::Arc::new(
        SqsQueue::open(&target, &options(&endpoint, Duration::from_secs(10)))
            .await
            .expect("open"),
    );
    let running = common::start_with(&db, &db.args(), {
        let queue = queue.clone();
        move |_| queue
    })
    .await;
    common::run_workload(&pool, 2, 60, 41).await;
    // After the workload, so that no later change of this lead depends on its insert;
    // ordinary leads are written after it.
    let huge = Uuid::new_v4();
    sqlx::query("INSERT INTO leads (id, source, status) VALUES ($1, repeat('x', 300000), 'new')")
        .bind(huge)
        .execute(&pool)
        .await
        .unwrap();
    for _ in 0..5 {
        sqlx::query(
            "INSERT INTO leads (source, status) SELECT 'web', 'new' FROM generate_series(1, 20)",
        )
        .execute(&pool)
        .await
        .unwrap();
    }
    common::drain_through(&pool, &*queue, Duration::from_secs(60)).await;
    running.stop().await;
    let parked: Vec<(Option<Uuid>, String)> =
        sqlx::query_as("SELECT aggregate_id, error_message FROM crm_analytics.failed_events")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(parked[0].0, Some(huge));
    assert!(parked[0].1.contains("SQS takes at most"), "{}", parked[0].1);
    // Everything else was applied: without the parked lead (removed with capture off),
    // the aggregates equal the recomputation.
    let mut conn = pool.begin().await.unwrap();
    sqlx::raw_sql("SET LOCAL session_replication_role = replica")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("DELETE FROM leads WHERE id = $1")
        .bind(huge)
        .execute(&mut *conn)
        .await
        .unwrap();
    conn.commit().await.unwrap();
    common::assert_exact(&pool).await;
    drop(queue);
    delete_queue(
        &SqsQueue::open(&target, &options(&endpoint, Duration::from_secs(10)))
            .await
            .unwrap(),
    )
    .await;
    db.finish(pool).await;
}
