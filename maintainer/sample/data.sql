-- Lightfast: sample data for the pg-maintainer demo (load schema.sql first).
--
-- Plain SQL (no psql meta-commands); runs as one multi-statement string or through `psql -f`.
-- Deterministic apart from now(): values come from fixed expressions over generate_series and from
-- random() after setseed(); timestamps that pick a partition are computed in UTC, whatever the
-- session time zone. All personal data is fake: example.com addresses, IPs from the documentation
-- ranges 192.0.2.0/24 and 2001:db8::/32.
--
-- The data is shaped so that every maintenance job of the demo finds work:
--   * sequences at ~90 % (user_api_keys), ~70 % (user_sources) and ~65 % of an int4 column fed
--     by a bigint sequence (workspace_neural_observations); the rest low;
--   * partitions older than the retention, and only one future month pre-created;
--   * bloated B-tree indexes on workspace_neural_entities and workspace_workflow_runs (two thirds
--     of the rows deleted after upserts / status updates), lighter churn on
--     workspace_temporal_states, untouched indexes on workspace_neural_observations;
--   * large append-only and churned tables without autovacuum tuning;
--   * personal data older than 90 days in workspace_user_activities.
-- VACUUM cannot run inside a multi-statement string, so this file ends with ANALYZE only;
-- autovacuum (or a separate VACUUM) later frees the dead rows, leaving the indexes large.

SELECT setseed(0.4242);

-- ---------------------------------------------------------------------------------------------
-- Low-volume tables
-- ---------------------------------------------------------------------------------------------

INSERT INTO public.org_workspaces (slug, name, plan, region, created_at)
SELECT format('%s-%s', company, i),
       format('%s %s', initcap(company), i),
       (ARRAY['free', 'team', 'team', 'business', 'enterprise'])[1 + (i * 7) % 5],
       (ARRAY['eu-west-1', 'eu-central-1', 'us-east-1'])[1 + i % 3],
       now() - make_interval(days => 1100 - i * 8)
FROM generate_series(1, 120) AS i,
     LATERAL (SELECT (ARRAY['acme', 'globex', 'initech', 'umbrella', 'hooli', 'stark', 'wayne',
                            'wonka', 'tyrell', 'soylent', 'vandelay', 'cyberdyne'])[1 + i % 12]
             ) AS c (company);

-- 120 workspaces x 17 members; user ids 1..500, unique per workspace.
INSERT INTO public.org_members (workspace_id, user_id, role, joined_at)
SELECT 1 + i % 120,
       1 + ((i % 120) * 37 + (i / 120) * 13) % 500,
       CASE WHEN i / 120 = 0 THEN 'owner' WHEN i / 120 < 3 THEN 'admin'
            WHEN i % 7 = 0 THEN 'viewer' ELSE 'member' END,
       now() - make_interval(days => 1000 - (i / 2))
FROM generate_series(0, 2039) AS i;

-- user_api_keys: ~90.2 % of the int4 range used (critical).
SELECT setval('public.user_api_keys_id_seq', 1937000000);
INSERT INTO public.user_api_keys
       (workspace_id, user_id, name, key_prefix, key_hash, scopes, created_at, last_used_at, revoked_at)
SELECT 1 + i % 120,
       1 + (i * 13) % 500,
       format('ci-bot-%s', i),
       'lf_' || left(md5('prefix' || i), 8),
       md5('api-key-' || i),
       (ARRAY['{read}', '{read,write}', '{read,write,admin}'])[1 + i % 3]::text[],
       now() - make_interval(mins => 3000 * 10 - i * 10),
       CASE WHEN i % 4 <> 0 THEN now() - make_interval(mins => (3000 - i) * 5) END,
       CASE WHEN i <= 2000 THEN now() - make_interval(mins => (3000 - i) * 9) END
FROM generate_series(1, 3000) AS i;

-- user_sources: ~70.1 % of the int4 range used (warning).
SELECT setval('public.user_sources_id_seq', 1505000000);
INSERT INTO public.user_sources (workspace_id, user_id, provider, external_account, connected_at)
SELECT 1 + i % 120,
       1 + (i * 17) % 500,
       (ARRAY['github', 'gitlab', 'linear', 'notion', 'slack'])[1 + i % 5],
       format('acct-%s', 100000 + i),
       now() - make_interval(hours => 20000 - i * 12)
FROM generate_series(1, 1500) AS i;

-- workspace_integrations: smallserial, ~20 % used (ids 6001..6600).
SELECT setval('public.workspace_integrations_id_seq', 6000);
INSERT INTO public.workspace_integrations (workspace_id, kind, config, enabled, created_at)
SELECT 1 + (i - 1) % 120,
       (ARRAY['github', 'gitlab', 'linear', 'notion', 'slack'])[1 + (i - 1) / 120],
       jsonb_build_object('installation_id', 500000 + i, 'webhook_secret_ref', format('vault:lf/int/%s', i)),
       i % 11 <> 0,
       now() - make_interval(days => 900 - i)
FROM generate_series(1, 600) AS i;

-- Repositories and documents share workspace_object_id_seq: repositories get 1..1500,
-- documents 1501..9500. The integration with id 6000 + w belongs to workspace w.
INSERT INTO public.workspace_repositories (workspace_id, integration_id, full_name, default_branch, created_at)
SELECT 1 + (j - 1) % 120,
       (6000 + 1 + (j - 1) % 120)::smallint,
       format('org-%s/repo-%s', 1 + (j - 1) % 120, j),
       CASE WHEN j % 5 = 0 THEN 'master' ELSE 'main' END,
       now() - make_interval(days => 800 - j / 2)
FROM generate_series(1, 1500) AS j;

INSERT INTO public.workspace_documents (workspace_id, repository_id, path, title, content_sha, updated_at)
SELECT 1 + (r - 1) % 120,
       r,
       format('docs/%s/page-%s.md', (ARRAY['guides', 'reference', 'adr', 'runbooks'])[1 + j % 4], j),
       format('Document %s', j),
       md5('doc-' || j),
       now() - make_interval(hours => (j * 7) % 8000)
FROM generate_series(1, 8000) AS j,
     LATERAL (SELECT 1 + j % 1500) AS x (r);

-- 120 workspaces x 18 monthly invoices.
INSERT INTO public.billing_invoices
       (workspace_id, number, period_start, period_end, amount_cents, currency, status, issued_at)
SELECT w,
       format('INV-%s-%s', to_char(p, 'YYYYMM'), lpad(w::text, 4, '0')),
       p::date,
       (p + interval '1 month' - interval '1 day')::date,
       (ARRAY[0, 4900, 19900, 99900])[1 + (w * 7) % 4] + (w * 31) % 1000,
       CASE WHEN w % 4 = 0 THEN 'USD' ELSE 'EUR' END,
       CASE WHEN m = 1 THEN 'open' WHEN (w + m) % 23 = 0 THEN 'void' ELSE 'paid' END,
       (p + interval '1 month' + interval '2 hours') AT TIME ZONE 'UTC'
FROM generate_series(1, 120) AS w,
     generate_series(1, 18) AS m,
     LATERAL (SELECT date_trunc('month', now() AT TIME ZONE 'UTC') - make_interval(months => m)) AS x (p);

-- ---------------------------------------------------------------------------------------------
-- PII
-- ---------------------------------------------------------------------------------------------

-- 5000 identities, unique fake e-mails user<N>@example.com.
INSERT INTO public.workspace_actor_identities
       (workspace_id, source, source_user_id, source_email, display_name, first_seen_at, last_seen_at)
SELECT 1 + i % 120,
       (ARRAY['github', 'gitlab', 'linear', 'slack'])[1 + i % 4],
       format('ext-%s', 700000 + i),
       format('user%s@example.com', i),
       format('Example User %s', i),
       now() - make_interval(days => 700 - (i % 600)),
       now() - make_interval(hours => (i * 37) % 4000)
FROM generate_series(1, 5000) AS i;

-- ~50k audit rows over the last 183 days, plus 100 rows per month for the 20 months before
-- (so the retention and the 90-day anonymisation both have old rows to work on).
INSERT INTO public.workspace_user_activities
       (workspace_id, user_id, action, target_type, target_id, actor_email, actor_ip, user_agent, created_at)
SELECT 1 + (u * 37) % 120,
       u,
       a.action,
       a.target_type,
       CASE WHEN a.target_type IS NOT NULL THEN 1 + (i * 7919) % 100000 END,
       format('user%s@example.com', u),
       CASE WHEN i % 10 = 0 THEN '2001:db8::'::inet + (1 + i % 65000)
            ELSE '192.0.2.0'::inet + (1 + i % 254) END,
       (ARRAY['Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0',
              'Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15',
              'Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36',
              'lightfast-cli/2.3.1 (linux; amd64)',
              'curl/8.5.0'])[1 + (i * 3) % 5],
       t.created_at
FROM (
    SELECT i, now() - make_interval(secs => (i::bigint * 314159) % (183 * 86400)) AS created_at
    FROM generate_series(1, 50000) AS i
    UNION ALL
    SELECT 50000 + m * 100 + k,
           (date_trunc('month', now() AT TIME ZONE 'UTC') - make_interval(months => m)
               + make_interval(hours => 1 + k * 6)) AT TIME ZONE 'UTC'
    FROM generate_series(7, 26) AS m, generate_series(0, 99) AS k
) AS t (i, created_at),
LATERAL (SELECT 1 + (t.i * 7) % 500) AS uu (u),
LATERAL (SELECT * FROM (VALUES
            (0, 'auth.login', NULL), (1, 'auth.logout', NULL), (2, 'api_key.created', 'api_key'),
            (3, 'repository.connected', 'repository'), (4, 'document.viewed', 'document'),
            (5, 'workflow.triggered', 'workflow_run'), (6, 'member.invited', 'member'),
            (7, 'settings.updated', NULL)) AS v (n, action, target_type)
         WHERE v.n = t.i % 8) AS a
ORDER BY t.created_at;

-- ---------------------------------------------------------------------------------------------
-- Core data
-- ---------------------------------------------------------------------------------------------

-- workspace_neural_observations: int4 column, bigint sequence at ~65 % of the int4 range.
-- Insert-only, never churned, and its indexes are rebuilt right after the load (plain REINDEX is
-- allowed in a transaction): the well-packed indexes to compare the bloated ones with.
SELECT setval('public.workspace_neural_observations_id_seq', 1395000000);
INSERT INTO public.workspace_neural_observations (workspace_id, entity_id, kind, confidence, observed_at, payload)
SELECT 1 + i % 120,
       1 + (i::bigint * 7919) % 200000,
       (ARRAY['mention', 'dependency', 'ownership', 'similarity', 'co_change'])[1 + i % 5],
       round(random()::numeric, 3)::real,
       now() - make_interval(secs => (60000 - i) * 90),
       jsonb_build_object('source', (ARRAY['github', 'linear', 'notion'])[1 + i % 3], 'v', 2)
FROM generate_series(1, 60000) AS i;

REINDEX TABLE public.workspace_neural_observations;

-- workspace_neural_entities: 200k entities (ids 1..200000), then one sync re-sends 40k known
-- entities plus 4k new ones (upsert, non-HOT because updated_at is indexed), then two thirds of
-- the rows are purged, spread evenly over the whole table.
INSERT INTO public.workspace_neural_entities
       (workspace_id, entity_type, external_key, name, attributes, seen_count, first_seen_at, updated_at)
SELECT 1 + i % 120,
       (ARRAY['person', 'repository', 'issue', 'pull_request', 'document', 'service'])[1 + i % 6],
       format('src:%s', i),
       format('Entity %s', i),
       jsonb_build_object('lang', (ARRAY['en', 'de', 'fr'])[1 + i % 3], 'score', i % 100),
       1,
       now() - make_interval(secs => (200000 - i) * 120),
       now() - make_interval(secs => (200000 - i) * 120)
FROM generate_series(1, 200000) AS i;

INSERT INTO public.workspace_neural_entities AS e
       (workspace_id, entity_type, external_key, name, attributes, seen_count, first_seen_at, updated_at)
SELECT 1 + i % 120,
       (ARRAY['person', 'repository', 'issue', 'pull_request', 'document', 'service'])[1 + i % 6],
       format('src:%s', i),
       format('Entity %s', i),
       jsonb_build_object('lang', (ARRAY['en', 'de', 'fr'])[1 + i % 3], 'score', i % 100),
       1,
       now() - interval '1 hour',
       now() - interval '1 hour'
FROM (SELECT 1 + (k::bigint * 7919) % 200000 FROM generate_series(1, 40000) AS k
      UNION ALL
      SELECT i FROM generate_series(200001, 204000) AS i) AS s (i)
ON CONFLICT (workspace_id, entity_type, external_key) DO UPDATE
SET seen_count = e.seen_count + 1,
    attributes = excluded.attributes,
    updated_at = excluded.updated_at;

DELETE FROM public.workspace_neural_entities WHERE id % 3 <> 0;

-- workspace_temporal_states (SCD2): 12k entities x 3 versions, then a change for every other
-- entity closes its current version and opens a new one.
INSERT INTO public.workspace_temporal_states
       (workspace_id, entity_id, state, attributes, valid_from, valid_to)
SELECT 1 + e % 120,
       e,
       (ARRAY['proposed', 'active', 'deprecated'])[1 + v],
       jsonb_build_object('owner', format('team-%s', e % 40), 'rev', v),
       now() - make_interval(days => 400 - v * 120, mins => e % 1440),
       CASE WHEN v < 2 THEN now() - make_interval(days => 400 - (v + 1) * 120, mins => e % 1440) END
FROM generate_series(1, 12000) AS e, generate_series(0, 2) AS v;

UPDATE public.workspace_temporal_states
SET valid_to = now() - make_interval(days => (1 + entity_id % 30)::int)
WHERE valid_to IS NULL AND entity_id % 2 = 0;

INSERT INTO public.workspace_temporal_states
       (workspace_id, entity_id, state, attributes, valid_from, valid_to)
SELECT 1 + e % 120,
       e,
       'retired',
       jsonb_build_object('owner', format('team-%s', e % 40), 'rev', 3),
       now() - make_interval(days => 1 + e % 30),
       NULL
FROM generate_series(2, 12000, 2) AS e;

-- workspace_workflow_runs: 310k runs over the last 54 days. The newest 30k go through
-- queued -> running -> finished as status updates (non-HOT), then runs are purged so that about
-- 103k remain, spread over the whole table.
INSERT INTO public.workspace_workflow_runs
       (workspace_id, workflow_name, trigger, status, attempt, queued_at, started_at, finished_at, updated_at)
SELECT 1 + i % 120,
       (ARRAY['index-repository', 'sync-linear', 'embed-documents', 'nightly-digest', 'reconcile-entities'])[1 + i % 5],
       (ARRAY['push', 'schedule', 'manual', 'webhook'])[1 + (i * 3) % 4],
       CASE WHEN i > 280000 THEN 'queued'
            WHEN i % 20 = 0 THEN 'failed' WHEN i % 37 = 0 THEN 'cancelled' ELSE 'succeeded' END,
       CASE WHEN i % 20 = 0 THEN 2 ELSE 1 END,
       q,
       CASE WHEN i <= 280000 THEN q + interval '3 seconds' END,
       CASE WHEN i <= 280000 THEN q + make_interval(secs => 20 + i % 600) END,
       CASE WHEN i <= 280000 THEN q + make_interval(secs => 20 + i % 600) ELSE q END
FROM generate_series(1, 310000) AS i,
     LATERAL (SELECT now() - make_interval(secs => (310000 - i) * 15 + 60)) AS x (q);

UPDATE public.workspace_workflow_runs
SET status = 'running', started_at = queued_at + interval '2 seconds', updated_at = queued_at + interval '2 seconds'
WHERE status = 'queued' AND id % 50 <> 0;

UPDATE public.workspace_workflow_runs
SET status = CASE WHEN id % 20 = 1 THEN 'failed' ELSE 'succeeded' END,
    finished_at = started_at + make_interval(secs => 20 + id % 600),
    updated_at = started_at + make_interval(secs => 20 + id % 600)
WHERE status = 'running' AND id % 25 <> 0;

DELETE FROM public.workspace_workflow_runs WHERE id % 3 <> 0;

-- ---------------------------------------------------------------------------------------------
-- Partitioned tables
-- ---------------------------------------------------------------------------------------------

-- workspace_operations_metrics: the current and the previous month hold 102k rows each (large,
-- insert-only partitions for autovacuum tuning); the 13 months before hold 6k each, and the
-- oldest two of them are past the 12-month retention. The future partition stays empty.
INSERT INTO public.workspace_operations_metrics (workspace_id, metric, value, created_at)
SELECT 1 + i % 120,
       (ARRAY['api.requests', 'api.latency_ms', 'ingest.events', 'search.queries', 'jobs.completed'])[1 + i % 5],
       random() * 1000,
       lo + make_interval(secs => extract(epoch FROM hi - lo) * i / n)
FROM generate_series(14, 0, -1) AS m,
     LATERAL (SELECT date_trunc('month', now() AT TIME ZONE 'UTC') - make_interval(months => m),
                     CASE WHEN m <= 1 THEN 102000 ELSE 6000 END) AS b (month_utc, n),
     LATERAL (SELECT month_utc AT TIME ZONE 'UTC',
                     least((month_utc + interval '1 month') AT TIME ZONE 'UTC', now())) AS r (lo, hi),
     LATERAL generate_series(0, n - 1) AS i;

-- workspace_webhook_payloads: 3000 deliveries (~1 KB of JSON each) in each of the 6 months up to
-- now; the oldest two months are past the 3-month retention. (OFFSET 0 keeps each hash from being
-- recomputed at every place it is used.)
INSERT INTO public.workspace_webhook_payloads (workspace_id, source, event, delivery_id, payload, created_at)
SELECT 1 + n % 120,
       src,
       ev,
       h3,
       jsonb_build_object(
           'action', ev,
           'delivery', h3,
           'repository', jsonb_build_object(
               'id', 1 + n % 1500,
               'full_name', format('org-%s/repo-%s', 1 + n % 120, 1 + n % 1500),
               'private', n % 3 = 0,
               'default_branch', 'main'),
           'sender', jsonb_build_object(
               'login', format('user%s', 1 + n % 500),
               'email', format('user%s@example.com', 1 + n % 500)),
           'head_commit', jsonb_build_object(
               'id', sha,
               'tree_id', h2,
               'message', format('Update docs/page-%s.md (%s)', n, left(h3, 12)),
               'timestamp', to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')),
           'commits', jsonb_build_array(sha, h2, h3, h2 || sha, h3 || h2, sha || h3),
           'modified', jsonb_build_array(format('docs/page-%s.md', n), format('docs/page-%s.md', n + 1),
                                         'README.md', 'CHANGELOG.md'),
           'signature', 'sha256=' || h2 || sha,
           'installation', jsonb_build_object('id', 500000 + n % 600, 'node_id', h3)),
       ts
FROM generate_series(5, 0, -1) AS m,
     generate_series(0, 2999) AS k,
     LATERAL (SELECT m * 3000 + k,
                     date_trunc('month', now() AT TIME ZONE 'UTC') - make_interval(months => m)
             ) AS b (n, month_utc),
     LATERAL (SELECT md5('commit-' || n),
                     (month_utc AT TIME ZONE 'UTC')
                         + make_interval(secs => k / 3000.0 * extract(epoch FROM
                               least((month_utc + interval '1 month') AT TIME ZONE 'UTC', now())
                               - (month_utc AT TIME ZONE 'UTC'))),
                     (ARRAY['github', 'github', 'linear', 'slack'])[1 + n % 4],
                     (ARRAY['push', 'pull_request', 'issues', 'issue_comment'])[1 + (n / 4) % 4]
              OFFSET 0) AS c (sha, ts, src, ev),
     LATERAL (SELECT md5(sha) OFFSET 0) AS c2 (h2),
     LATERAL (SELECT md5(h2) OFFSET 0) AS c3 (h3);

-- Stray deliveries in the DEFAULT partition: 20 replayed ones from before the oldest monthly
-- partition (already past the retention) and 5 from a sender with an unset clock (1970).
INSERT INTO public.workspace_webhook_payloads (workspace_id, source, event, delivery_id, payload, created_at)
SELECT 1 + k % 120,
       'github',
       'push',
       md5('stray-' || k),
       jsonb_build_object('action', 'push', 'delivery', md5('stray-' || k), 'replayed', k <= 20),
       CASE WHEN k <= 20
            THEN (date_trunc('month', now() AT TIME ZONE 'UTC') - interval '7 months'
                      + make_interval(days => k)) AT TIME ZONE 'UTC'
            ELSE timestamptz '1970-01-01 00:00:00+00' + make_interval(secs => k) END
FROM generate_series(1, 25) AS k;

-- Statistics for every table (reltuples, n_live_tup), so the jobs see the shapes right away. A
-- small sample is enough for that and keeps the load fast; autovacuum re-analyses later.
SET default_statistics_target = 10;
ANALYZE;
RESET default_statistics_target;
