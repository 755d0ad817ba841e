-- Views stay stable and never read a word as a time (issue 9).
--
-- A view column typed timestamptz reads only real ISO 8601 timestamps with a date, a time and
-- an offset ('2024-05-01T10:00:00Z', '2024-05-01 10:00:00.5+02:00'). Postgres' own input
-- also accepts special words ('now', 'today', 'tomorrow', 'yesterday', 'epoch', 'infinity',
-- 'allballs', ...) and local times whose meaning depends on the reader's TimeZone: in a view
-- those would read as the current time or a moving target, silently wrong. Anything that is
-- not such a timestamp, or is one that does not exist ('2024-02-30T00:00:00Z'), reads as NULL;
-- the verbatim string is always in records.data. The type inference of a refresh uses the same
-- test (the view_key_types query), so there is one definition of "a timestamp".
CREATE FUNCTION {schema}.is_iso_timestamp(value text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT value ~ '^\d{{4}}-\d{{2}}-\d{{2}}[T ]\d{{2}}:\d{{2}}(:\d{{2}}(\.\d+)?)?(Z|[+-]\d{{2}}(:?\d{{2}})?)$'
$fn$;

-- Replaces 002's version in place, so that views made before this migration read correctly
-- at once, without waiting for a refresh.
CREATE OR REPLACE FUNCTION {schema}.try_timestamptz(value text) RETURNS timestamptz
LANGUAGE plpgsql STABLE PARALLEL SAFE AS $fn$
BEGIN
    IF value IS NULL OR NOT {schema}.is_iso_timestamp(value) THEN
        RETURN NULL;
    END IF;
    RETURN value::timestamptz;
EXCEPTION WHEN others THEN
    RETURN NULL;
END
$fn$;

-- The columns of each view as [[name, key, type], ...] in view order. A refresh keeps every
-- key's column name and position and appends new keys at the end, so that analysts' queries
-- keep working and the view can be changed with CREATE OR REPLACE VIEW (no DROP). NULL for a
-- view made before this migration: its next refresh plans it afresh and records it.
ALTER TABLE {schema}.views ADD COLUMN column_map jsonb;
