-- The reference CRM schema: the contract the pipeline attaches to.
-- Created only by `migrate --create-crm-schema` (demos and tests); a real CRM brings its own.
CREATE TABLE IF NOT EXISTS {crm}.accounts (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name text NOT NULL,
    industry text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS {crm}.leads (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    account_id uuid REFERENCES {crm}.accounts (id) ON DELETE CASCADE,
    source text NOT NULL DEFAULT 'unknown',
    status text NOT NULL DEFAULT 'new'
        CHECK (status IN ('new', 'contacted', 'qualified', 'converted', 'lost')),
    estimated_value numeric(14, 2),
    converted_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS {crm}.projects (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    account_id uuid NOT NULL REFERENCES {crm}.accounts (id) ON DELETE CASCADE,
    name text NOT NULL,
    status text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'won', 'lost')),
    amount numeric(14, 2) NOT NULL DEFAULT 0,
    closed_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS {crm}.activities (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    account_id uuid REFERENCES {crm}.accounts (id) ON DELETE CASCADE,
    lead_id uuid REFERENCES {crm}.leads (id) ON DELETE SET NULL,
    activity_type text NOT NULL CHECK (activity_type IN ('call', 'email', 'meeting', 'note', 'task')),
    occurred_at timestamptz NOT NULL DEFAULT now(),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS leads_account_id_idx ON {crm}.leads (account_id);
CREATE INDEX IF NOT EXISTS projects_account_id_idx ON {crm}.projects (account_id);
CREATE INDEX IF NOT EXISTS activities_account_id_idx ON {crm}.activities (account_id);
CREATE INDEX IF NOT EXISTS activities_lead_id_idx ON {crm}.activities (lead_id);
