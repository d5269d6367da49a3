-- The ledger's raw SQL, one named query per block (`-- name: <name>`), loaded by
-- `pipeline.ledger.queries`. Statements composed from the mappings live in the modules
-- as SQLAlchemy Core; what is here is SQL that reads best as SQL (views, LATERAL, COPY).

-- name: batch_status
-- One batch's row of the `batch_status` view, with its result and metrics.
SELECT s.*, b.result, b.metrics FROM batch_status s JOIN batches b USING (id) WHERE s.id = :id

-- name: batch_status_read_ahead
-- As `batch_status`; once its results are ready, a batch of at most :read_ahead_items inputs
-- also brings its first result page as `RESULT_PAGE` reads it (`page_*`; NULL otherwise): a
-- waiter that sees it finished nearly always reads its results next, now in the same round trip.
SELECT s.*, b.result, b.metrics, p.first_item AS page_first_item, p.outputs AS page_outputs,
  p.errors AS page_errors, p.versions AS page_versions, b.model_versions AS page_pinned,
  p.first_item + p.items >= b.items AS page_last
FROM batch_status s JOIN batches b USING (id)
LEFT JOIN LATERAL (
  SELECT r.first_item, r.items, r.outputs, r.errors, r.versions FROM result_pages r
  WHERE r.batch_id = s.id AND s.results_ready AND b.items <= :read_ahead_items
  ORDER BY r.first_item
  LIMIT 1
) p ON true
WHERE s.id = :id

-- name: batch_statuses
-- The newest rows of the `batch_status` view, optionally of one state.
SELECT s.*, b.result, b.metrics FROM batch_status s JOIN batches b USING (id)
WHERE CAST(:state AS text) IS NULL OR s.state = :state
ORDER BY s.created_at DESC LIMIT :limit

-- name: new_subtask_ids
-- The sub-tasks a split step just copied: per model, those from its first new seq, and their
-- shadows (a shadow's seq is -1 - its serve sub-task's); shadows last. With :announce, the
-- same statement also NOTIFYs :channel (sent on commit): no round trip of its own. The
-- sub-select is a one-time filter, run once whatever the rows.
SELECT s.id, s.model, s.priority, s.seq FROM subtasks s
JOIN unnest(CAST(:models AS text[]), CAST(:first_seqs AS int[])) AS f (model, first_seq)
  ON s.model = f.model AND CASE WHEN s.role = 'shadow' THEN -1 - s.seq ELSE s.seq END >= f.first_seq
WHERE s.batch_id = :batch_id
  AND (NOT CAST(:announce AS boolean) OR (SELECT pg_notify(:channel, '')) IS NOT NULL)
ORDER BY s.role, s.seq, s.model

-- name: serving_of
-- What a batch's first split pins, per model: its champion version (NULL: none yet) and its
-- active roll-out (NULL id: none), one query for both. Given the model's queue as the broker
-- names it (:queues, in the order of :models; else NULL), also the live workers that consume
-- it (a heartbeat within :max_age_s), and when this read them by the server's clock: whose
-- sub-tasks a small batch's message may carry (`ledger.Riding`).
SELECT m.model, a.version AS champion, r.id, r.version, r.mode, r.percent,
  ARRAY(
    SELECT h.worker FROM worker_heartbeats h
    WHERE m.queue = ANY (h.queues)
      AND h.beat_at > clock_timestamp() - make_interval(secs => CAST(:max_age_s AS float8))
    ORDER BY h.worker
  ) AS consumers,
  clock_timestamp() AS read_at
FROM unnest(CAST(:models AS text[]), CAST(:queues AS text[])) AS m (model, queue)
LEFT JOIN model_aliases a ON a.model = m.model AND a.alias = 'champion'
LEFT JOIN rollouts r ON r.model = m.model AND r.state = 'active'

-- name: subtask_outputs
-- Per model and pinned version (after a seq of its own), the serve sub-tasks of a batch that
-- start before an input: one query for every stream, each read in seq order through the
-- (batch_id, model, seq) index. A canary's model has two streams, one per version. With
-- their drift bin counts and timestamps: the aggregate's metrics sum them as they are read.
-- Named as `ONE_PAGE_DUE` names them (`subtask_*`), beside a batch's own columns.
SELECT m.n, c.seq AS subtask_seq, c.items AS subtask_items, c.output AS subtask_output, c.error AS subtask_error,
  c.state AS subtask_state, c.bin_counts AS subtask_bin_counts, c.rows AS subtask_rows,
  c.queued_at AS subtask_queued_at, c.started_at AS subtask_started_at, c.finished_at AS subtask_finished_at
FROM unnest(CAST(:models AS text[]), CAST(:versions AS text[]), CAST(:after_seqs AS int[]))
  WITH ORDINALITY AS m (model, version, after_seq, n)
CROSS JOIN LATERAL (
  SELECT s.seq, s.items, s.output, s.error, s.state, s.bin_counts, s.rows, s.queued_at, s.started_at, s.finished_at
  FROM subtasks s
  WHERE s.batch_id = :batch_id AND s.model = m.model AND s.role = 'serve' AND s.seq > m.after_seq
    AND s.model_version IS NOT DISTINCT FROM m.version AND s.items[1] < :before_item
  ORDER BY s.seq LIMIT :limit
) AS c
ORDER BY m.n, c.seq

-- name: rejected_messages
-- The dead letters by queue and reason (the counter pipeline_rejected_messages_total).
SELECT queue, reason, count(*) AS messages FROM dead_letters GROUP BY 1, 2

-- name: store_split_batch
-- A small batch stored with the split its client made, in one statement: the submission
-- commits once, with no BEGIN, no COPY and no second write of the batch's row. The row is
-- inserted as `insert_batch` and a finished `record_split` leave it: `running` with its
-- counters (`aggregating` when it has no sub-task). Then its input pages, its sub-tasks
-- `dispatched` with riders marked and leased as `copy_subtasks` writes them (each one's
-- items are :subtask_items[:items_from + 1 : :items_to]), and the roll-outs it follows. With
-- :announce, NOTIFY :channel on commit, as `new_subtask_ids` does. Only while each model's
-- champion and active roll-out are still those the split pinned (:pinned_*: its client may
-- have read them a moment before, `client_split.SERVING_REUSE_S`). Returns one row with
-- `pinned_current` false when they are not, and with a NULL state when :idempotency_key
-- names a batch already: nothing is written. Else one row per sub-task to publish (riders
-- left out, shadows last), or one with a NULL id when none is, each with the batch's state.
-- Created, split and its sub-tasks queued at one clock reading: a column default would be
-- read after the SELECT's own `clock_timestamp()` calls, so `created_at` could come after
-- `started_at`.
WITH stamp AS (
  SELECT clock_timestamp() AS at
), pinned AS (
  SELECT NOT EXISTS (
    SELECT FROM unnest(CAST(:pinned_models AS text[]), CAST(:pinned_champions AS text[]),
      CAST(:pinned_rollouts AS bigint[])) AS p (model, champion, rollout_id)
    LEFT JOIN model_aliases a ON a.model = p.model AND a.alias = 'champion'
    LEFT JOIN rollouts r ON r.model = p.model AND r.state = 'active'
    WHERE a.version IS DISTINCT FROM p.champion OR r.id IS DISTINCT FROM p.rollout_id
  ) AS current
), batch AS (
  INSERT INTO batches (id, pipeline, items, request_sha256, idempotency_key, failure_policy, priority,
    max_failed_fraction, created_at, deadline_at, state, split_items, total, model_versions, started_at,
    aggregating_at)
  SELECT CAST(:id AS uuid), :pipeline, CAST(:items AS int), :request_sha256, :idempotency_key, :failure_policy,
    :priority, CAST(:max_failed_fraction AS float8), t.at, t.at + CAST(:deadline AS interval),
    CASE WHEN CAST(:total AS int) = 0 THEN 'aggregating' ELSE 'running' END, CAST(:items AS int),
    CAST(:total AS int), CAST(:model_versions AS jsonb), t.at, CASE WHEN CAST(:total AS int) = 0 THEN t.at END
  FROM stamp t, pinned p
  WHERE p.current
  ON CONFLICT (idempotency_key) DO NOTHING
  RETURNING id, state, created_at
), pages AS (
  INSERT INTO input_pages (batch_id, first_item, items, features, data)
  SELECT b.id, p.first_item, p.items, p.features, CAST(p.data AS json)
  FROM batch b, unnest(CAST(:page_firsts AS int[]), CAST(:page_counts AS int[]), CAST(:page_features AS bytea[]),
    CAST(:page_data AS text[])) AS p (first_item, items, features, data)
), new_subtasks AS (
  INSERT INTO subtasks (batch_id, model, seq, max_attempts, priority, rows, items, payload, state, model_version,
    role, rides, queued_at, lease_until)
  SELECT b.id, s.model, s.seq, s.max_attempts, s.priority, s.items_to - s.items_from,
    (CAST(:subtask_items AS int[]))[s.items_from + 1 : s.items_to], s.payload, 'dispatched', s.model_version, s.role,
    s.rides, b.created_at, s.lease_until
  FROM batch b, unnest(CAST(:models AS text[]), CAST(:seqs AS int[]), CAST(:max_attempts AS int[]),
    CAST(:priorities AS int2[]), CAST(:items_from AS int[]), CAST(:items_to AS int[]),
    CAST(:payloads AS bytea[]), CAST(:versions AS text[]), CAST(:roles AS text[]), CAST(:rides AS boolean[]),
    CAST(:leases AS timestamptz[]))
    AS s (model, seq, max_attempts, priority, items_from, items_to, payload, model_version, role, rides, lease_until)
  RETURNING id, model, priority, seq, role, rides
), followed AS (
  INSERT INTO rollout_batches (rollout_id, batch_id)
  SELECT r, b.id FROM batch b, unnest(CAST(:rollout_ids AS bigint[])) AS r
)
SELECT p.current AS pinned_current, b.state, s.id, s.model, s.priority,
  (SELECT pg_notify(:channel, '') FROM batch WHERE CAST(:announce AS boolean)) AS announced
FROM pinned p
LEFT JOIN batch b ON true
LEFT JOIN new_subtasks s ON NOT s.rides
ORDER BY s.role, s.seq, s.model

-- name: copy_input_pages
COPY input_pages (batch_id, first_item, items, features, data) FROM STDIN

-- name: copy_subtasks
COPY subtasks (batch_id, model, seq, max_attempts, priority, rows, items, payload, state, model_version, role, rides, lease_until) FROM STDIN

-- name: insert_result_page
-- One result page: a row, so one INSERT (one round trip; a COPY takes two). Its JSON columns
-- come as their text. A SELECT and its parameters named apart from `batches`' columns: the
-- statement finishing a batch inserts its last page in a WITH clause, with a WHERE of its own.
INSERT INTO result_pages (batch_id, first_item, items, outputs, errors, versions)
SELECT CAST(:batch_id AS uuid), :page_first, :page_items, CAST(:page_outputs AS json), CAST(:page_errors AS json),
  CAST(:page_versions AS json)

-- name: failed_result_pages
-- A batch whose split failed: every input gets the error as its result, one result page per
-- input page (set-based, whatever the batch's size). No model scored any input: each input
-- drops every version the batch pinned (none pinned: `versions` stays NULL).
WITH unscored AS (
  SELECT json_object_agg(m.model, NULL::text) AS versions
  FROM batches b, jsonb_object_keys(b.model_versions) AS m (model)
  WHERE b.id = :batch_id
)
INSERT INTO result_pages (batch_id, first_item, items, outputs, errors, versions)
SELECT i.batch_id, i.first_item, i.items,
       to_json(array_fill(NULL::text, ARRAY[i.items])),
       to_json(array_fill(CAST(:error AS text), ARRAY[i.items])),
       CASE WHEN u.versions IS NOT NULL THEN to_json(array_fill(u.versions, ARRAY[i.items])) END
FROM input_pages i, unscored u
WHERE i.batch_id = :batch_id
ON CONFLICT DO NOTHING

-- name: record_heartbeat
-- A worker's beat: its row inserted or refreshed. Rows of other workers silent for an hour
-- (killed, never stopped cleanly) are removed on the way.
WITH pruned AS (
  DELETE FROM worker_heartbeats
  WHERE beat_at < clock_timestamp() - interval '1 hour' AND worker <> :worker
)
INSERT INTO worker_heartbeats (worker, queues) VALUES (:worker, CAST(:queues AS text[]))
ON CONFLICT (worker) DO UPDATE SET queues = excluded.queues, beat_at = clock_timestamp()

-- name: unserved_queues
-- The queues, in the order given, that no worker has reported consuming within the last :max_age_s.
SELECT q.queue FROM unnest(CAST(:queues AS text[])) WITH ORDINALITY AS q (queue, n)
WHERE NOT EXISTS (
  SELECT 1 FROM worker_heartbeats h
  WHERE q.queue = ANY (h.queues) AND h.beat_at > clock_timestamp() - make_interval(secs => CAST(:max_age_s AS float8))
)
ORDER BY q.n

-- name: replace_changed_labels
-- Close the current label of each input given another one (its history is kept).
UPDATE labels l SET replaced_at = clock_timestamp()
FROM unnest(CAST(:items AS int[]), CAST(:labels AS jsonb[])) AS n (item, label)
WHERE l.batch_id = :batch_id AND l.item = n.item AND l.replaced_at IS NULL AND l.label <> n.label
RETURNING l.item

-- name: insert_labels
-- Each input's new current label; the same label again meets its current row and is skipped.
INSERT INTO labels (batch_id, item, label)
SELECT :batch_id, n.item, n.label FROM unnest(CAST(:items AS int[]), CAST(:labels AS jsonb[])) AS n (item, label)
ON CONFLICT (batch_id, item) WHERE replaced_at IS NULL DO NOTHING
RETURNING item

-- name: labelled_results
-- A batch's current labels with the stored result of each labelled input (no model runs).
SELECT l.item, l.label, r.output FROM labels l
JOIN results r ON r.batch_id = l.batch_id AND r.item = l.item
WHERE l.batch_id = :batch_id AND l.replaced_at IS NULL
ORDER BY l.item

-- name: insert_contributions
-- Window contributions, of any batches, inserted from one JSON array of records (:contributions)
-- and their bin counts as one int64 string that each record slices at its byte offset
-- (:bins): two parameters, whatever the count. Completed by `record_contributions` and
-- `finish_batch`.
INSERT INTO monitor_contributions
  (batch_id, pipeline, model, model_version, finished_at, items, rows, bin_counts, kpis, latency_s, estimate_sums)
SELECT c.batch_id, c.pipeline, c.model, c.model_version, c.finished_at, c.items, c.rows,
  substring(CAST(:bins AS bytea) FROM c.bins_from + 1 FOR c.bins_bytes), c.kpis, c.latency_s, c.estimate_sums
FROM jsonb_to_recordset(CAST(:contributions AS jsonb)) AS c (
  batch_id uuid, pipeline text, model text, model_version text, finished_at timestamptz, items int, rows int,
  bins_from int, bins_bytes int, kpis jsonb, latency_s float8, estimate_sums jsonb)

-- name: record_contributions
-- Finished batches' contributions (a batch aggregated again adds nothing); the statement
-- that finishes a batch carries its own. Not yet in their hours' rollups:
-- `fold_contributions` adds them later, off the aggregate's path.
-- include: insert_contributions
ON CONFLICT DO NOTHING

-- name: finish_batch
-- A batch its aggregate read due moved to its final state (:state; a cancelled one stays
-- `cancelled` and keeps its `finished_at`; else stamped by the statement's clock, not the
-- transaction's start, which an aggregate following a big batch opened long before) with
-- its result and metrics, counted in
-- `aggregate_runs`: only when the row is still as that read saw it (:read_state,
-- :read_runs) and the batch's aggregation lock is free or this transaction's (another
-- aggregation, say one assembling the batch as its sub-tasks finish, owns it otherwise).
-- The same statement then stores, only if the row moved, the batch's window contributions
-- (as `record_contributions`) and its last result page (as `insert_result_page`; none when
-- :page_first is NULL), NOTIFYs :channel on commit, and makes that commit durable whatever
-- the session's setting (a worker's turn commits its claims without waiting for the WAL
-- flush). One statement, so a batch of one input page is aggregated with no transaction:
-- one read (`ONE_PAGE_DUE`), this statement. Returns one row when the batch moved: whether
-- its split followed a roll-out (only such a batch has shadow sub-tasks to publish and gates
-- to judge).
WITH finished AS (
  UPDATE batches b
  SET state = :state, error = :error, result = CAST(:result AS jsonb), metrics = CAST(:metrics AS jsonb),
    finished_at = CASE WHEN b.state = 'cancelled' THEN b.finished_at ELSE clock_timestamp() END,
    aggregate_runs = b.aggregate_runs + 1
  WHERE b.id = :batch_id AND b.state = :read_state AND b.aggregate_runs = :read_runs
    AND pg_try_advisory_xact_lock(:lock_class, hashtext(CAST(:batch_id AS text)))
  RETURNING b.id, pg_notify(:channel, CAST(b.id AS text)) AS notified,
    set_config('synchronous_commit', 'on', true) AS durable_commit,
    EXISTS (SELECT FROM rollout_batches r WHERE r.batch_id = b.id) AS followed_rollout
), contributed AS (
  -- include: insert_contributions
  WHERE EXISTS (SELECT FROM finished)
  ON CONFLICT DO NOTHING
), last_page AS (
  -- include: insert_result_page
  WHERE EXISTS (SELECT FROM finished) AND CAST(:page_first AS int) IS NOT NULL
)
SELECT followed_rollout FROM finished

-- name: unfolded_contributions
-- Up to :limit unfolded contributions of :pipeline, oldest first, locked for the fold until
-- commit; rows being labelled are skipped (folded next time). Each one's rollup (model,
-- version, hour) and its bin counts, which the caller sums per rollup.
SELECT c.id, c.model, c.model_version, monitor_bucket(c.finished_at) AS bucket_start, c.bin_counts
FROM monitor_contributions c
WHERE c.pipeline = :pipeline AND NOT c.folded
ORDER BY c.finished_at, c.id
LIMIT :limit
FOR UPDATE SKIP LOCKED

-- name: fold_contributions
-- The unfolded contributions :ids (locked by `unfolded_contributions`) added to their
-- hours' rollups element-wise and marked folded, in one statement; returns how many. The
-- bin counts come summed per rollup (:models, :versions, :buckets, :bins as bigint[]
-- literals); the rest is summed here, from the locked rows, so a label stored just before is
-- in them. Sums are set-based (jsonb_each, GROUP BY), not the per-row SQL aggregates, which
-- cost a function call per contribution; rollups are locked in (model, version, hour)
-- order, so concurrent folds and label writers do not deadlock.
WITH taken AS (
  SELECT c.id, c.pipeline, c.model, c.model_version, monitor_bucket(c.finished_at) AS bucket_start, c.finished_at,
    c.items, c.rows, c.kpis, c.label_counts, c.latency_s, c.estimate_sums
  FROM monitor_contributions c
  WHERE c.id = ANY(CAST(:ids AS bigint[])) AND NOT c.folded
), marked AS (
  UPDATE monitor_contributions c SET folded = true FROM taken t WHERE c.id = t.id RETURNING c.id
), grouped AS (
  -- Each contribution's rollup as a number `g`: the sums below group on integers, not on text.
  SELECT t.*, dense_rank() OVER (ORDER BY t.pipeline, t.model, t.model_version, t.bucket_start) AS g FROM taken t
), totals AS (
  SELECT g, pipeline, model, model_version, bucket_start, count(*) AS batches, sum(items) AS items,
    sum(rows) AS rows, min(finished_at) AS first_finished, max(finished_at) AS last_finished
  FROM grouped GROUP BY g, pipeline, model, model_version, bucket_start
), bins AS (
  SELECT b.model, b.model_version, b.bucket_start, CAST(b.bins AS bigint[]) AS bin_counts
  FROM unnest(CAST(:models AS text[]), CAST(:versions AS text[]), CAST(:buckets AS timestamptz[]),
    CAST(:bins AS text[])) AS b (model, model_version, bucket_start, bins)
), entries AS (
  -- Each contribution's JSON sums as (field, key, value), in a rollup's terms.
  SELECT t.g, f.field, f.key, f.value
  FROM grouped t CROSS JOIN LATERAL (
    SELECT 'kpi_sums', e.key, e.value::text::numeric * t.items FROM jsonb_each(t.kpis) AS e
    WHERE jsonb_typeof(e.value) = 'number'
    UNION ALL
    SELECT 'kpi_items', e.key, t.items FROM jsonb_each(t.kpis) AS e WHERE jsonb_typeof(e.value) = 'number'
    UNION ALL
    SELECT 'label_counts', e.key, e.value::text::numeric FROM jsonb_each(t.label_counts) AS e
    UNION ALL
    SELECT 'latency_histogram', monitor_latency_bucket(t.latency_s)::text, 1 WHERE t.latency_s IS NOT NULL
    UNION ALL
    SELECT 'estimate_sums', e.key, e.value::text::numeric FROM jsonb_each(t.estimate_sums) AS e
  ) AS f (field, key, value)
), docs AS (
  SELECT d.g, jsonb_object_agg(d.field, d.doc) AS docs FROM (
    SELECT k.g, k.field, jsonb_object_agg(k.key, k.total) AS doc FROM (
      SELECT g, field, key, sum(value) AS total FROM entries GROUP BY g, field, key
    ) AS k GROUP BY k.g, k.field
  ) AS d GROUP BY d.g
), rolled AS (
INSERT INTO monitor_rollups AS r
SELECT t.pipeline, t.model, t.model_version, t.bucket_start, t.batches, t.items, t.rows, t.first_finished,
  t.last_finished, b.bin_counts, coalesce(d.docs -> 'kpi_sums', '{}'), coalesce(d.docs -> 'kpi_items', '{}'),
  d.docs -> 'label_counts', coalesce(d.docs -> 'latency_histogram', '{}'), d.docs -> 'estimate_sums'
FROM totals t LEFT JOIN bins b USING (model, model_version, bucket_start) LEFT JOIN docs d USING (g)
ORDER BY t.g
ON CONFLICT (pipeline, model, model_version, bucket_start) DO UPDATE SET
  batches = r.batches + excluded.batches,
  items = r.items + excluded.items,
  rows = r.rows + excluded.rows,
  first_finished = least(r.first_finished, excluded.first_finished),
  last_finished = greatest(r.last_finished, excluded.last_finished),
  bin_counts = monitor_counts_add(r.bin_counts, excluded.bin_counts),
  kpi_sums = monitor_jsonb_add(r.kpi_sums, excluded.kpi_sums),
  kpi_items = monitor_jsonb_add(r.kpi_items, excluded.kpi_items),
  label_counts = monitor_jsonb_add(r.label_counts, excluded.label_counts),
  latency_histogram = monitor_jsonb_add(r.latency_histogram, excluded.latency_histogram),
  estimate_sums = monitor_jsonb_add(r.estimate_sums, excluded.estimate_sums)
)
SELECT count(*) FROM marked

-- name: store_label_counts
-- A batch's label counts on its contributions, and the difference they make on the
-- rollups of those already folded (rows locked in (model, version) order, as the fold does).
WITH previous AS (
  SELECT c.id, c.pipeline, c.model, c.model_version, monitor_bucket(c.finished_at) AS bucket_start, c.label_counts,
    c.folded
  FROM monitor_contributions c WHERE c.batch_id = :batch_id
  ORDER BY c.model, c.model_version FOR UPDATE
), stored AS (
  UPDATE monitor_contributions c SET label_counts = CAST(:counts AS jsonb) FROM previous p WHERE c.id = p.id
)
UPDATE monitor_rollups r
SET label_counts = monitor_jsonb_combine(monitor_jsonb_add(r.label_counts, CAST(:counts AS jsonb)), p.label_counts, -1)
FROM previous p
WHERE p.folded AND r.pipeline = p.pipeline AND r.model = p.model AND r.model_version = p.model_version
  AND r.bucket_start = p.bucket_start

-- name: window_parts_by_time
-- Time windows (:sinces[i], :untils[i]], numbered `point` i from 1, of the pipelines in
-- :pipelines: per window, the hourly rollups whose contributions all lie inside it (every
-- hour but its first and last), the contributions of its other hours that lie inside it
-- (index range scans of two hours), and its contributions not folded into a rollup yet.
WITH windows AS (
  SELECT * FROM unnest(CAST(:sinces AS timestamptz[]), CAST(:untils AS timestamptz[])) WITH ORDINALITY
    AS w (since, until, point)
), usable AS (
  SELECT w.point, r.* FROM windows w JOIN monitor_rollups r
    ON r.pipeline = ANY(CAST(:pipelines AS text[]))
    AND r.bucket_start >= monitor_bucket(w.since) AND r.bucket_start <= w.until
    AND r.first_finished > w.since AND r.last_finished <= w.until
), edges AS (
  SELECT w.point, c.id FROM windows w JOIN monitor_contribution_parts c
    ON c.pipeline = ANY(CAST(:pipelines AS text[])) AND c.folded
    AND c.finished_at > w.since AND c.finished_at <= w.until
    AND (c.finished_at < monitor_bucket(w.since) + interval '1 hour' OR c.finished_at >= monitor_bucket(w.until))
  WHERE NOT EXISTS (
    SELECT FROM usable u WHERE u.point = w.point AND u.pipeline = c.pipeline AND u.model = c.model
      AND u.model_version = c.model_version AND u.bucket_start = c.bucket_start)
  UNION ALL
  SELECT w.point, c.id FROM windows w JOIN monitor_contributions c
    ON c.pipeline = ANY(CAST(:pipelines AS text[])) AND NOT c.folded
    AND c.finished_at > w.since AND c.finished_at <= w.until
), parts AS (
  SELECT point, pipeline, model, model_version, batches, items, rows, first_finished, last_finished,
    bin_counts AS bin_array, NULL::bytea AS bin_bytes, kpi_sums, kpi_items, label_counts, latency_histogram, estimate_sums
  FROM usable
  UNION ALL
  SELECT e.point, c.pipeline, c.model, c.model_version, c.batches, c.items, c.rows, c.finished_at, c.finished_at,
    NULL, c.bin_counts, c.kpi_sums, c.kpi_items, c.label_counts, c.latency_histogram, c.estimate_sums
  FROM edges e JOIN monitor_contribution_parts c USING (id)
)

-- name: window_parts_by_rows
-- Each model version's newest contributions up to :last_rows rows (finished by :until),
-- found newest first on the (pipeline, model, model_version, finished_at) index; one
-- window (`point` 1).
WITH versions AS (
  SELECT r.pipeline, r.model, r.model_version FROM monitor_rollups r
  WHERE r.pipeline = ANY(CAST(:pipelines AS text[])) AND r.bucket_start <= :until
  UNION
  SELECT c.pipeline, c.model, c.model_version FROM monitor_contributions c
  WHERE c.pipeline = ANY(CAST(:pipelines AS text[])) AND NOT c.folded AND c.finished_at <= :until
), newest AS (
  SELECT n.id FROM versions v CROSS JOIN LATERAL (
    SELECT w.id FROM (
      SELECT c.id, sum(c.rows) OVER (ORDER BY c.finished_at DESC, c.id DESC) - c.rows AS newer_rows FROM (
        SELECT c.id, c.rows, c.finished_at FROM monitor_contributions c
        WHERE c.pipeline = v.pipeline AND c.model = v.model AND c.model_version = v.model_version
          AND c.finished_at <= :until
        ORDER BY c.finished_at DESC, c.id DESC
        -- Each contribution has a row at least.
        LIMIT :last_rows
      ) AS c
    ) AS w WHERE w.newer_rows < :last_rows
  ) AS n
), parts AS (
  SELECT 1 AS point, c.pipeline, c.model, c.model_version, c.batches, c.items, c.rows,
    c.finished_at AS first_finished, c.finished_at AS last_finished, NULL::bigint[] AS bin_array,
    c.bin_counts AS bin_bytes, c.kpi_sums, c.kpi_items, c.label_counts, c.latency_histogram, c.estimate_sums
  FROM monitor_contribution_parts c JOIN newest USING (id)
)

-- name: window_pooled
-- The parts of each window pooled per window (`point`), pipeline, model and model version:
-- batches, inputs, rows, first and last finish, the rollups' bin counts summed and the
-- contributions' bin counts end to end (added by the caller), and each JSON sum key by key
-- (`sums`: field → key → total; exact numeric sums, so any split of the window into parts
-- gives the same).
SELECT g.*, s.sums FROM (
  SELECT point, pipeline, model, model_version, sum(batches) AS batches, sum(items) AS items, sum(rows) AS rows,
    min(first_finished) AS first_finished, max(last_finished) AS last_finished,
    monitor_counts_sum(bin_array) AS bin_array, string_agg(bin_bytes, ''::bytea) AS bin_bytes
  FROM parts GROUP BY point, pipeline, model, model_version
) AS g
LEFT JOIN (
  SELECT t.point, t.pipeline, t.model, t.model_version, jsonb_object_agg(t.field, t.totals) AS sums FROM (
    SELECT k.point, k.pipeline, k.model, k.model_version, k.field, jsonb_object_agg(k.key, k.total) AS totals FROM (
      SELECT p.point, p.pipeline, p.model, p.model_version, f.field, e.key, sum(e.value::text::numeric) AS total
      FROM parts p
      CROSS JOIN LATERAL (VALUES ('kpi_sums', p.kpi_sums), ('kpi_items', p.kpi_items),
        ('label_counts', p.label_counts), ('latency_histogram', p.latency_histogram),
        ('estimate_sums', p.estimate_sums)) AS f (field, doc)
      CROSS JOIN LATERAL jsonb_each(f.doc) AS e
      GROUP BY p.point, p.pipeline, p.model, p.model_version, f.field, e.key
    ) AS k GROUP BY k.point, k.pipeline, k.model, k.model_version, k.field
  ) AS t GROUP BY t.point, t.pipeline, t.model, t.model_version
) AS s ON s.point = g.point AND s.pipeline = g.pipeline AND s.model = g.model AND s.model_version = g.model_version
ORDER BY g.point, g.pipeline, g.model, g.model_version

-- name: claim_evaluation
-- The pipeline's windows are due to be judged (none in the last :interval_s seconds): claim it.
INSERT INTO monitor_evaluations AS e (pipeline) VALUES (:pipeline)
ON CONFLICT (pipeline) DO UPDATE SET evaluated_at = clock_timestamp()
WHERE e.evaluated_at <= clock_timestamp() - make_interval(secs => :interval_s)
RETURNING e.pipeline

-- name: store_evaluation
INSERT INTO monitor_evaluations (pipeline, figures) VALUES (:pipeline, :figures)
ON CONFLICT (pipeline) DO UPDATE SET evaluated_at = clock_timestamp(), figures = excluded.figures

-- name: open_alerts_holding
-- An alert opens for each condition that holds and has no open episode (one statement).
INSERT INTO alerts (kind, pipeline, model, model_version, "window", evidence)
SELECT h.kind, :pipeline, h.model, h.model_version, h."window", h.evidence
FROM unnest(CAST(:kinds AS text[]), CAST(:models AS text[]), CAST(:versions AS text[]),
            CAST(:windows AS text[]), CAST(:evidence AS jsonb[])) AS h (kind, model, model_version, "window", evidence)
ON CONFLICT (kind, pipeline, model, model_version, "window") WHERE cleared_at IS NULL DO NOTHING
RETURNING id

-- name: clear_alerts_not_holding
-- Clear the pipeline's open alerts on the judged windows whose condition no longer holds.
UPDATE alerts a SET cleared_at = clock_timestamp()
WHERE a.pipeline = :pipeline AND a.cleared_at IS NULL AND a."window" = ANY(CAST(:judged AS text[]))
  AND (a.kind, a.model, a.model_version, a."window") NOT IN (
    SELECT * FROM unnest(CAST(:kinds AS text[]), CAST(:models AS text[]), CAST(:versions AS text[]),
                         CAST(:windows AS text[])))
RETURNING id

-- name: open_alerts
-- The open alerts, of one pipeline or all, oldest first.
SELECT kind, pipeline, model, model_version, "window", opened_at, evidence FROM alerts
WHERE cleared_at IS NULL AND (CAST(:pipeline AS text) IS NULL OR pipeline = :pipeline)
ORDER BY opened_at, id

-- name: evaluation_figures
SELECT pipeline, evaluated_at, figures FROM monitor_evaluations ORDER BY pipeline
-- name: set_alias
-- Point a model's alias at a version, only if it still names :expected (NULL: it names none
-- yet), and record the change in model_events: one statement, so both or neither happen.
-- Returns the event's id; no row when the alias named another version (a concurrent change).
WITH moved AS (
  INSERT INTO model_aliases (model, alias, version, set_by, reason)
  VALUES (:model, :alias, :version, :actor, :reason)
  ON CONFLICT (model, alias) DO UPDATE
    SET version = excluded.version, set_at = clock_timestamp(), set_by = excluded.set_by, reason = excluded.reason
    WHERE model_aliases.version = CAST(:expected AS text)
  RETURNING model
)
INSERT INTO model_events (model, event, version, alias, previous_version, actor, reason)
SELECT model, :event, :version, :alias, CAST(:expected AS text), :actor, :reason FROM moved
RETURNING id

-- name: register_version
-- A new version and its `registered` event in one statement; no row when the model already
-- has this version (the same artifact registered again).
WITH added AS (
  INSERT INTO model_versions
    (model, version, source, manifest, metrics, size_bytes, artifact, artifact_path, created_by)
  VALUES (:model, :version, :source, CAST(:manifest AS jsonb), CAST(:metrics AS jsonb), :size_bytes,
          :artifact, :artifact_path, :created_by)
  ON CONFLICT (model, version) DO NOTHING
  RETURNING model, version, created_by, source
)
INSERT INTO model_events (model, event, version, actor, reason)
SELECT model, 'registered', version, created_by, source FROM added
RETURNING id

-- name: start_rollout
-- A roll-out and its `rollout_started` event in one statement; no row when the model has an
-- active roll-out already (the partial unique index `rollouts_one_active_per_model`).
WITH started AS (
  INSERT INTO rollouts (model, version, mode, percent, started_by)
  VALUES (:model, :version, :mode, CAST(:percent AS float8), :actor)
  ON CONFLICT (model) WHERE state = 'active' DO NOTHING
  RETURNING id, model, version, mode, percent, started_by
)
INSERT INTO model_events (model, event, version, actor, reason)
SELECT model, 'rollout_started', version, started_by,
       mode || CASE WHEN percent IS NULL THEN '' ELSE ' ' || percent || ' %' END || ' (roll-out ' || id || ')'
FROM started
RETURNING (SELECT id FROM started)

-- name: end_rollout
-- An active roll-out ends (promoted or aborted) with its event: one statement.
WITH ended AS (
  UPDATE rollouts SET state = :state, ended_at = clock_timestamp(), ended_by = :actor, reason = :reason
  WHERE id = :id AND state = 'active'
  RETURNING model, version
)
INSERT INTO model_events (model, event, version, actor, reason)
SELECT model, :event, version, :actor, :reason FROM ended
RETURNING id

-- name: record_gate
-- An active roll-out's latest gate, with when it was computed and the finished sub-tasks it
-- saw (what decides whether it is due again); a `rollout_verdict` event only when the overall
-- verdict changed (every CTE reads the row as it was before the UPDATE).
WITH previous AS (
  SELECT gate ->> 'verdict' AS verdict FROM rollouts WHERE id = :id AND state = 'active'
), stored AS (
  UPDATE rollouts
  SET gate = CAST(:gate AS jsonb)
             || jsonb_build_object('computed_at', clock_timestamp(), 'finished_subtasks', CAST(:finished AS bigint))
  WHERE id = :id AND state = 'active'
  RETURNING model, version
)
INSERT INTO model_events (model, event, version, actor, reason)
SELECT s.model, 'rollout_verdict', s.version, 'gate', :summary FROM stored s, previous p
WHERE p.verdict IS DISTINCT FROM CAST(:verdict AS text)
RETURNING id

-- name: record_gate_error
-- Why an active roll-out's gate could not be recomputed, next to its latest gate.
UPDATE rollouts SET gate = coalesce(gate, '{}'::jsonb) || jsonb_build_object('error', CAST(:error AS jsonb))
WHERE id = :id AND state = 'active'

-- name: add_rollout_batch
INSERT INTO rollout_batches (rollout_id, batch_id)
SELECT r, :batch_id FROM unnest(CAST(:rollout_ids AS bigint[])) AS r
ON CONFLICT DO NOTHING

-- name: rollout_evidence
-- The first finished sub-tasks of a model in a roll-out's batches: batches in the order they
-- joined it, each read through the (batch_id, model, seq) index. With :labels, each succeeded
-- serve sub-task also brings its rows' input items, the current labels of the inputs in its
-- item range (one index range scan of `labels_current`), and `lead`: how many rows of its
-- first input the sub-tasks before it hold. An input's rows run on in the preceding serve
-- sub-tasks of its version (chunks of one version are numbered in item order within a split
-- step, and never span steps; a canary's two versions alternate), and a sub-task it
-- continues from holds nothing else, so the walk back goes on while the sub-task it reached
-- started with that input.
SELECT e.batch_id, e.seq, e.role, e.model_version, e.state, e.rows, e.output, e.predict_cpu_s, e.champion_cpu_s,
       CASE WHEN e.labelled THEN e.items END AS items, lead.rows AS lead,
       l.items AS labelled_items, l.labels
FROM (
  SELECT s.batch_id, s.seq, s.role, s.model_version, s.state, s.rows, s.output, s.predict_cpu_s, s.champion_cpu_s,
         s.items,
         rb.added_at, CAST(:labels AS boolean) AND s.role = 'serve' AND s.state = 'succeeded' AS labelled
  FROM rollout_batches rb
  CROSS JOIN LATERAL (
    SELECT * FROM subtasks s
    WHERE s.batch_id = rb.batch_id AND s.model = :model AND s.state IN ('succeeded', 'failed')
    ORDER BY s.seq
  ) AS s
  WHERE rb.rollout_id = :rollout_id
  ORDER BY rb.added_at, rb.batch_id, s.seq
  LIMIT :limit
) AS e
LEFT JOIN LATERAL (
  WITH RECURSIVE back (seq, rows, first) AS (
    SELECT e.seq, 0, e.items[1] WHERE e.labelled
    UNION ALL
    SELECT p.seq, cardinality(array_positions(p.items, e.items[1])), p.items[1]
    FROM back b CROSS JOIN LATERAL (
      SELECT q.seq, q.items FROM subtasks q
      WHERE q.batch_id = e.batch_id AND q.model = :model AND q.seq < b.seq AND q.role = 'serve'
        AND q.model_version IS NOT DISTINCT FROM e.model_version
      ORDER BY q.seq DESC LIMIT 1
    ) AS p
    WHERE b.first = e.items[1] AND p.items[cardinality(p.items)] = e.items[1]
  )
  SELECT sum(back.rows) AS rows FROM back
) AS lead ON true
LEFT JOIN LATERAL (
  SELECT array_agg(l.item ORDER BY l.item) AS items, jsonb_agg(l.label ORDER BY l.item) AS labels
  FROM labels l
  WHERE e.labelled AND l.batch_id = e.batch_id AND l.replaced_at IS NULL
    AND l.item BETWEEN e.items[1] AND e.items[cardinality(e.items)]
) AS l ON true
ORDER BY e.added_at, e.batch_id, e.seq

-- name: rollout_counts
-- Per version and role, a model's finished, failed and guardrail-failed sub-tasks in a
-- roll-out's batches (a worker records a guardrail failure as `GuardrailViolation: ...`).
SELECT s.model_version, s.role,
       count(*) AS finished,
       count(*) FILTER (WHERE s.state = 'failed') AS failed,
       count(*) FILTER (WHERE s.state = 'failed' AND s.error LIKE 'GuardrailViolation:%') AS guardrail_violations
FROM rollout_batches rb JOIN subtasks s ON s.batch_id = rb.batch_id
WHERE rb.rollout_id = :rollout_id AND s.model = :model AND s.state IN ('succeeded', 'failed')
GROUP BY s.model_version, s.role
