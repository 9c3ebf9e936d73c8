"""The database (TimescaleDB through asyncpg) and the blob store (S3)."""
