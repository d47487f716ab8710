"""LocalBlobStore: content addressing, checksums, streaming writes that leave nothing behind, concurrency."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from storage.blobs import BlobRef, BlobStore, LocalBlobStore
from storage.errors import BlobTooLarge, IntegrityError, NotFoundError


def _files(store: LocalBlobStore) -> list[str]:
    return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file())


def test_round_trip_and_layout(blobs: LocalBlobStore):
    data = b"hello clues"
    ref = blobs.put_bytes(data)
    key = hashlib.sha256(data).hexdigest()
    assert ref == BlobRef(key, len(data))
    assert blobs.path(key) == blobs.root / key[:2] / key[2:4] / key
    assert blobs.exists(key) and blobs.read_bytes(key) == data
    with blobs.open(key) as f:
        assert f.read() == data
    blobs.verify(key)
    assert _files(blobs) == [f"{key[:2]}/{key[2:4]}/{key}"]  # tmp/ is empty
    assert isinstance(blobs, BlobStore)  # structurally


def test_put_existing_key_writes_nothing(blobs: LocalBlobStore):
    ref = blobs.put_bytes(b"x" * 100)
    mtime = blobs.path(ref.key).stat().st_mtime_ns
    time.sleep(0.01)
    assert blobs.put_bytes(b"x" * 100) == ref
    assert blobs.path(ref.key).stat().st_mtime_ns == mtime


def test_corrupted_blob_is_detected(blobs: LocalBlobStore):
    ref = blobs.put_bytes(b"original bytes")
    os.chmod(blobs.path(ref.key), 0o644)
    blobs.path(ref.key).write_bytes(b"tampered bytes")
    with pytest.raises(IntegrityError, match=f"blob {ref.key} is corrupt"):
        blobs.read_bytes(ref.key)
    with pytest.raises(IntegrityError, match="corrupt"):
        blobs.verify(ref.key)
    assert blobs.read_bytes(ref.key, verify=False) == b"tampered bytes"


def test_missing_and_malformed_keys(blobs: LocalBlobStore):
    missing = "0" * 64
    for call in (blobs.path, blobs.open, blobs.read_bytes, blobs.verify):
        with pytest.raises(NotFoundError, match="does not exist"):
            call(missing)
    with pytest.raises(NotFoundError, match="not a sha256 key"):
        blobs.path("../../etc/passwd")
    assert not blobs.exists(missing) and not blobs.exists("nope")
    assert not blobs.delete(missing)


def test_delete(blobs: LocalBlobStore):
    ref = blobs.put_bytes(b"bye")
    assert blobs.delete(ref.key) and not blobs.exists(ref.key)


def test_writer_streams_and_checks_the_declared_sha(blobs: LocalBlobStore):
    chunks = [b"a" * 1000, b"b" * 10, b""]
    digest = hashlib.sha256(b"".join(chunks)).hexdigest()
    with blobs.writer(expected_sha256=digest.upper(), max_bytes=1010) as w:
        for chunk in chunks:
            w.write(chunk)
        assert w.size == 1010 and w.sha256 == digest
        ref = w.commit()
    assert ref == BlobRef(digest, 1010) and blobs.read_bytes(digest) == b"".join(chunks)


def test_writer_sha_mismatch_stores_nothing(blobs: LocalBlobStore):
    with pytest.raises(IntegrityError, match="sha256 mismatch"), blobs.writer(expected_sha256="f" * 64) as w:
        w.write(b"some bytes")
        w.commit()
    assert _files(blobs) == []
    with pytest.raises(IntegrityError, match="not a sha256 hex digest"):
        blobs.writer(expected_sha256="xyz")


def test_writer_abort_leaves_nothing(blobs: LocalBlobStore):
    with blobs.writer() as w:
        w.write(b"half a body")  # the client went away: no commit
    assert _files(blobs) == []
    with pytest.raises(ConnectionError), blobs.writer() as w:
        w.write(b"half")
        raise ConnectionError("client disconnected")
    assert _files(blobs) == []


def test_writer_max_bytes(blobs: LocalBlobStore):
    with pytest.raises(BlobTooLarge, match="limit of 8 bytes"), blobs.writer(max_bytes=8) as w:
        w.write(b"12345")
        w.write(b"6789")
    assert _files(blobs) == []


def test_concurrent_puts_of_one_key(blobs: LocalBlobStore):
    data = np.random.default_rng(0).bytes(1 << 20)
    refs: list[BlobRef] = []
    barrier = threading.Barrier(8)

    def put() -> None:
        barrier.wait()
        refs.append(blobs.put_bytes(data))

    threads = [threading.Thread(target=put) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(refs) == 8 and len(set(refs)) == 1
    assert blobs.read_bytes(refs[0].key) == data
    assert len(_files(blobs)) == 1


def test_sweep_tmp(blobs: LocalBlobStore):
    stale, fresh = blobs.tmp_dir / "blob-stale", blobs.tmp_dir / "blob-fresh"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    assert blobs.sweep_tmp(older_than_s=3600) == 1
    assert not stale.exists() and fresh.exists()


def test_a_killed_writers_temp_file_goes_at_the_next_start_and_a_live_ones_stays(blobs: LocalBlobStore):
    """A coordinator killed mid-upload leaves its half body behind: the next start removes it at once (not an hour
    later), while the temp file of a writer still running is kept."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = blobs.tmp_dir / f"blob-{socket.gethostname()}-{int(gone.stdout)}-abc123"
    dead.write_bytes(b"half a body")
    live = blobs.writer()
    live.write(b"still arriving")
    other_host = blobs.tmp_dir / "blob-some-other-host-1-xyz"
    other_host.write_bytes(b"not ours to judge")
    assert blobs.sweep_tmp() == 1
    assert not dead.exists() and live.path.exists() and other_host.exists()
    assert blobs.sweep_own() == 1 and not any(p.name.startswith(f"blob-{socket.gethostname()}-{os.getpid()}-")
                                              for p in blobs.tmp_dir.iterdir())  # fmt: skip
    live.abort()
