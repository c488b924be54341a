"""schemathesis against the live server's own OpenAPI schema (/openapi.json): generated requests, valid and
invalid, to every operation. None may get a 5xx, every error is OpenAI's envelope, and no traceback is sent
or logged."""

import json
import logging

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation.modes import GenerationMode
from serve_support import live_server, tiny_checkpoint

OPERATIONS = ["GET /health", "GET /v1/models", "GET /v1/models/{model_id}", "POST /v1/chat/completions",
              "POST /v1/completions"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = live_server(tiny_checkpoint(tmp_path_factory.mktemp("serve-schema"), train_steps=0), max_batch=4)
    yield srv
    srv.stop()


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def server_log():
    """Everything our logger and uvicorn's log while the generated requests run."""
    handler = Records()
    loggers = [logging.getLogger(n) for n in ("tinygpt.serve", "uvicorn", "uvicorn.error", "uvicorn.access")]
    for lg in loggers:
        lg.addHandler(handler)
    yield handler
    for lg in loggers:
        lg.removeHandler(handler)


@pytest.fixture(scope="module")
def operations(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    return {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in schema.get_all_operations())}


def test_the_schema_lists_every_operation(operations):
    assert sorted(operations) == sorted(OPERATIONS)


WITH_INPUT = [op for op in OPERATIONS if op.startswith("POST")]  # a body can be invalid; a string path cannot
CASES = [(op, GenerationMode.POSITIVE) for op in OPERATIONS] + [(op, GenerationMode.NEGATIVE) for op in WITH_INPUT]


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{op} {mode.value}" for op, mode in CASES])
def test_no_request_gets_a_server_error(operations, server, server_log, label, mode):
    seen = []

    @given(case=operations[label].as_strategy(generation_mode=mode))
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        response = case.call(timeout=20)
        seen.append(response.status_code)
        assert response.status_code < 500, f"{case.method} {case.formatted_path} -> {response.status_code}: " \
                                           f"{response.text[:500]}"
        assert "Traceback" not in response.text
        if response.status_code >= 400 and case.path != "/health":
            error = json.loads(response.text)["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]

    check()
    assert seen  # requests were really sent
    tracebacks = [r.getMessage() for r in server_log.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not tracebacks, tracebacks[:3]
    if mode == GenerationMode.POSITIVE and label.startswith("POST"):
        assert seen.count(200) >= 5, seen  # valid requests really decode (not all refused)
