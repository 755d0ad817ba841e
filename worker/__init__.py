"""sequin-worker: keeps a Postgres table exactly in step with Sequin's records stream."""

__version__ = "0.1.0"
