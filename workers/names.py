"""Task names shared by the API (which sends tasks by name, never importing them) and the worker."""

PROJECT_ANCHORS = "clues.project_anchors"
SCORE_JOB = "clues.score_job"
NEAR_DUPLICATES = "clues.near_duplicates"
