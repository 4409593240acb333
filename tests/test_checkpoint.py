"""Checkpoint commit protocol: only complete checkpoints count; damaged ones are rejected."""

import logging

import pytest

from pipeline.storage import LocalStorage, S3Storage
from stages.train.checkpoint import COMPLETE, CheckpointDamaged, CheckpointStore


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
    assert store.steps() == []
    _write_step(store, 2)
    _write_step(store, 4)
    _write_step(store, 6, commit=False)  # killed mid-write: no COMPLETE marker
    assert store.steps() == [2, 4]
    fetched = store.fetch(4, rank=1, record=store.record(4))
    assert (fetched / "zero_pp_rank_1_optim_states.pt").read_bytes() == bytes([1, 4]) * 100


def test_missing_resized_or_corrupt_files_are_named(store, tmp_path):
    _write_step(store, 2)
    record = store.record(2)
    store.storage.write_bytes("checkpoints/step-00000002/zero_pp_rank_1_optim_states.pt", b"\x00" * 200)
    store.check_listing(2, record)  # same size: only the rank that reads the file can tell
    store.fetch(2, rank=0, record=record)  # rank 0 never reads rank 1's file
    with pytest.raises(CheckpointDamaged, match="zero_pp_rank_1_optim_states.pt: file is corrupt"):
        store.fetch(2, rank=1, record=record)
    store.storage.write_bytes("checkpoints/step-00000002/zero_pp_rank_1_optim_states.pt", b"\x00" * 10)
    with pytest.raises(CheckpointDamaged, match="zero_pp_rank_1_optim_states.pt: 10 bytes, 200 recorded"):
        store.check_listing(2, record)
    store.storage.delete("checkpoints/step-00000002/zero_pp_rank_1_optim_states.pt")
    with pytest.raises(CheckpointDamaged, match="zero_pp_rank_1_optim_states.pt: file is missing"):
        store.check_listing(2, record)


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
    # Resume on another node: rank 1 reads the record and its own files and the rank-less ones, nothing else.
    reads = _CountingS3(f"s3://{s3_bucket}/stage", endpoint_url=s3_endpoint)
    fresh = CheckpointStore(reads, tmp_path / "elsewhere")
    assert fresh.steps() == [5]
    fetched = fresh.fetch(5, rank=1, record=fresh.record(5))
    assert sorted(p.name for p in fetched.iterdir()) == [
        "loader-rank1.json", "mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert sorted(reads.gets) == ["checkpoints/step-00000005/COMPLETE.json", "checkpoints/step-00000005/loader-rank1.json",
                                  "checkpoints/step-00000005/mp_rank_00_model_states.pt",
                                  "checkpoints/step-00000005/zero_pp_rank_1_mp_rank_00_optim_states.pt"]


class _CountingS3(S3Storage):
    """Records every object this storage reads (GETs): a resume must read no other rank's files."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gets: list[str] = []

    def open_read(self, rel: str):
        self.gets.append(rel)
        return super().open_read(rel)

    def download_file(self, rel: str, local_path) -> None:
        self.gets.append(rel)
        super().download_file(rel, local_path)


def test_a_resume_on_another_number_of_workers_is_announced_before_any_worker_starts(tmp_path, caplog):
    from stages.train.launch import announce_reshard

    store = CheckpointStore(LocalStorage(tmp_path / "stage"), tmp_path / "staging")
    with caplog.at_level(logging.INFO, logger="stages.train.launch"):
        announce_reshard(store, workers=1, stage="finetune")  # nothing to resume
        _write_step(store, 2)
        store.commit(2, world_size=2)
        announce_reshard(store, workers=2, stage="finetune")  # the same size: a plain resume
        assert caplog.messages == []
        announce_reshard(store, workers=1, stage="finetune")
    assert caplog.messages == ["finetune: resuming step 2 (written by 2 workers) on 1: its state is resharded as it "
                               "loads"]


def test_sample_ledgers_are_inherited_whole_across_a_resize_and_old_flat_ledgers_still_load():
    from stages.train.checkpointer import TrainState, inherited_ranks, merged_ledger

    # 4 ranks -> 3: each old rank's ledger lives on in exactly one new rank.
    assert [list(inherited_ranks(r, 4, 3)) for r in range(3)] == [[0, 3], [1], [2]]
    assert [list(inherited_ranks(r, 1, 2)) for r in range(2)] == [[0], []]  # growing: new ranks start empty
    old0, old3 = [(1, ["a"]), (2, ["c"])], [(1, ["b"]), (2, ["d"])]
    assert merged_ledger([old0, old3]) == [(1, ["a"]), (1, ["b"]), (2, ["c"]), (2, ["d"])]
    state = TrainState()
    state.load_state_dict({"history": [], "ledger": ["k1", "k2"]})  # a checkpoint of an older vitpipe
    assert state.ledger == [(0, ["k1", "k2"])]


def test_one_rank_per_node_fetches_what_the_nodes_ranks_load_between_them():
    from stages.train.reshard import node_fetch_plan

    # ZeRO 1-2: slices of the parameters; ZeRO-3 (None): all of them.
    assert node_fetch_plan([("a", {"w1", "w2"}), ("a", {"w2", "w3"}), ("b", {"w4"}), ("b", set())]) == {
        0: {"w1", "w2", "w3"}, 2: {"w4"}}
    assert node_fetch_plan([("a", None), ("b", None), ("a", None)]) == {0: None, 1: None}
    assert node_fetch_plan([("a", {"w1"}), ("a", None)]) == {0: None}
    assert node_fetch_plan([("a", None), ("a", {"w1"})]) == {0: None}


def test_sgd_state_is_shown_to_deepspeeds_converter_under_adams_names_and_renamed_back_after_the_load():
    import torch

    from stages.train.reshard import momentum_as_adam_state, momentum_from_adam_state

    buffer, moment = torch.ones(3), torch.zeros(3)
    # The nesting of a ZeRO-1/2 optimizer file (ZeRO-3's differs: any depth is searched).
    loaded = {"optimizer_state_dict": {"base_optimizer_state": {"state": {0: {"momentum_buffer": buffer}}},
                                       "fp32_groups": [torch.zeros(3)]}, "adam": [{"exp_avg": moment, "step": 7}]}
    momentum_as_adam_state(loaded)
    sgd = loaded["optimizer_state_dict"]["base_optimizer_state"]["state"][0]
    assert sgd["exp_avg"] is buffer and sgd["exp_avg_sq"] is buffer and sgd["step"].item() == 0
    assert loaded["adam"] == [{"exp_avg": moment, "step": 7}]  # Adam state passes unchanged

    param = torch.nn.Parameter(torch.zeros(3))
    sgd_optimizer, adam_optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9), torch.optim.AdamW([param])
    sgd_optimizer.state[param] = {"exp_avg": buffer, "exp_avg_sq": buffer, "step": torch.zeros(())}  # as loaded
    momentum_from_adam_state(sgd_optimizer)
    assert sgd_optimizer.state[param] == {"momentum_buffer": buffer}
    adam_optimizer.state[param] = {"exp_avg": moment, "exp_avg_sq": moment, "step": torch.zeros(())}
    momentum_from_adam_state(adam_optimizer)
    assert set(adam_optimizer.state[param]) == {"exp_avg", "exp_avg_sq", "step"}
