"""The LLM judge against a local OpenAI-compatible server with canned replies: scores parsed from many
layouts, the cache saves a second request (also across instances), retries with backoff, clear errors."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tinygpt.eval.judge import JudgeError, JudgeParseError, StoryJudge, parse_scores

GOOD = "Grammar: 8/10\nCreativity: 6/10\nConsistency: 9/10\nPlot: 7/10"


class CannedServer:
    """Answers POST /v1/chat/completions with the next (status, reply text) of ``script`` (the last repeats)."""

    def __init__(self, script):
        self.script, self.requests = list(script), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                status, text = outer.script[min(len(outer.requests), len(outer.script)) - 1]
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}
                                     if status == 200 else {"error": {"message": text}}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server_factory():
    servers = []

    def make(script):
        servers.append(CannedServer(script))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


@pytest.mark.parametrize("reply", [
    GOOD,
    "**Grammar** - 8. **Creativity** - 6. **Consistency** - 9. **Plot** - 7.",
    '{"grammar": 8, "creativity": 6, "consistency": 9, "plot": 7}',
    "The grammar is good, I give it 8 out of 10.\ncreativity: 6\nConsistency 9/10\nplot: 7.0",
])
def test_parse_scores_layouts(reply):
    assert parse_scores(reply) == {"grammar": 8, "creativity": 6, "consistency": 9, "plot": 7}


def test_parse_scores_errors_name_the_problem():
    with pytest.raises(JudgeParseError, match="no score for 'plot'"):
        parse_scores("Grammar: 8\nCreativity: 6\nConsistency: 9")
    with pytest.raises(JudgeParseError, match="grammar score 11 is outside"):
        parse_scores("Grammar: 11\nCreativity: 6\nConsistency: 9\nPlot: 2")


def test_grades_through_the_endpoint_and_caches(server_factory, tmp_path, monkeypatch):
    server = server_factory([(200, GOOD)])
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
    cache = tmp_path / "cache.jsonl"
    judge = StoryJudge(server.url, "judge-model", key_env="MY_JUDGE_KEY", cache=cache)
    assert judge.grade("Once upon a time, Tom had a ball.") == {"grammar": 8, "creativity": 6, "consistency": 9,
                                                                "plot": 7}
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
    assert request["body"]["model"] == "judge-model" and "Tom had a ball" in request["body"]["messages"][-1]["content"]
    judge.grade("Once upon a time, Tom had a ball.")
    assert len(server.requests) == 1 and judge.requests == 1  # the cache answered
    # a new judge (a new run) reads the cache file: still no second request
    again = StoryJudge(server.url, "judge-model", key_env="MY_JUDGE_KEY", cache=cache)
    again.grade("Once upon a time, Tom had a ball.")
    assert len(server.requests) == 1
    # another judge model is another key
    StoryJudge(server.url, "other-model", cache=cache).grade("Once upon a time, Tom had a ball.")
    assert len(server.requests) == 2


def test_retries_server_errors_with_backoff(server_factory):
    server = server_factory([(500, "overloaded"), (429, "slow down"), (200, GOOD)])
    waits = []
    judge = StoryJudge(server.url, "m", max_retries=3, backoff=0.5, sleep=waits.append)
    assert judge.grade("A story.")["plot"] == 7
    assert len(server.requests) == 3 and waits == [0.5, 1.0]


def test_gives_up_after_retries_and_fails_fast_on_client_errors(server_factory, monkeypatch):
    server = server_factory([(503, "down")])
    with pytest.raises(JudgeError, match="no answer after 3 attempts.*503"):
        StoryJudge(server.url, "m", max_retries=2, backoff=0, sleep=lambda s: None).grade("A story.")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server = server_factory([(401, "bad key")])
    with pytest.raises(JudgeError, match=r"HTTP 401 \(set \$OPENAI_API_KEY\)"):
        StoryJudge(server.url, "m", sleep=lambda s: None).grade("A story.")
    assert len(server.requests) == 1  # not retried
    with pytest.raises(JudgeError, match="no answer"):  # nothing listens there
        StoryJudge("http://127.0.0.1:9/v1", "m", max_retries=0, timeout=2).grade("A story.")
    with pytest.raises(ValueError, match="http"):
        StoryJudge("api.openai.com", "m")


def test_grade_stories_counts_unreadable_replies(server_factory):
    server = server_factory([(200, GOOD), (200, "I cannot grade this."),
                             (200, "Grammar: 6 Creativity: 4 Consistency: 7 Plot: 5")])
    result = StoryJudge(server.url, "m").grade_stories(["one", "two", "three"])
    assert result["n"] == 3 and result["unparsed"] == 1 and result["scores"][1] is None
    assert result["means"] == {"grammar": 7.0, "creativity": 5.0, "consistency": 8.0, "plot": 6.0}
    assert "cannot read" in result["failures"][0]
