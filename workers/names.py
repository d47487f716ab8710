"""Task names shared by the API (which sends tasks by name, never importing them) and the worker."""

PROJECT_ANCHORS = "clues.project_anchors"
SCORE_JOB = "clues.score_job"
NEAR_DUPLICATES = "clues.near_duplicates"
TRAIN_INIT = "clues.train_init"
TRAIN_AGGREGATE = "clues.train_aggregate"
TRAIN_EVALUATE = "clues.train_evaluate"
TRAIN_WITHDRAW = "clues.train_withdraw"

ALL = (PROJECT_ANCHORS, SCORE_JOB, NEAR_DUPLICATES, TRAIN_INIT, TRAIN_AGGREGATE, TRAIN_EVALUATE, TRAIN_WITHDRAW)
