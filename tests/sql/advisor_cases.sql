-- The advisor's planted corpus: one case of every check next to a healthy twin, in schema adv.
-- tests/test_advisor.py names what must be found (PLANTED) and what must not (TWINS); the bench
-- (bench/advisor.py) measures precision and recall on the same file.
CREATE SCHEMA adv;

-- duplicate_index: two identical indexes; a plain index that duplicates a unique constraint's
-- (the constraint's is kept). Twin: two indexes on different columns.
CREATE TABLE adv.dup (id bigint PRIMARY KEY, a int, b int);
CREATE INDEX dup_a_idx ON adv.dup (a);
CREATE INDEX dup_a_again_idx ON adv.dup (a);
CREATE TABLE adv.dup_uniq (id bigint PRIMARY KEY, a int CONSTRAINT dup_uniq_a_key UNIQUE, b int);
CREATE INDEX dup_uniq_a_idx ON adv.dup_uniq (a);
CREATE TABLE adv.dup_ok (id bigint PRIMARY KEY, a int, b int);
CREATE INDEX dup_ok_a_idx ON adv.dup_ok (a);
CREATE INDEX dup_ok_b_idx ON adv.dup_ok (b);
-- same columns, different predicate or method: not duplicates
CREATE INDEX dup_ok_a_partial_idx ON adv.dup_ok (a) WHERE b > 0;
CREATE INDEX dup_ok_a_hash_idx ON adv.dup_ok USING hash (a);

-- redundant_index: (a) is a left prefix of (a, b). Twins: (b) vs (a, b) is no prefix; a unique
-- (a) next to (a, b) enforces something and is never proposed.
CREATE TABLE adv.red (id bigint PRIMARY KEY, a int, b int);
CREATE INDEX red_a_idx ON adv.red (a);
CREATE INDEX red_a_b_idx ON adv.red (a, b);
CREATE TABLE adv.red_ok (id bigint PRIMARY KEY, a int, b int);
CREATE INDEX red_ok_b_idx ON adv.red_ok (b);
CREATE INDEX red_ok_a_b_idx ON adv.red_ok (a, b);
CREATE UNIQUE INDEX red_ok_a_uniq ON adv.red_ok (a);

-- fk_without_index: nothing leads with parent_id. Twins: an index on it; a two-column key whose
-- index has the columns in the other order.
CREATE TABLE adv.parent (id bigint PRIMARY KEY, a int NOT NULL, b int NOT NULL, UNIQUE (a, b));
CREATE TABLE adv.child_noidx (id bigint PRIMARY KEY, parent_id bigint REFERENCES adv.parent (id));
CREATE TABLE adv.child_idx (id bigint PRIMARY KEY, parent_id bigint REFERENCES adv.parent (id));
CREATE INDEX child_idx_parent_id_idx ON adv.child_idx (parent_id);
CREATE TABLE adv.child_multi (id bigint PRIMARY KEY, a int, b int, FOREIGN KEY (a, b) REFERENCES adv.parent (a, b));
CREATE INDEX child_multi_b_a_idx ON adv.child_multi (b, a);
INSERT INTO adv.parent SELECT g, g, g FROM generate_series(1, 2000) g;
INSERT INTO adv.child_noidx SELECT g, g FROM generate_series(1, 1000) g;
INSERT INTO adv.child_idx SELECT g, g FROM generate_series(1, 1000) g;
INSERT INTO adv.child_multi SELECT g, g, g FROM generate_series(1, 1000) g;
DELETE FROM adv.parent WHERE id > 1990;

-- brin_candidate: a B-tree on a timestamp stored in time order, append-only. Twin: the same
-- shape with the times in random order.
CREATE TABLE adv.events (id bigint PRIMARY KEY, created_at timestamptz NOT NULL, payload text);
CREATE INDEX events_created_at_idx ON adv.events (created_at);
INSERT INTO adv.events SELECT g, timestamptz '2024-01-01' + g * interval '1 minute', 'x' FROM generate_series(1, 40000) g;
CREATE TABLE adv.events_shuffled (id bigint PRIMARY KEY, created_at timestamptz NOT NULL, payload text);
CREATE INDEX events_shuffled_created_at_idx ON adv.events_shuffled (created_at);
INSERT INTO adv.events_shuffled
SELECT g, timestamptz '2024-01-01' + ((g * 7919) % 40000) * interval '1 minute', 'x' FROM generate_series(1, 40000) g;

-- fillfactor: an append-only table at fillfactor 70; a table whose updates miss HOT at 100.
-- Twins: an append-only table at 100; an updated table with room on its pages (HOT works).
CREATE TABLE adv.append_ff (id bigint PRIMARY KEY, v text) WITH (fillfactor = 70);
INSERT INTO adv.append_ff SELECT g, 'v' FROM generate_series(1, 2000) g;
CREATE TABLE adv.append_ok (id bigint PRIMARY KEY, v text);
INSERT INTO adv.append_ok SELECT g, 'v' FROM generate_series(1, 2000) g;
CREATE TABLE adv.churn (id bigint PRIMARY KEY, state text, n int);
INSERT INTO adv.churn SELECT g, 'queued', 0 FROM generate_series(1, 2000) g;
UPDATE adv.churn SET state = 'running', n = n + 1;
CREATE TABLE adv.churn_ok (id bigint PRIMARY KEY, state text, n int) WITH (fillfactor = 50);
INSERT INTO adv.churn_ok SELECT g, 'queued', 0 FROM generate_series(1, 2000) g;
UPDATE adv.churn_ok SET n = n + 1;

-- int4_key: an integer primary key of a growing table, and the integer foreign key that follows
-- it. Twin: the same pair in bigint.
CREATE TABLE adv.orders (id serial PRIMARY KEY, note text);
CREATE TABLE adv.order_lines (id bigint PRIMARY KEY, order_id int REFERENCES adv.orders (id));
CREATE INDEX order_lines_order_id_idx ON adv.order_lines (order_id);
INSERT INTO adv.orders (note) SELECT 'o' FROM generate_series(1, 1000);
INSERT INTO adv.order_lines SELECT g, g FROM generate_series(1, 1000) g;
CREATE TABLE adv.invoices (id bigserial PRIMARY KEY, note text);
CREATE TABLE adv.invoice_lines (id bigint PRIMARY KEY, invoice_id bigint REFERENCES adv.invoices (id));
CREATE INDEX invoice_lines_invoice_id_idx ON adv.invoice_lines (invoice_id);
INSERT INTO adv.invoices (note) SELECT 'i' FROM generate_series(1, 1000);
INSERT INTO adv.invoice_lines SELECT g, g FROM generate_series(1, 1000) g;

-- partition_candidate: a time-keyed log whose retention deletes the oldest rows. Twin: the same
-- log kept whole (its times shuffled, so it is no BRIN case either).
CREATE TABLE adv.logs (id bigint PRIMARY KEY, created_at timestamptz NOT NULL, line text);
CREATE INDEX logs_created_at_idx ON adv.logs (created_at);
INSERT INTO adv.logs SELECT g, timestamptz '2024-01-01' + g * interval '1 minute', 'l' FROM generate_series(1, 40000) g;
DELETE FROM adv.logs WHERE id <= 10000;
CREATE TABLE adv.logs_kept (id bigint PRIMARY KEY, created_at timestamptz NOT NULL, line text);
CREATE INDEX logs_kept_created_at_idx ON adv.logs_kept (created_at);
INSERT INTO adv.logs_kept
SELECT g, timestamptz '2024-01-01' + ((g * 7919) % 40000) * interval '1 minute', 'l' FROM generate_series(1, 40000) g;

-- no_primary_key. Twin: every other table.
CREATE TABLE adv.nopk (a int, b text);
INSERT INTO adv.nopk SELECT g, 'b' FROM generate_series(1, 100) g;

-- plaintext_secret: a password and an API token in clear. Twins: hashes named as such, and a
-- token column holding SHA-256 hex digests (statistics of a hash: all distinct, 64 characters).
CREATE TABLE adv.accounts (id bigint PRIMARY KEY, email text, password text, api_token text,
                           password_hash text, token_expires_at timestamptz);
INSERT INTO adv.accounts
SELECT g, 'u' || g || '@example.com', 'pw' || (g % 37), 'tok_' || g, md5(g::text), now() FROM generate_series(1, 500) g;
CREATE TABLE adv.sessions (id bigint PRIMARY KEY, session_token text NOT NULL);
INSERT INTO adv.sessions SELECT g, encode(sha256(g::text::bytea), 'hex') FROM generate_series(1, 500) g;
