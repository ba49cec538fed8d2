-- Analytics, version 5: parked events put back on the queue (`failed retry`) are remembered
-- until a worker applies them. The archive still holds the copies their failed attempts
-- wrote (possibly with the payload an operator has corrected since); `replay` leaves an
-- event out while it is parked or retried and not yet applied, so that the corrected
-- delivery, not a stale copy, is what counts.
CREATE TABLE IF NOT EXISTS crm_analytics.retried_events (
    event_id uuid PRIMARY KEY,
    retried_at timestamptz NOT NULL DEFAULT now()
);
