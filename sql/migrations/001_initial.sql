-- The worker's tables. {schema} is replaced by the quoted SEQUIN_DB_SCHEMA at run time.
-- These names and columns are a public contract: users query them. Change them only by
-- adding a new numbered migration, never by editing this one.

-- The latest version of every key in the stream.
CREATE TABLE {schema}.records (
    collection_id       text        NOT NULL,
    upstream_id         text        NOT NULL,
    sync_id             uuid,
    provider            text        NOT NULL GENERATED ALWAYS AS (split_part(collection_id, ':', 1)) STORED,
    data                jsonb,
    deleted             boolean     NOT NULL DEFAULT false,
    upstream_updated_at timestamptz NOT NULL,
    created_at          timestamptz,
    synced_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (collection_id, upstream_id)
);

-- "Everything changed since T" and "newest rows per collection".
CREATE INDEX records_collection_updated_idx
    ON {schema}.records (collection_id, upstream_updated_at);
CREATE INDEX records_upstream_updated_idx ON {schema}.records (upstream_updated_at);
CREATE INDEX records_sync_id_idx ON {schema}.records (sync_id);
CREATE INDEX records_provider_idx ON {schema}.records (provider);

-- One stream position per consumer. The cursor moves in the same transaction as the rows.
CREATE TABLE {schema}.cursors (
    consumer                  text        PRIMARY KEY,
    cursor                    text,
    sync_id                   text,
    provider                  text,
    collection                text,
    delete_mode               text        NOT NULL,
    records_applied           bigint      NOT NULL DEFAULT 0,
    pages_applied             bigint      NOT NULL DEFAULT 0,
    dead_letters              bigint      NOT NULL DEFAULT 0,
    last_upstream_updated_at  timestamptz,
    created_at                timestamptz NOT NULL DEFAULT now(),
    updated_at                timestamptz NOT NULL DEFAULT now()
);

-- Records that could not be stored as received, kept verbatim for inspection and replay.
CREATE TABLE {schema}.dead_letters (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer      text        NOT NULL,
    after_cursor  text,
    collection_id text,
    upstream_id   text,
    reason        text        NOT NULL,
    raw           text        NOT NULL,
    received_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX dead_letters_consumer_idx ON {schema}.dead_letters (consumer, received_at);
