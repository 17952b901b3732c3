-- What the reference review found, planted for the advisor (loaded after data.sql). The sample
-- already carries some of it: foreign keys without an index (workspace_id of user_api_keys and
-- others), int4 keys of growing tables, a redundant index on workspace_neural_observations and
-- status churn whose updates miss HOT on workspace_workflow_runs.

-- A B-tree on the time column of an append-only table stored in time order: BRIN would do
-- (brin_candidate). The table also got the fillfactor of an updated table (fillfactor).
CREATE INDEX workspace_neural_observations_observed_at_idx
    ON public.workspace_neural_observations (observed_at);
ALTER TABLE public.workspace_neural_observations SET (fillfactor = 90);

-- Retention by DELETE on a time-keyed table (two thirds of the runs were deleted by age):
-- partitioning would drop whole months instead (partition_candidate).
CREATE INDEX workspace_workflow_runs_queued_at_idx ON public.workspace_workflow_runs (queued_at);

-- The same index created twice by two migrations (duplicate_index).
CREATE INDEX workspace_documents_repository_idx ON public.workspace_documents (repository_id);

-- A webhook signing secret kept in clear (plaintext_secret).
ALTER TABLE public.workspace_integrations ADD COLUMN webhook_secret text;
UPDATE public.workspace_integrations SET webhook_secret = 'whsec_' || substr(md5(id::text), 1, 16 + id % 9);
