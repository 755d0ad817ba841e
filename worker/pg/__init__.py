"""The Postgres adapters: the only code in the worker that talks to Postgres."""
