"""Keyword-only data access functions, one module per aggregate: `silos`, `jobs` (checkpoints, members, anchor set),
`shards`, `results` (scores and duplicate pairs), `training` (members, rounds, updates, held-out set) and
`sessions` (revoked dashboard sessions). This package re-exports them, so callers write ``repo.get_job(...)``.

Every function takes the `Session` first and flushes, but never commits: the caller owns the transaction and commits
(or rolls back) once per request or task. Uploads are idempotent: storing the same blob key again is a no-op that
returns ``False``; another key for a slot already filled raises `ConflictError`.
"""

from __future__ import annotations

from storage.repository._common import _insert_once
from storage.repository.jobs import (
    create_job,
    delete_job,
    get_anchor_set,
    get_job,
    get_member,
    list_jobs,
    mark_complete,
    set_anchor_set,
    set_checkpoint_blob,
    update_job,
)
from storage.repository.results import (
    list_duplicates,
    replace_duplicates,
    replace_scores,
)
from storage.repository.sessions import (
    revoke_session,
    session_revoked,
)
from storage.repository.shards import (
    add_shard,
    get_shard,
    list_shards,
    part_sample_ids,
    parts_of_samples,
)
from storage.repository.silos import (
    create_silo,
    find_silo,
    get_silo_by_name,
    list_silos,
    silo_by_token,
)
from storage.repository.training import (
    add_update,
    add_withdrawal,
    blob_in_use,
    claim_round,
    close_round,
    create_train_job,
    finish_withdrawal,
    get_round,
    get_train_job,
    get_train_member,
    get_update,
    get_withdrawal,
    list_rounds,
    list_train_jobs,
    list_updates,
    list_withdrawals,
    lock_open_round,
    open_round,
    remove_member,
    replace_update,
    set_eval_set,
    set_round_metrics,
    update_train_job,
)

__all__ = [
    "_insert_once",
    "add_shard",
    "add_update",
    "add_withdrawal",
    "blob_in_use",
    "claim_round",
    "close_round",
    "create_job",
    "create_silo",
    "create_train_job",
    "delete_job",
    "find_silo",
    "finish_withdrawal",
    "get_anchor_set",
    "get_job",
    "get_member",
    "get_round",
    "get_shard",
    "get_silo_by_name",
    "get_train_job",
    "get_train_member",
    "get_update",
    "get_withdrawal",
    "list_duplicates",
    "list_jobs",
    "list_rounds",
    "list_shards",
    "list_silos",
    "list_train_jobs",
    "list_updates",
    "list_withdrawals",
    "lock_open_round",
    "mark_complete",
    "open_round",
    "part_sample_ids",
    "parts_of_samples",
    "remove_member",
    "replace_duplicates",
    "replace_scores",
    "replace_update",
    "revoke_session",
    "session_revoked",
    "set_anchor_set",
    "set_checkpoint_blob",
    "set_eval_set",
    "set_round_metrics",
    "silo_by_token",
    "update_job",
    "update_train_job",
]
