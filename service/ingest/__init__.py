"""Dataset ingestion: stream an upload to disk, unpack it safely, check it with the engine."""
