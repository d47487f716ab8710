"""clues silo agent: CLI, HTTP client and the silo's local loop and dashboard (issue #3)."""
