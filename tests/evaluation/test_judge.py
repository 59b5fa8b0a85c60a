"""caa.evaluation.judge against a real local OpenAI-compatible server (FastAPI + uvicorn in a subprocess,
tests/evaluation/openai_server.py): ratings in order, unparseable replies, retries with backoff,
the key, refusals and unreachable servers."""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator

import pytest

from caa.evaluation.judge import Judge, JudgeError, _content, fill, parse_rating, public_url, rubric
from tests.evaluation.openai_server import Server, expected_rating, gone, running_server

ANSWERS = ["", "yes", "a longer answer here", "it rains", "ok then, fine", "the end of it all", "x" * 37]


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with running_server() as started:
        yield started
    assert gone(started.process.pid)


def _texts(answers: list[str], prompt: str = "say something") -> list[str]:
    return [fill(rubric("mood"), prompt, a) for a in answers]


@pytest.mark.parametrize(
    ("reply", "rating"),
    [
        ("7", 7),
        ("10", 10),
        (" 1\n", 1),
        ("Rating: 8.", 8),
        ("7/10", 7),
        ("<think>maybe 2 or 3</think>9", 9),
        ("0", None),
        ("11", None),
        ("7.5", None),
        ("-3", None),
        ("seven", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_rating_is_the_first_number_if_whole_1_to_10(reply: str | None, rating: int | None) -> None:
    assert parse_rating(reply) == rating


def test_rubric_names_the_behavior_its_description_and_the_answer_format() -> None:
    text = rubric("sentiment", "Positive versus negative emotional tone.")
    assert "Behavior: sentiment\nWhat it is: Positive versus negative emotional tone." in text
    assert text.rstrip().endswith("Answer with one integer from 1 to 10 and nothing else.")
    assert "What it is" not in rubric("mood")
    filled = fill(text, "Tell me {about} it.", "I {answer} {prompt} gladly.")
    assert "<<<\nTell me {about} it.\n>>>" in filled
    assert "<<<\nI {answer} {prompt} gladly.\n>>>" in filled  # braces in the texts stay as they are
    # a prompt naming the answer's placeholder: the answer still goes where the rubric wants it
    crossed = fill(text, "Say {answer} here.", "Fine.")
    assert "<<<\nSay {answer} here.\n>>>" in crossed and "<<<\nFine.\n>>>" in crossed


def test_public_url_drops_credentials() -> None:
    assert public_url("https://user:secret@api.example.com:8443/v1") == "https://api.example.com:8443/v1"
    assert public_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"


def test_a_reply_that_is_not_a_chat_completion_has_no_content() -> None:
    assert _content(b'{"choices": [{"message": {"content": "4"}}]}') == "4"
    assert _content(b"<html>not json</html>") is None
    assert _content(b'{"choices": []}') is None
    assert _content(b'{"choices": [{"message": {"content": null, "tool_calls": []}}]}') is None


def test_ratings_come_back_in_the_texts_order_with_the_key_as_bearer(server: Server) -> None:
    server.script(key="test-key-123")
    ticks: list[int] = []
    judge = Judge(server.url, "judge-model", key="test-key-123", workers=4)
    ratings = judge.rate(_texts(ANSWERS), progress=ticks.append)
    assert ratings == [expected_rating(a) for a in ANSWERS]
    assert sum(ticks) == len(ANSWERS)
    log = server.log()
    assert len(log) == len(ANSWERS)  # no retries
    assert {entry["authorization"] for entry in log} == {"Bearer test-key-123"}
    bodies = [entry["body"] for entry in log]
    assert all(b["model"] == "judge-model" and b["temperature"] == 0 for b in bodies)
    assert sorted(b["messages"][0]["content"] for b in bodies) == sorted(_texts(ANSWERS))


def test_unparseable_replies_are_none_in_their_rows(server: Server) -> None:
    server.script(unparseable=["p1", "p3"])
    texts = [fill(rubric("mood"), f"p{i}", a) for i, a in enumerate(ANSWERS[:5])]
    ratings = Judge(server.url, "m", workers=3).rate(texts)
    assert ratings == [expected_rating(a) if i not in (1, 3) else None for i, a in enumerate(ANSWERS[:5])]
    assert server.log()[0]["authorization"] is None  # no key: no header


def test_503s_are_retried_with_exponential_backoff(server: Server) -> None:
    server.script(fail_first=3)
    backoff = 0.1
    ratings = Judge(server.url, "m", workers=1, retries=3, backoff=backoff).rate(_texts(ANSWERS[:2]))
    assert ratings == [expected_rating(a) for a in ANSWERS[:2]]
    times = [entry["time"] for entry in server.log()]
    assert len(times) == 2 + 3  # three failures, each retried
    gaps = [b - a for a, b in itertools.pairwise(times[:4])]  # the one text's four tries
    for k, gap in enumerate(gaps):  # 0.1 s, 0.2 s, 0.4 s
        assert gap >= backoff * 2**k * 0.9, gaps


def test_429_is_retried(server: Server) -> None:
    server.script(fail_first=1, fail_status=429)
    assert Judge(server.url, "m", workers=1, backoff=0.01).rate(_texts(["abc"])) == [expected_rating("abc")]
    assert len(server.log()) == 2


def test_a_timed_out_request_is_retried(server: Server) -> None:
    server.script(delay_first=1, delay=3.0)
    judge = Judge(server.url, "m", workers=1, timeout=0.5, backoff=0.01)
    assert judge.rate(_texts(["abcd"])) == [expected_rating("abcd")]
    assert len(server.log()) == 2


def test_retries_are_bounded_and_end_in_one_clear_error(server: Server) -> None:
    server.script(fail_first=100)
    judge = Judge(server.url, "m", workers=1, retries=2, backoff=0.01)
    message = r"/v1/chat/completions: no answer after 3 attempts \(last: HTTP 503"
    with pytest.raises(JudgeError, match=message):
        judge.rate(_texts(["abc"]))
    assert len(server.log()) == 3


def test_a_wrong_key_is_one_error_without_retries(server: Server) -> None:
    server.script(key="right")
    judge = Judge(server.url, "m", key="wrong", workers=1, backoff=0.01)
    message = r"chat/completions: HTTP 401 Unauthorized \(check the API key\): Incorrect API key provided"
    with pytest.raises(JudgeError, match=message):
        judge.rate(_texts(ANSWERS[:3]))
    assert len(server.log()) == 1  # not retried, and the texts after it not sent


def test_a_wrong_path_is_one_error_naming_url_and_status(server: Server) -> None:
    server.script()
    judge = Judge(server.url.removesuffix("/v1"), "m", workers=1, backoff=0.01)
    message = r"judge http://127\.0\.0\.1:\d+/chat/completions: HTTP 404 Not Found"
    with pytest.raises(JudgeError, match=message):
        judge.rate(_texts(["abc"]))
    assert server.log() == []  # the route does not exist: nothing logged, and no retry either


def test_a_refused_connection_is_retried_then_one_error() -> None:
    with socket.socket() as sock:  # a port nobody listens on once this closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    judge = Judge(f"http://127.0.0.1:{port}/v1", "m", retries=2, backoff=0.01)
    with pytest.raises(JudgeError, match=r"no answer after 3 attempts \(last: connection refused\)"):
        judge.rate(_texts(["abc"]))


def test_the_server_is_stopped_by_its_pid() -> None:
    with running_server() as started:
        assert started.process.poll() is None
        pid = started.process.pid
    assert started.process.returncode is not None
    assert gone(pid)
