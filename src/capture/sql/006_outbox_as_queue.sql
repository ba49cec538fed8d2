-- Capture, version 6: the outbox can be the queue itself (CRM_ANALYTICS_QUEUE=outbox). The
-- workers then claim outbox rows directly; an event whose batch failed waits out its
-- backoff here. Both columns are nullable without a default: adding them rewrites nothing,
-- and the capture triggers never write them.
SET LOCAL lock_timeout = '5s';
ALTER TABLE crm_analytics.event_outbox
    ADD COLUMN IF NOT EXISTS available_at timestamptz, -- NULL: now; else not before then
    ADD COLUMN IF NOT EXISTS last_error text;          -- why the last attempt failed
