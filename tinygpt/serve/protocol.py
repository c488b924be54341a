"""OpenAI's wire protocol as this server speaks it: the request schemas (and so ``/openapi.json``) with the
limits it enforces, the error envelope, presence/frequency penalties, and the text of a choice as its tokens
arrive (split UTF-8 characters and stop strings held back until decided).

Knows nothing about HTTP routing, the engine or the model.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from tinygpt.tokenizer import Tokenizer

MAX_STOP = 4                 # OpenAI's limit on stop strings
SEED_RANGE = 2 ** 63         # seeds are signed 64-bit integers, as in OpenAI's schema
RETRY_AFTER_S = 1            # what a 429 tells the client to wait
MIN_TEMPERATURE = 1e-4       # below it sampling is greedy (logits / 1e-300 would overflow to inf)
MIN_TOP_P = 1e-6             # smaller top_p means the same (the top token alone), but 5e-324 is 0 in float32 and
                             # generate.top_p_filter would then drop every token


# --- errors ---

class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": what} for status, what in [
        (400, "bad request: invalid JSON, parameters, roles, or prompt + max_tokens past the context"),
        (401, "missing or wrong API key"), (404, "unknown model"), (413, "request body too large"),
        (429, "the wait queue is full: retry after Retry-After seconds"), (503, "the model is still loading")]}


# --- request schemas (OpenAI's, with the limits this server enforces) ---

class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="developer is read as system; tool and function turns are not supported")
    content: str | list[TextPart] = Field(description="the text, or a list of text parts (joined)")
    name: str | None = Field(None, description="accepted and ignored")


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="send a last chunk with usage (and empty choices) before [DONE]")


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI fields this server does not use (user, metadata, ...)
    model: str = Field(description="the served model's id, as /v1/models lists it")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy (and so is anything below 1e-4)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling threshold")
    n: int = Field(1, ge=1, description="choices to sample (at most the server's --max-batch)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} strings that end a choice (not returned)")
    seed: int | None = Field(None, ge=-SEED_RANGE, lt=SEED_RANGE, description="same seed, same answer")
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="subtract this from tokens already generated")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="subtract this times each generated token's count")
    logit_bias: dict[str, float] | None = Field(None, description="not supported: must be empty")
    logprobs: bool | None = Field(None, description="not supported: must be false")


class ChatCompletionRequest(SamplingParams):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="most tokens per choice (none: the rest of the context)")
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")
    tools: list[Any] | None = Field(None, description="not supported: must be empty")


class CompletionRequest(SamplingParams):
    prompt: str | list[str] = Field(description="a text, or a list of texts (each gets n choices)")
    max_tokens: int | None = Field(16, ge=1, description="most tokens per choice (OpenAI's default: 16)")
    echo: bool = Field(False, description="return the prompt in front of the completion")
    logprobs: int | None = Field(None, description="not supported: must be null")
    suffix: str | None = Field(None, description="not supported: must be null")
    best_of: int | None = Field(None, description="not supported: must be null or equal to n")


# --- text: decoding a choice's tokens, with stop strings ---

class ChoiceText:
    """The text of one choice as its tokens come: ``add(token)`` returns the text that is now final.

    Text is held back while it ends in a split UTF-8 character or in the beginning of a stop string;
    once a stop string appears, everything from it on is dropped and ``stopped`` is set."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special=True)
        hits = [i for i in (text.find(s, max(0, len(self.sent) - len(s))) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit(text[:max(min(hits), len(self.sent))])
        if text.endswith("\ufffd"):
            return ""
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._emit(text[:len(text) - hold])

    def finish(self) -> str:
        """The rest, once the choice has ended without a stop string."""
        if self.stopped:
            return ""
        return self._emit(self.tokenizer.decode(self.ids, skip_special=True))

    def _emit(self, text: str) -> str:
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent += delta
        return delta


def penalties(presence: float, frequency: float, prompt_len: int):
    """OpenAI's presence/frequency penalties as a logits processor on the generated tokens only."""
    def process(logits: torch.Tensor, ids: list[list[int]]) -> torch.Tensor:
        logits = logits.clone()
        for row, seq in enumerate(ids):
            new = seq[prompt_len:]
            if new:
                counts = torch.bincount(torch.tensor(new, device=logits.device), minlength=logits.size(-1))
                counts = counts[:logits.size(-1)].to(logits.dtype)
                logits[row] -= frequency * counts + presence * (counts > 0).to(logits.dtype)
        return logits
    return process
