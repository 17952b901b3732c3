-- Lightfast: sample SaaS schema for the pg-maintainer demo.
--
-- Plain SQL (no psql meta-commands). Runs as one multi-statement string or through `psql -f`,
-- on PostgreSQL 15 and later, into an empty database. No extensions are needed.
-- The data comes from data.sql; README.md says which maintenance job each table exercises.
--
-- Id columns deliberately mix serial, bigserial, smallserial, GENERATED ... AS IDENTITY,
-- a bigint sequence behind an int4 column, and one sequence shared by two tables.

-- ---------------------------------------------------------------------------------------------
-- Low-volume tables (sequence headroom only)
-- ---------------------------------------------------------------------------------------------

CREATE TABLE public.org_workspaces (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    slug        text        NOT NULL UNIQUE,
    name        text        NOT NULL,
    plan        text        NOT NULL DEFAULT 'free'
                CHECK (plan IN ('free', 'team', 'business', 'enterprise')),
    region      text        NOT NULL DEFAULT 'eu-west-1',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE public.org_members (
    id            serial PRIMARY KEY,
    workspace_id  bigint      NOT NULL REFERENCES public.org_workspaces (id) ON DELETE CASCADE,
    user_id       bigint      NOT NULL,
    role          text        NOT NULL DEFAULT 'member'
                  CHECK (role IN ('owner', 'admin', 'member', 'viewer')),
    joined_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (workspace_id, user_id)
);

-- CI bots rotate keys every few minutes: this int4 serial is close to running out (~90 %).
CREATE TABLE public.user_api_keys (
    id            serial PRIMARY KEY,
    workspace_id  bigint      NOT NULL REFERENCES public.org_workspaces (id) ON DELETE CASCADE,
    user_id       bigint      NOT NULL,
    name          text        NOT NULL,
    key_prefix    text        NOT NULL,
    key_hash      text        NOT NULL UNIQUE,
    scopes        text[]      NOT NULL DEFAULT '{read}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    revoked_at    timestamptz
);

-- Connected accounts; a buggy sync once burned ids on every retry (~70 %).
CREATE TABLE public.user_sources (
    id                serial PRIMARY KEY,
    workspace_id      bigint      NOT NULL REFERENCES public.org_workspaces (id) ON DELETE CASCADE,
    user_id           bigint      NOT NULL,
    provider          text        NOT NULL
                      CHECK (provider IN ('github', 'gitlab', 'linear', 'notion', 'slack')),
    external_account  text        NOT NULL,
    connected_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (provider, external_account)
);

CREATE TABLE public.workspace_integrations (
    id            smallserial PRIMARY KEY,
    workspace_id  bigint      NOT NULL REFERENCES public.org_workspaces (id) ON DELETE CASCADE,
    kind          text        NOT NULL,
    config        jsonb       NOT NULL DEFAULT '{}',
    enabled       boolean     NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- One sequence feeds two tables (ids are unique across repositories and documents).
CREATE SEQUENCE public.workspace_object_id_seq AS bigint;

CREATE TABLE public.workspace_repositories (
    id              bigint      NOT NULL DEFAULT nextval('public.workspace_object_id_seq') PRIMARY KEY,
    workspace_id    bigint      NOT NULL REFERENCES public.org_workspaces (id) ON DELETE CASCADE,
    integration_id  smallint    REFERENCES public.workspace_integrations (id) ON DELETE SET NULL,
    full_name       text        NOT NULL,
    default_branch  text        NOT NULL DEFAULT 'main',
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (workspace_id, full_name)
);

CREATE TABLE public.workspace_documents (
    id             bigint      NOT NULL DEFAULT nextval('public.workspace_object_id_seq') PRIMARY KEY,
    workspace_id   bigint      NOT NULL REFERENCES public.org_workspaces (id) ON DELETE CASCADE,
    repository_id  bigint      REFERENCES public.workspace_repositories (id) ON DELETE CASCADE,
    path           text        NOT NULL,
    title          text        NOT NULL,
    content_sha    text        NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX workspace_documents_repository_id_idx ON public.workspace_documents (repository_id);

CREATE TABLE public.billing_invoices (
    id            integer     GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workspace_id  bigint      NOT NULL REFERENCES public.org_workspaces (id) ON DELETE RESTRICT,
    number        text        NOT NULL UNIQUE,
    period_start  date        NOT NULL,
    period_end    date        NOT NULL,
    amount_cents  bigint      NOT NULL CHECK (amount_cents >= 0),
    currency      char(3)     NOT NULL DEFAULT 'EUR',
    status        text        NOT NULL DEFAULT 'open' CHECK (status IN ('draft', 'open', 'paid', 'void')),
    issued_at     timestamptz NOT NULL
);

-- ---------------------------------------------------------------------------------------------
-- PII: GDPR erasure
-- ---------------------------------------------------------------------------------------------

CREATE TABLE public.workspace_actor_identities (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workspace_id    bigint      NOT NULL,
    source          text        NOT NULL,
    source_user_id  text        NOT NULL,
    source_email    text        NOT NULL UNIQUE,
    display_name    text,
    first_seen_at   timestamptz NOT NULL,
    last_seen_at    timestamptz NOT NULL
);
CREATE INDEX workspace_actor_identities_workspace_id_idx
    ON public.workspace_actor_identities (workspace_id);

-- ---------------------------------------------------------------------------------------------
-- Core data: sequence headroom, index health, index bloat, autovacuum
-- ---------------------------------------------------------------------------------------------

-- The sequence was widened to bigint years ago, the column never was: the int4 column is the
-- limit (~65 % used), not the sequence.
CREATE SEQUENCE public.workspace_neural_observations_id_seq AS bigint;
CREATE TABLE public.workspace_neural_observations (
    id            integer     NOT NULL DEFAULT nextval('public.workspace_neural_observations_id_seq'),
    workspace_id  bigint      NOT NULL,
    entity_id     bigint      NOT NULL,
    kind          text        NOT NULL,
    confidence    real        NOT NULL,
    observed_at   timestamptz NOT NULL,
    payload       jsonb       NOT NULL DEFAULT '{}',
    CONSTRAINT workspace_neural_observations_pkey PRIMARY KEY (id)
);
ALTER SEQUENCE public.workspace_neural_observations_id_seq
    OWNED BY public.workspace_neural_observations.id;
CREATE INDEX workspace_neural_observations_workspace_id_observed_at_idx
    ON public.workspace_neural_observations (workspace_id, observed_at);
CREATE INDEX workspace_neural_observations_entity_id_idx
    ON public.workspace_neural_observations (entity_id);
-- Redundant: a leading prefix of workspace_neural_observations_workspace_id_observed_at_idx.
CREATE INDEX workspace_neural_observations_workspace_id_idx
    ON public.workspace_neural_observations (workspace_id);

-- Upsert-heavy: every sync re-sends the entities it saw (INSERT ... ON CONFLICT DO UPDATE).
CREATE TABLE public.workspace_neural_entities (
    id             bigint      GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    workspace_id   bigint      NOT NULL,
    entity_type    text        NOT NULL,
    external_key   text        NOT NULL,
    name           text        NOT NULL,
    attributes     jsonb       NOT NULL DEFAULT '{}',
    seen_count     integer     NOT NULL DEFAULT 1,
    first_seen_at  timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL,
    CONSTRAINT workspace_neural_entities_key UNIQUE (workspace_id, entity_type, external_key)
);
CREATE INDEX workspace_neural_entities_workspace_id_updated_at_idx
    ON public.workspace_neural_entities (workspace_id, updated_at);

-- SCD type 2: one row per version, valid over [valid_from, valid_to); valid_to IS NULL is current.
-- The exclusion constraint (GiST, no extension needed: the entity id is wrapped in a one-value
-- int8range) forbids overlapping versions of one entity. Its index cannot be rebuilt with
-- REINDEX CONCURRENTLY.
CREATE TABLE public.workspace_temporal_states (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workspace_id  bigint      NOT NULL,
    entity_id     bigint      NOT NULL,
    state         text        NOT NULL,
    attributes    jsonb       NOT NULL DEFAULT '{}',
    valid_from    timestamptz NOT NULL,
    valid_to      timestamptz,
    CONSTRAINT workspace_temporal_states_valid_range CHECK (valid_to IS NULL OR valid_to > valid_from),
    CONSTRAINT workspace_temporal_states_no_overlap EXCLUDE USING gist (
        int8range(entity_id, entity_id, '[]') WITH =,
        tstzrange(valid_from, valid_to, '[)') WITH &&
    )
);
CREATE UNIQUE INDEX workspace_temporal_states_current_idx
    ON public.workspace_temporal_states (entity_id) WHERE valid_to IS NULL;
CREATE INDEX workspace_temporal_states_workspace_id_valid_from_idx
    ON public.workspace_temporal_states (workspace_id, valid_from);

-- Status churn: queued -> running -> succeeded/failed; status is indexed, so those updates are
-- not HOT.
CREATE TABLE public.workspace_workflow_runs (
    id             bigserial PRIMARY KEY,
    workspace_id   bigint      NOT NULL,
    workflow_name  text        NOT NULL,
    trigger        text        NOT NULL,
    status         text        NOT NULL DEFAULT 'queued'
                   CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    attempt        smallint    NOT NULL DEFAULT 1,
    queued_at      timestamptz NOT NULL,
    started_at     timestamptz,
    finished_at    timestamptz,
    updated_at     timestamptz NOT NULL
);
CREATE INDEX workspace_workflow_runs_workspace_id_queued_at_idx
    ON public.workspace_workflow_runs (workspace_id, queued_at);
CREATE INDEX workspace_workflow_runs_status_updated_at_idx
    ON public.workspace_workflow_runs (status, updated_at);

-- Never churned: the freshly built comparison table for index bloat is
-- workspace_neural_observations (insert-only, above).

-- ---------------------------------------------------------------------------------------------
-- Partitioned tables (RANGE on created_at, one partition per UTC month)
-- ---------------------------------------------------------------------------------------------

-- Append-only time series; retention 12 months.
CREATE TABLE public.workspace_operations_metrics (
    id            bigserial,
    workspace_id  bigint           NOT NULL,
    metric        text             NOT NULL,
    value         double precision NOT NULL,
    created_at    timestamptz      NOT NULL
) PARTITION BY RANGE (created_at);
CREATE INDEX workspace_operations_metrics_workspace_id_created_at_idx
    ON public.workspace_operations_metrics (workspace_id, created_at);

-- Audit trail with personal data (actor_email, actor_ip, user_agent); retention ~24 months,
-- anonymised after 90 days, erased per user on request.
CREATE TABLE public.workspace_user_activities (
    id            bigserial,
    workspace_id  bigint      NOT NULL,
    user_id       bigint      NOT NULL,
    action        text        NOT NULL,
    target_type   text,
    target_id     bigint,
    actor_email   text,
    actor_ip      inet,
    user_agent    text,
    created_at    timestamptz NOT NULL,
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
CREATE INDEX workspace_user_activities_user_id_idx
    ON public.workspace_user_activities (user_id);

-- Raw inbound webhooks, write-once; retention 3 months. Rows outside every monthly range land in
-- the DEFAULT partition.
CREATE TABLE public.workspace_webhook_payloads (
    id            bigserial,
    workspace_id  bigint      NOT NULL,
    source        text        NOT NULL,
    event         text        NOT NULL,
    delivery_id   text        NOT NULL,
    payload       jsonb       NOT NULL,
    created_at    timestamptz NOT NULL
) PARTITION BY RANGE (created_at);
CREATE INDEX workspace_webhook_payloads_created_at_idx
    ON public.workspace_webhook_payloads (created_at);
CREATE TABLE public.workspace_webhook_payloads_default
    PARTITION OF public.workspace_webhook_payloads DEFAULT;

-- Monthly partitions named <table>_pYYYYMMDD after their lower bound in UTC. Each table gets past
-- months reaching beyond its retention (so there is something to retire), the current month and
-- exactly one future month (so there is something to pre-create).
DO $$
DECLARE
    -- first day of the current month, as a UTC wall-clock timestamp
    this_month constant timestamp := date_trunc('month', now() AT TIME ZONE 'UTC');
    spec  record;
    lower_bound timestamp;
    months_back integer;
BEGIN
    FOR spec IN
        SELECT * FROM (VALUES
            ('workspace_operations_metrics', 14),  -- retention 12 months
            ('workspace_user_activities',    26),  -- retention 24 months
            ('workspace_webhook_payloads',    5)   -- retention  3 months
        ) AS t (table_name, months_back)
    LOOP
        FOR months_back IN REVERSE spec.months_back .. -1 LOOP
            lower_bound := this_month - make_interval(months => months_back);
            EXECUTE format(
                'CREATE TABLE public.%I PARTITION OF public.%I FOR VALUES FROM (%L) TO (%L)',
                spec.table_name || '_p' || to_char(lower_bound, 'YYYYMMDD'),
                spec.table_name,
                to_char(lower_bound, 'YYYY-MM-DD HH24:MI:SS') || '+00',
                to_char(lower_bound + interval '1 month', 'YYYY-MM-DD HH24:MI:SS') || '+00'
            );
        END LOOP;
    END LOOP;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- What each table is for (shown by \d+ and by the demo)
-- ---------------------------------------------------------------------------------------------

COMMENT ON TABLE public.org_workspaces IS 'Tenants. Low volume; identity sequence with plenty of headroom.';
COMMENT ON TABLE public.org_members IS 'Workspace membership. Low volume; serial.';
COMMENT ON TABLE public.user_api_keys IS 'API keys; int4 serial at ~90 % of its range (critical).';
COMMENT ON TABLE public.user_sources IS 'Connected accounts; int4 serial at ~70 % of its range (warning).';
COMMENT ON TABLE public.workspace_integrations IS 'Installed integrations; smallserial, modestly used.';
COMMENT ON TABLE public.workspace_repositories IS 'Repositories; id from the shared workspace_object_id_seq.';
COMMENT ON TABLE public.workspace_documents IS 'Indexed documents; id from the shared workspace_object_id_seq.';
COMMENT ON TABLE public.billing_invoices IS 'Monthly invoices; int4 identity, low.';
COMMENT ON TABLE public.workspace_actor_identities IS 'External identities with PII (source_email); GDPR erasure.';
COMMENT ON TABLE public.workspace_neural_observations IS
    'Core data; int4 id fed by a bigint sequence (~65 % of the int4 range). Insert-only, freshly built indexes.';
COMMENT ON TABLE public.workspace_neural_entities IS 'Upsert-heavy entities; bloated B-tree indexes.';
COMMENT ON TABLE public.workspace_temporal_states IS 'SCD type 2 history with an exclusion constraint; index bloat.';
COMMENT ON TABLE public.workspace_workflow_runs IS 'Status churn; non-HOT updates, bloated indexes, autovacuum tuning.';
COMMENT ON TABLE public.workspace_operations_metrics IS 'Append-only metrics; monthly partitions, retention 12 months.';
COMMENT ON TABLE public.workspace_user_activities IS
    'Audit trail with PII; anonymise after 90 days, per-user erasure, monthly partitions, retention 24 months.';
COMMENT ON TABLE public.workspace_webhook_payloads IS
    'Raw webhooks (JSONB); monthly partitions, retention 3 months, DEFAULT partition with stray rows.';
