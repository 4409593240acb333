"""Checkpoint commit protocol: only complete checkpoints count; damaged ones are rejected."""

import pytest

from pipeline.errors import VitpipeError
from pipeline.storage import LocalStorage, S3Storage
from stages.train.checkpoint import COMPLETE, CheckpointStore


def _write_step(store: CheckpointStore, step: int, commit: bool = True) -> None:
    d = store.local_dir(step)
    d.mkdir(parents=True, exist_ok=True)
    for rank in range(2):
        (d / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(bytes([rank, step]) * 100)
    (d / "loader-rank0.json").write_text('{"epoch": 0}')
    if commit:
        store.commit(step)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return CheckpointStore(LocalStorage(tmp_path / "stage"), tmp_path / "staging")
    endpoint, bucket = request.getfixturevalue("s3_endpoint"), request.getfixturevalue("s3_bucket")
    return CheckpointStore(S3Storage(f"s3://{bucket}/stage", endpoint_url=endpoint), tmp_path / "staging")


def test_only_committed_checkpoints_count(store):
    assert store.latest() is None
    _write_step(store, 2)
    _write_step(store, 4)
    _write_step(store, 6, commit=False)  # killed mid-write: no COMPLETE marker
    assert store.steps() == [2, 4] and store.latest() == 4
    fetched = store.fetch(4)
    assert (fetched / "zero_pp_rank_1_optim_states.pt").read_bytes() == bytes([1, 4]) * 100


def test_missing_or_corrupt_rank_file_is_rejected(store, tmp_path):
    _write_step(store, 2)
    store.storage.write_bytes("checkpoints/step-00000002/zero_pp_rank_1_optim_states.pt", b"\x00" * 200)
    with pytest.raises(VitpipeError, match="zero_pp_rank_1_optim_states.pt: file is corrupt"):
        store.latest()
    store.storage.delete("checkpoints/step-00000002/zero_pp_rank_1_optim_states.pt")
    with pytest.raises(VitpipeError, match="zero_pp_rank_1_optim_states.pt: file is missing; delete"):
        store.latest()


def test_prune_keeps_the_newest(store):
    for step in (1, 2, 3, 4):
        _write_step(store, step)
    store.prune(keep=2)
    assert store.steps() == [3, 4]
    assert store.storage.exists(f"checkpoints/step-00000004/{COMPLETE}")
    assert not store.storage.list("checkpoints/step-00000001")


def test_each_rank_publishes_its_own_files_from_separate_staging(s3_endpoint, s3_bucket, tmp_path):
    # Multi-node on S3: every rank writes to its own local staging directory.
    storage = S3Storage(f"s3://{s3_bucket}/stage", endpoint_url=s3_endpoint)
    ranks = [CheckpointStore(storage, tmp_path / f"rank{r}") for r in range(2)]
    for r, store in enumerate(ranks):
        d = store.local_dir(5)
        d.mkdir(parents=True)
        if r == 0:
            (d / "mp_rank_00_model_states.pt").write_bytes(b"model")
        (d / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(bytes([r]) * 10)
        (d / f"loader-rank{r}.json").write_text("{}")
    listings = [store.publish(5, r) for r, store in enumerate(ranks)]
    assert set(listings[1]) == {"zero_pp_rank_1_mp_rank_00_optim_states.pt", "loader-rank1.json"}
    ranks[0].commit(5, {k: v for listing in listings for k, v in listing.items()})
    fresh = CheckpointStore(storage, tmp_path / "elsewhere")
    assert fresh.latest() == 5
    fetched = fresh.fetch(5)
    assert sorted(p.name for p in fetched.iterdir()) == [
        "COMPLETE.json", "loader-rank0.json", "loader-rank1.json", "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_a_resume_on_another_number_of_workers_is_refused_before_any_worker_starts(tmp_path):
    from stages.train.launch import check_resume_world_size

    store = CheckpointStore(LocalStorage(tmp_path / "stage"), tmp_path / "staging")
    check_resume_world_size(store, workers=1, stage="pretrain")  # nothing to resume: fine
    _write_step(store, 2)
    store.commit(2, world_size=2)
    check_resume_world_size(store, workers=2, stage="pretrain")
    with pytest.raises(VitpipeError) as refused:
        check_resume_world_size(store, workers=1, stage="pretrain")
    assert str(refused.value) == (
        "pretrain: its newest checkpoint (step 2) was written by 2 workers and this run asks for 1; resuming on "
        "another number of workers is not supported yet: set pretrain.workers=2, or re-run the stage from scratch "
        "with --from pretrain")
