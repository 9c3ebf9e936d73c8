"""The web UI: a read-only HTTP API and a static page (`steplog-ingest ui`)."""
