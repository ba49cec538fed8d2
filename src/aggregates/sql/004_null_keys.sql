-- Analytics, version 4: NULL keys. A CRM column a metric groups by may hold NULL (a lead
-- without source, account or creation time; a won deal without closed_at). Such rows are
-- counted under a NULL key, as SQL's GROUP BY counts them: one aggregate row per group,
-- NULL in the key column. UNIQUE NULLS NOT DISTINCT (PostgreSQL 15) replaces each primary
-- key, so that the workers' ON CONFLICT upserts find the NULL group's row like any other.
ALTER TABLE analytics.daily_account_metrics DROP CONSTRAINT daily_account_metrics_pkey;
ALTER TABLE analytics.daily_account_metrics
    ALTER COLUMN account_id DROP NOT NULL,
    ALTER COLUMN date DROP NOT NULL,
    ADD CONSTRAINT daily_account_metrics_key UNIQUE NULLS NOT DISTINCT (account_id, date);

ALTER TABLE analytics.lead_funnel_metrics DROP CONSTRAINT lead_funnel_metrics_pkey;
ALTER TABLE analytics.lead_funnel_metrics
    ALTER COLUMN cohort_date DROP NOT NULL,
    ALTER COLUMN source DROP NOT NULL,
    ADD CONSTRAINT lead_funnel_metrics_key UNIQUE NULLS NOT DISTINCT (cohort_date, source);

ALTER TABLE analytics.revenue_metrics DROP CONSTRAINT revenue_metrics_pkey;
ALTER TABLE analytics.revenue_metrics
    ALTER COLUMN account_id DROP NOT NULL,
    ALTER COLUMN month DROP NOT NULL,
    ADD CONSTRAINT revenue_metrics_key UNIQUE NULLS NOT DISTINCT (account_id, month);
