-- Named queries of the Postgres adapters (worker/pg/). Each starts with a "-- name: <name>"
-- line followed by a one-line "--" description (tests check both).
-- {schema} is replaced by the quoted SEQUIN_DB_SCHEMA; %(x)s are bound parameters.

-- name: create_stage
-- Per-connection staging table: COPY lands here, one INSERT ... SELECT applies it.
-- ON COMMIT DELETE ROWS empties it at every commit, so a batch never sees another's rows.
-- Always named pg_temp.sequin_stage: through search_path, a user's table of that name
-- could be found instead.
CREATE TEMP TABLE IF NOT EXISTS pg_temp.sequin_stage (
    collection_id       text        NOT NULL,
    upstream_id         text        NOT NULL,
    sync_id             text,
    upstream_updated_at timestamptz NOT NULL,
    created_at          timestamptz,
    deleted             boolean     NOT NULL,
    data                jsonb
) ON COMMIT DELETE ROWS

-- name: copy_stage
-- Binary COPY of one batch into the staging table (column types: STAGE_TYPES in worker/pg/rows.py).
COPY pg_temp.sequin_stage (collection_id, upstream_id, sync_id, upstream_updated_at, created_at, deleted, data)
FROM STDIN (FORMAT BINARY)

-- name: upsert_rows
-- The guard: a row changes only when the incoming version is as new or newer. Equal
-- timestamps let the later batch win, which is stream order. In hard mode deletes are not
-- inserted here (apply_hard_deletes removes them instead).
WITH changed AS (
    INSERT INTO {schema}.records AS r
        (collection_id, upstream_id, sync_id, data, deleted, upstream_updated_at, created_at, synced_at)
    SELECT collection_id, upstream_id, sync_id::uuid, data, deleted, upstream_updated_at,
           created_at, now()
    FROM pg_temp.sequin_stage
    WHERE %(include_deletes)s OR NOT deleted
    ON CONFLICT (collection_id, upstream_id) DO UPDATE SET
        sync_id = EXCLUDED.sync_id,
        data = EXCLUDED.data,
        deleted = EXCLUDED.deleted,
        upstream_updated_at = EXCLUDED.upstream_updated_at,
        created_at = EXCLUDED.created_at,
        synced_at = EXCLUDED.synced_at
    WHERE r.upstream_updated_at <= EXCLUDED.upstream_updated_at
    RETURNING r.collection_id, r.deleted
)
SELECT collection_id, deleted, count(*) FROM changed GROUP BY collection_id, deleted

-- name: apply_hard_deletes
-- Hard delete mode: removes the rows the batch deletes, under the same version guard as upsert_rows.
WITH gone AS (
    DELETE FROM {schema}.records AS r
    USING pg_temp.sequin_stage AS s
    WHERE s.deleted
      AND r.collection_id = s.collection_id
      AND r.upstream_id = s.upstream_id
      AND r.upstream_updated_at <= s.upstream_updated_at
    RETURNING r.collection_id
)
SELECT collection_id, true, count(*) FROM gone GROUP BY collection_id

-- name: advance_cursor
-- First statement of every batch: it takes the consumer row's lock and only succeeds if the
-- cursor is still the one this process started from (a fencing check). A second writer of
-- the same consumer therefore waits here, then updates nothing and rolls back.
UPDATE {schema}.cursors SET
    cursor = %(cursor)s,
    updated_at = now(),
    records_applied = records_applied + %(records)s,
    pages_applied = pages_applied + %(pages)s,
    dead_letters = dead_letters + %(dead_letters)s,
    last_upstream_updated_at = GREATEST(last_upstream_updated_at, %(newest)s)
WHERE consumer = %(consumer)s AND cursor IS NOT DISTINCT FROM %(expected)s

-- name: adjust_counts
-- After a batch applied row by row: rows Postgres refused became dead letters.
UPDATE {schema}.cursors SET
    records_applied = records_applied - %(refused)s,
    dead_letters = dead_letters + %(refused)s
WHERE consumer = %(consumer)s

-- name: clear_stage
-- Empties the staging table inside a transaction (before the row-by-row fallback re-stages).
DELETE FROM pg_temp.sequin_stage

-- name: insert_dead_letter
-- One dead letter: a record kept verbatim, with why it was refused and the cursor it came after.
INSERT INTO {schema}.dead_letters (consumer, after_cursor, collection_id, upstream_id, reason, raw)
VALUES (%(consumer)s, %(after_cursor)s, %(collection_id)s, %(upstream_id)s, %(reason)s, %(raw)s)

-- name: ensure_consumer
-- Creates the consumer's cursor row with its filters the first time it runs.
INSERT INTO {schema}.cursors (consumer, sync_id, provider, collection, delete_mode)
VALUES (%(consumer)s, %(sync_id)s, %(provider)s, %(collection)s, %(delete_mode)s)
ON CONFLICT (consumer) DO NOTHING

-- name: get_consumer
-- The consumer's stored cursor, filters and delete mode.
SELECT consumer, cursor, sync_id, provider, collection, delete_mode
FROM {schema}.cursors WHERE consumer = %(consumer)s

-- name: set_delete_mode
-- Records a changed SEQUIN_DELETE_MODE on the consumer's row.
UPDATE {schema}.cursors SET delete_mode = %(delete_mode)s WHERE consumer = %(consumer)s

-- name: reset_consumer
-- `sequin-worker reset`: forgets the consumer's cursor (its rows stay).
DELETE FROM {schema}.cursors WHERE consumer = %(consumer)s

-- name: notify
-- Delivered to LISTENers only when the transaction commits (and not at all on rollback).
SELECT pg_notify(%(channel)s, %(payload)s)

-- name: status_consumers
-- `sequin-worker status`: every consumer with its progress and dead-letter count.
SELECT c.consumer, c.sync_id, c.provider, c.collection, c.delete_mode, c.cursor,
       c.records_applied, c.pages_applied, c.last_upstream_updated_at, c.updated_at,
       c.created_at,
       (SELECT count(*) FROM {schema}.dead_letters d WHERE d.consumer = c.consumer) AS dead_letters
FROM {schema}.cursors c
ORDER BY c.consumer

-- name: status_collections
-- `sequin-worker status`: live and deleted rows and the newest version per collection.
SELECT collection_id,
       count(*) FILTER (WHERE NOT deleted) AS live,
       count(*) FILTER (WHERE deleted) AS deleted,
       max(upstream_updated_at) AS newest
FROM {schema}.records
GROUP BY collection_id
ORDER BY collection_id

-- name: lock_holder
-- The session holding a bigint advisory lock shows classid = high 32 bits, objid = low 32
-- bits and objsubid = 1 in pg_locks.
SELECT l.pid, a.application_name, a.client_addr::text, a.backend_start
FROM pg_locks l
LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid::bigint = %(hi)s AND l.objid::bigint = %(lo)s

-- name: view_key_types
-- Top-level keys of a collection's live rows and the JSON types seen, over its most recent
-- rows (a sample, so that a refresh stays cheap on large tables).
WITH sample AS (
    SELECT data FROM {schema}.records
    WHERE collection_id = %(collection)s AND NOT deleted AND jsonb_typeof(data) = 'object'
    ORDER BY upstream_updated_at DESC
    LIMIT %(sample)s
)
SELECT e.key,
       jsonb_typeof(e.value) AS type,
       bool_and(jsonb_typeof(e.value) <> 'string'
                OR {schema}.is_iso_timestamp(e.value #>> '{{}}')) AS timestamps
FROM sample, jsonb_each(sample.data) AS e(key, value)
GROUP BY e.key, jsonb_typeof(e.value)
ORDER BY e.key

-- name: collections_all
-- Every collection in the records table for `sequin-worker views`: a skip scan of the primary
-- key (one index probe per collection) instead of reading every row.
WITH RECURSIVE c(collection_id) AS (
    (SELECT collection_id FROM {schema}.records ORDER BY collection_id LIMIT 1)
    UNION ALL
    SELECT (SELECT r.collection_id FROM {schema}.records AS r
            WHERE r.collection_id > c.collection_id
            ORDER BY r.collection_id LIMIT 1)
    FROM c WHERE c.collection_id IS NOT NULL
)
SELECT collection_id FROM c WHERE collection_id IS NOT NULL

-- name: view_of_collection
-- The registered view of a collection and the columns it was given.
SELECT view_name, column_map FROM {schema}.views WHERE collection_id = %(collection)s

-- name: view_is_ours
-- Whether the worker made the view of this name.
SELECT 1 FROM {schema}.views WHERE view_name = %(view)s

-- name: views_known
-- Collections that have a view (the keeper's list of what to refresh).
SELECT collection_id FROM {schema}.views

-- name: view_columns
-- The columns a view has now (name, type) in order; none when the view does not exist.
SELECT a.attname, format_type(a.atttypid, a.atttypmod)
FROM pg_attribute AS a
JOIN pg_class AS c ON c.oid = a.attrelid
JOIN pg_namespace AS s ON s.oid = c.relnamespace
WHERE s.nspname = %(schema)s AND c.relname = %(view)s AND c.relkind = 'v'
  AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum

-- name: view_register
-- Record (or update) a view the worker made, with its columns.
INSERT INTO {schema}.views (view_name, collection_id, columns, column_map)
VALUES (%(view)s, %(collection)s, %(columns)s, %(column_map)s)
ON CONFLICT (view_name) DO UPDATE
SET columns = EXCLUDED.columns, column_map = EXCLUDED.column_map, refreshed_at = now()

-- name: relation_exists
-- Whether any relation of this name exists in the schema.
SELECT 1 FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace
WHERE s.nspname = %(schema)s AND c.relname = %(name)s

-- name: session_settings
-- Our session bounds as ceilings: each setting takes our value unless a stricter one (set on
-- the role or database) is already in force.
SELECT set_config(s.name,
                  CASE WHEN p.setting::bigint > 0 AND p.setting::bigint < s.value::bigint
                       THEN p.setting ELSE s.value END,
                  false)
FROM unnest(%(names)s::text[], %(values)s::text[]) AS s(name, value)
LEFT JOIN pg_settings p ON p.name = s.name

-- name: ping
-- A trivial round trip: the database answers (readiness, the leader's lock-connection ping).
SELECT 1

-- name: server_version
-- `sequin-worker check`: the server's version, shown with the database check.
SHOW server_version

-- name: table_exists
-- Whether a table exists; %(table)s is its quoted qualified name ("schema".table).
SELECT to_regclass(%(table)s) IS NOT NULL

-- name: set_lock_timeout
-- Session lock_timeout for what follows (migrations: the wait for their lock, then each DDL).
SELECT set_config('lock_timeout', %(timeout)s, false)

-- name: set_local_lock_timeout
-- lock_timeout for the rest of the current transaction only (a view refresh).
SELECT set_config('lock_timeout', %(timeout)s, true)

-- name: set_idle_session_timeout
-- The lock connection's idle_session_timeout: the server ends a dead leader's session (and
-- its lock) by itself (Postgres 14+).
SELECT set_config('idle_session_timeout', %(timeout)s, false)

-- name: advisory_lock
-- Waits (up to lock_timeout) for a session advisory lock: migrations take turns under it.
SELECT pg_advisory_lock(%(key)s)

-- name: try_advisory_lock
-- Takes a session advisory lock if free, without waiting: the consumer's leadership.
SELECT pg_try_advisory_lock(%(key)s)

-- name: advisory_unlock
-- Releases a session advisory lock taken by advisory_lock or try_advisory_lock.
SELECT pg_advisory_unlock(%(key)s)

-- name: advisory_xact_lock
-- A transaction advisory lock, released at commit: concurrent view refreshes take turns.
SELECT pg_advisory_xact_lock(%(key)s)

-- name: bootstrap_migrations
-- The schema and the table of applied migrations, before the first migration runs.
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)

-- name: migrations_applied
-- Versions of the migrations already applied to the schema.
SELECT version FROM {schema}.schema_migrations

-- name: migration_record
-- Marks a migration applied, in the same transaction as the migration itself.
INSERT INTO {schema}.schema_migrations (version, name) VALUES (%(version)s, %(name)s)

-- name: drop_view
-- Drops a view of ours before it is recreated with other columns ({view}: sql.Identifier).
DROP VIEW IF EXISTS {schema}.{view}

-- name: drop_schema
-- `sequin-worker demo`: starts from an empty demo schema (never the configured one).
DROP SCHEMA IF EXISTS {schema} CASCADE

-- name: demo_summary
-- `sequin-worker demo`: live, deleted and dead-lettered rows per collection.
SELECT c.collection_id,
       count(*) FILTER (WHERE r.collection_id IS NOT NULL AND NOT r.deleted),
       count(*) FILTER (WHERE r.deleted),
       (SELECT count(*) FROM {schema}.dead_letters d WHERE d.collection_id = c.collection_id)
FROM (SELECT DISTINCT collection_id FROM {schema}.records
      UNION SELECT DISTINCT collection_id FROM {schema}.dead_letters
      WHERE collection_id IS NOT NULL) c
LEFT JOIN {schema}.records r ON r.collection_id = c.collection_id
GROUP BY c.collection_id ORDER BY c.collection_id
