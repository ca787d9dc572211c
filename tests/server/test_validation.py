"""The door every reply passes: kind, address and what it reports, checked against its request."""

import numpy as np
import pytest

from fedloom.errors import InvalidReplyError, InvalidUpdateError
from fedloom.messages import (
    ErrorReply,
    EvaluateReply,
    EvaluateRequest,
    Evaluation,
    TrainConfig,
    TrainReply,
    TrainRequest,
    Update,
)
from fedloom.server.validation import check_reply

SENT = [np.zeros((2, 3), np.float32), np.zeros(3, np.float32)]
TRAIN = TrainRequest(4, 7, SENT, TrainConfig(round=7))
EVALUATE = EvaluateRequest(4, 7, SENT)


def update(weight=10.0, metrics=None, values=None):
    return TrainReply(4, 7, update=Update(values or [np.ones((2, 3), np.float32), np.ones(3, np.float32)], weight,
                                          metrics=metrics if metrics is not None else {"loss": 1.0}))


def test_good_replies_and_error_replies_pass():
    check_reply(TRAIN, update())
    check_reply(TRAIN, TrainReply(4, 7, error=ErrorReply("client_failed", "out of memory")))
    check_reply(EVALUATE, EvaluateReply(4, 7, Evaluation(0.3, 0.9, 120)))
    check_reply(EVALUATE, EvaluateReply(4, 7, Evaluation(0.0, 0.0, 0)))  # a client without test data


@pytest.mark.parametrize("request_, reply, words", [
    (TRAIN, EvaluateReply(4, 7, Evaluation(0.1, 0.9, 10)), "answered by a TrainReply, got an EvaluateReply"),
    (EVALUATE, update(), "answered by an EvaluateReply, got a TrainReply"),
    (TRAIN, TRAIN, "got a TrainRequest"),
    (TRAIN, TrainReply(5, 7, update=update().update), "addressed to client 5, round 7"),
    (TRAIN, TrainReply(4, 6, update=update().update), "addressed to client 4, round 6"),
    (TRAIN, TrainReply(4, 7), "neither an update nor an error"),
    (EVALUATE, EvaluateReply(4, 7), "neither an evaluation nor an error"),
])
def test_replies_that_do_not_answer_their_task(request_, reply, words):
    with pytest.raises(InvalidReplyError) as e:
        check_reply(request_, reply)
    assert words in str(e.value) and e.value.code == "invalid_reply"


@pytest.mark.parametrize("reply, words", [
    (update(values=[np.ones((3, 2), np.float32), np.ones(3, np.float32)]), "expected <f4[2, 3]"),
    (update(values=[np.ones((2, 3), np.float64), np.ones(3, np.float32)]), "<f8[2, 3]"),
    (update(values=[np.ones((2, 3), np.float32)]), "expected 2 arrays"),
    (update(values=[np.full((2, 3), np.nan, np.float32), np.ones(3, np.float32)]), "NaN or Inf"),
    (update(values=[np.ones((2, 3), np.float32), np.full(3, np.inf, np.float32)]), "NaN or Inf"),
    (update(weight=0.0), "weight must be a positive number"),
    (update(weight=-5.0), "weight must be a positive number"),
    (update(weight=float("inf")), "weight must be a positive number"),
    (update(metrics={"loss": float("nan")}), "'loss' are not finite"),
    (update(metrics={"loss": float("-inf")}), "not finite"),
    (update(metrics={"loss_sq": -1.0}), "'loss_sq' must be >= 0"),
    (update(metrics={"examples": -3}), "'examples' must be a number >= 0"),
    (update(metrics={f"m{i}": 0.0 for i in range(65)}), "65 metrics reported"),
])
def test_unusable_updates(reply, words):
    with pytest.raises(InvalidUpdateError) as e:
        check_reply(TRAIN, reply)
    assert words in str(e.value) and e.value.code == "invalid_update"


@pytest.mark.parametrize("evaluation, words", [
    (Evaluation(0.1, 1.0001, 10), "accuracy must be between 0 and 1"),
    (Evaluation(0.1, -0.1, 10), "accuracy must be between 0 and 1"),
    (Evaluation(float("inf"), 0.5, 10), "loss must be finite"),
    (Evaluation(0.1, 0.5, -1), "must be a number >= 0"),
    (Evaluation(0.1, 0.5, 2.5), "whole number"),
])
def test_impossible_evaluations(evaluation, words):
    with pytest.raises(InvalidUpdateError) as e:
        check_reply(EVALUATE, EvaluateReply(4, 7, evaluation))
    assert words in str(e.value)


def test_claimed_example_counts_are_bounded_when_a_limit_is_set():
    claim = EvaluateReply(4, 7, Evaluation(0.0, 1.0, 10**15))
    check_reply(EVALUATE, claim)  # no limit: a simulation trusts its own clients
    with pytest.raises(InvalidUpdateError, match="claims 1e\\+15 examples, over the limit of 1e\\+06"):
        check_reply(EVALUATE, claim, max_examples=10**6)
    with pytest.raises(InvalidUpdateError, match="weight claims 1e\\+12 examples"):
        check_reply(TRAIN, update(weight=1e12), max_examples=10**6)
    with pytest.raises(InvalidUpdateError, match="'examples' claims"):
        check_reply(TRAIN, update(metrics={"examples": 1e7}), max_examples=10**6)
