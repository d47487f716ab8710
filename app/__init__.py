"""clues coordinator API (FastAPI): routes, auth, validation and dashboard pages (issue #3)."""
