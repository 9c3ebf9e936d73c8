"""steplog ingest service."""
