-- Helpers for the per-collection views (sequin-worker views). A view column typed
-- timestamptz must not make the whole view fail to read because one row holds a string that
-- looks like a timestamp but is not a valid one: such a value reads as NULL instead.
CREATE FUNCTION {schema}.try_timestamptz(value text) RETURNS timestamptz
LANGUAGE plpgsql STABLE PARALLEL SAFE AS $fn$
BEGIN
    RETURN value::timestamptz;
EXCEPTION WHEN others THEN
    RETURN NULL;
END
$fn$;

-- Which views the worker made, so that a refresh replaces only its own.
CREATE TABLE {schema}.views (
    view_name     text        PRIMARY KEY,
    collection_id text        NOT NULL UNIQUE,
    columns       integer     NOT NULL,
    refreshed_at  timestamptz NOT NULL DEFAULT now()
);
