"""Client state on disk: versions by round, read for a round as its first attempt saw them, pruned and rewound."""

import numpy as np

from fedloom.client.state import StateFiles, keep_state, with_state
from fedloom.messages import ErrorReply, EvaluateRequest, TrainConfig, TrainReply, TrainRequest


def state(value: float) -> dict[str, np.ndarray]:
    return {"residual": np.full(4, value, np.float32)}


def test_a_round_reads_the_newest_state_made_before_it_even_when_asked_again(tmp_path):
    files = StateFiles(tmp_path / "s")
    assert files.load(3, 1) == {} and not (tmp_path / "s").exists()  # nothing written, no folder
    files.save(3, 1, state(1.0))
    files.save(3, 2, state(2.0))
    assert files.load(3, 2)["residual"][0] == 1.0  # round 2 asked again: what its first attempt saw
    assert files.load(3, 3)["residual"][0] == 2.0
    assert files.load(3)["residual"][0] == 2.0
    files.save(3, 2, state(5.0))  # a second attempt at round 2 replaces the first
    assert files.load(3, 3)["residual"][0] == 5.0 and files.versions[3] == [1, 2]


def test_the_state_survives_a_restart_and_a_write_cut_short_is_ignored(tmp_path):
    StateFiles(tmp_path).save(7, 4, state(4.0))
    (tmp_path / "7-5.npz.tmp").write_bytes(b"half a file")
    again = StateFiles(tmp_path)
    assert again.clients == [7] and again.load(7, 10)["residual"][0] == 4.0
    assert not (tmp_path / "7-5.npz.tmp").exists()


def test_prune_keeps_what_a_later_round_can_need_and_rewind_forgets_what_came_after(tmp_path):
    files = StateFiles(tmp_path)
    for r in (1, 3, 5, 8):
        files.save(0, r, state(r))
    files.prune(5)  # a checkpoint after round 5: rounds 6.. read version 5 or newer
    assert files.versions[0] == [5, 8] and sorted(p.name for p in tmp_path.iterdir()) == ["0-5.npz", "0-8.npz"]
    files.rewind(5)  # resumed from that checkpoint: round 8's version never happened
    assert files.versions[0] == [5] and files.load(0, 6)["residual"][0] == 5.0
    assert StateFiles(tmp_path).versions == {0: [5]}


def test_requests_carry_their_clients_state_and_only_a_successful_reply_saves_its_own(tmp_path):
    files = StateFiles(tmp_path)
    files.save(2, 1, state(1.0))
    req = with_state(TrainRequest(2, 2, [], TrainConfig(round=2)), files)
    assert req.state["residual"][0] == 1.0
    assert with_state(EvaluateRequest(2, 2, []), files).state["residual"][0] == 1.0
    out = keep_state(req, TrainReply(2, 2, error=ErrorReply("client_failed", "x"), state=state(9.0)), files)
    assert out.state is None and files.versions[2] == [1]
    keep_state(req, TrainReply(2, 2, update=None, state=state(2.0)), files)
    assert files.versions[2] == [1, 2] and files.load(2, 3)["residual"][0] == 2.0
