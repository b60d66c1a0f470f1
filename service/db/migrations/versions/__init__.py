"""One module per schema revision, oldest first. Every schema change is a new revision here,
and tests/service/test_migrations.py upgrades a database full of rows across it."""
