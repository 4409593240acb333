"""Environment variables scoped to a block (what Ray Train's controller copies from its caller)."""

from __future__ import annotations

import os

import pytest

from pipeline.environment import scoped_environment


def test_variables_are_set_and_unset_for_the_block_and_restored_after(monkeypatch):
    monkeypatch.setenv("VITPIPE_TEST_KEPT", "before")
    monkeypatch.delenv("VITPIPE_TEST_NEW", raising=False)
    with pytest.raises(RuntimeError):  # restored however the block ends
        with scoped_environment({"VITPIPE_TEST_KEPT": None, "VITPIPE_TEST_NEW": "10"}):
            assert "VITPIPE_TEST_KEPT" not in os.environ and os.environ["VITPIPE_TEST_NEW"] == "10"
            raise RuntimeError
    assert os.environ["VITPIPE_TEST_KEPT"] == "before" and "VITPIPE_TEST_NEW" not in os.environ
