-- The ledger's raw SQL, one named query per block (`-- name: <name>`), loaded by
-- `pipeline.ledger.queries`. Statements composed from the mappings live in the modules
-- as SQLAlchemy Core; what is here is SQL that reads best as SQL (views, LATERAL, COPY).

-- name: batch_status
-- One batch's row of the `batch_status` view, with its result and metrics.
SELECT s.*, b.result, b.metrics FROM batch_status s JOIN batches b USING (id) WHERE s.id = :id

-- name: batch_statuses
-- The newest rows of the `batch_status` view, optionally of one state.
SELECT s.*, b.result, b.metrics FROM batch_status s JOIN batches b USING (id)
WHERE CAST(:state AS text) IS NULL OR s.state = :state
ORDER BY s.created_at DESC LIMIT :limit

-- name: new_subtask_ids
-- The sub-tasks a split step just copied: per model, those from its first new seq.
SELECT s.id, s.model, s.priority FROM subtasks s
JOIN unnest(CAST(:models AS text[]), CAST(:first_seqs AS int[])) AS f (model, first_seq)
  ON s.model = f.model AND s.seq >= f.first_seq
WHERE s.batch_id = :batch_id ORDER BY s.seq, s.model

-- name: subtask_outputs
-- Per model (after a seq of its own), the sub-tasks of a batch that start before an input:
-- one query for every model, each read in seq order through the (batch_id, model, seq) index.
SELECT c.model, c.seq, c.items, c.output, c.error, c.state
FROM unnest(CAST(:models AS text[]), CAST(:after_seqs AS int[])) AS m (model, after_seq)
CROSS JOIN LATERAL (
  SELECT s.model, s.seq, s.items, s.output, s.error, s.state FROM subtasks s
  WHERE s.batch_id = :batch_id AND s.model = m.model AND s.seq > m.after_seq AND s.items[1] < :before_item
  ORDER BY s.seq LIMIT :limit
) AS c
ORDER BY c.model, c.seq

-- name: rejected_messages
-- The dead letters by queue and reason (the counter pipeline_rejected_messages_total).
SELECT queue, reason, count(*) AS messages FROM dead_letters GROUP BY 1, 2

-- name: copy_input_pages
COPY input_pages (batch_id, first_item, items, features, data) FROM STDIN

-- name: copy_subtasks
COPY subtasks (batch_id, model, seq, max_attempts, priority, rows, items, payload, state, model_version) FROM STDIN

-- name: copy_result_page
COPY result_pages (batch_id, first_item, items, outputs, errors) FROM STDIN

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
