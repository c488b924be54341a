"""An optional LLM judge: grade stories with the TinyStories rubric through an OpenAI-compatible API.

TinyStories (Eldan & Li 2023, https://arxiv.org/abs/2305.07759, section 3) graded each story with
GPT-4 on grammar, creativity, consistency and plot, 1 to 10 each. :class:`StoryJudge` sends the same
rubric to any server that speaks ``POST {url}/chat/completions`` (OpenAI, vLLM, llama.cpp's server,
Ollama, ``tinygpt serve``) and parses the four scores from the reply, whatever the layout
("Grammar: 8/10", "**Plot** - 7", a JSON object...). The world's oracle stays the exact grader; the
judge is for real data, or for checking the oracle against a strong model.

* The API key is read from the environment variable ``key_env`` (default ``OPENAI_API_KEY``); with
  the variable unset no ``Authorization`` header is sent (local servers need none), and a 401/403
  reply says which variable to set.
* Verdicts are cached in a JSONL file, one line per request, keyed by sha256 of (model, messages):
  asking again for the same story costs nothing, and an interrupted run resumes where it stopped.
* Connection errors, timeouts, 429 and 5xx replies are retried with exponential backoff (a
  ``Retry-After`` header is honoured); other HTTP errors fail at once with the server's message.

It uses only the standard library (``urllib``) and knows nothing about models or the world.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import statistics
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DIMENSIONS = ("grammar", "creativity", "consistency", "plot")

RUBRIC = (
    "You are grading short stories written by a small language model that was trained on simple stories "
    "for young children, using words a 3 to 4 year old understands. Read the story below and grade it.\n"
    "Grammar: is every sentence grammatical and is the text fluent?\n"
    "Creativity: is the story original, with something interesting happening?\n"
    "Consistency: do the characters, objects, places and events agree with each other from start to end?\n"
    "Plot: does the story have a beginning, a middle and an ending that makes sense?\n"
    "Give each a score from 1 (worst) to 10 (best). Reply with exactly four lines and nothing else:\n"
    "Grammar: <score>\nCreativity: <score>\nConsistency: <score>\nPlot: <score>"
)


class JudgeError(RuntimeError):
    """The judge endpoint failed (after retries) or answered with something unusable."""


class JudgeParseError(JudgeError):
    """The judge's reply does not hold a 1-10 score for every rubric dimension."""


# --- parsing ----------------------------------------------------------------------------------------

_NUMBER = r"(\d+(?:\.\d+)?)"
_PATTERNS = {d: re.compile(rf"\b{d}\b[^0-9\n]{{0,40}}?{_NUMBER}(?:\s*(?:/|out\s+of)\s*10\b)?", re.IGNORECASE)
             for d in DIMENSIONS}


def parse_scores(reply: str) -> dict[str, float]:
    """The four rubric scores (1-10) of a judge reply: ``Grammar: 8``, ``grammar - 8/10``, ``"grammar": 8``...

    Takes the first score written after each dimension's name; raises :class:`JudgeParseError` naming
    the dimensions that are missing or out of range."""
    if not isinstance(reply, str):
        raise JudgeParseError(f"judge reply must be text, got {type(reply).__name__}")
    scores: dict[str, float] = {}
    problems = []
    for dim, pattern in _PATTERNS.items():
        m = pattern.search(reply)
        if m is None:
            problems.append(f"no score for {dim!r}")
            continue
        value = float(m.group(1))
        if not 1.0 <= value <= 10.0:
            problems.append(f"{dim} score {value:g} is outside 1..10")
            continue
        scores[dim] = value
    if problems:
        raise JudgeParseError(f"cannot read the judge's reply ({'; '.join(problems)}): {reply[:300]!r}")
    return scores


# --- the client -------------------------------------------------------------------------------------

def _retry_after(error: urllib.error.HTTPError) -> float | None:
    value = error.headers.get("Retry-After") if error.headers else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class StoryJudge:
    """Grades stories with :data:`RUBRIC` through ``{url}/chat/completions``, caching every verdict."""

    def __init__(self, url: str, model: str, *, key_env: str = "OPENAI_API_KEY", cache: str | Path | None = None,
                 max_retries: int = 4, backoff: float = 1.0, timeout: float = 60.0, max_tokens: int = 64,
                 sleep: Callable[[float], None] = time.sleep):
        if not url or not url.startswith(("http://", "https://")):
            raise ValueError(f"judge url must start with http:// or https://, got {url!r} "
                             "(e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1)")
        if not model:
            raise ValueError("judge model is required (the 'model' field of the chat completion request)")
        if max_retries < 0 or backoff < 0 or timeout <= 0:
            raise ValueError(f"need max_retries >= 0, backoff >= 0, timeout > 0; got {max_retries}, {backoff}, {timeout}")
        self.endpoint = url.rstrip("/") + "/chat/completions"
        self.model, self.key_env = model, key_env
        self.max_retries, self.backoff, self.timeout, self.max_tokens = max_retries, backoff, timeout, max_tokens
        self.sleep = sleep
        self.cache_path = Path(cache) if cache is not None else None
        self.cache: dict[str, str] = {}
        self.requests = 0  # HTTP requests actually sent (cache hits send none)
        if self.cache_path is not None and self.cache_path.exists():
            for lineno, line in enumerate(self.cache_path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    self.cache[entry["key"]] = entry["reply"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise JudgeError(f"{self.cache_path}:{lineno}: not a judge cache line "
                                     "(expected {\"key\", \"reply\"}); delete the file to start over") from None

    # --- one request

    def messages(self, story: str, prompt: str | None = None) -> list[dict[str, str]]:
        task = f"The story was written for this request: {prompt}\n\n" if prompt else ""
        return [{"role": "system", "content": RUBRIC},
                {"role": "user", "content": f"{task}Story:\n{story}"}]

    def cache_key(self, messages: list[dict[str, str]]) -> str:
        return hashlib.sha256(json.dumps([self.model, messages], sort_keys=True).encode()).hexdigest()

    def _post(self, messages: list[dict[str, str]]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.key_env, "") if self.key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        last_error = ""
        for attempt in range(self.max_retries + 1):
            wait = self.backoff * 2 ** attempt
            request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
            try:
                self.requests += 1
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = response.read()
                break
            except urllib.error.HTTPError as e:
                detail = e.read()[:500].decode("utf-8", "replace")
                if e.code in (401, 403):
                    hint = (f"set ${self.key_env}" if not key else f"check the key in ${self.key_env}")
                    raise JudgeError(f"{self.endpoint}: HTTP {e.code} ({hint}): {detail}") from None
                if e.code != 429 and e.code < 500:
                    raise JudgeError(f"{self.endpoint}: HTTP {e.code}: {detail}") from None
                last_error = f"HTTP {e.code}: {detail}"
                wait = _retry_after(e) or wait
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last_error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if attempt < self.max_retries:
                self.sleep(wait)
        else:
            raise JudgeError(f"{self.endpoint}: no answer after {self.max_retries + 1} attempts ({last_error})")
        try:
            reply = json.loads(payload)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise JudgeError(f"{self.endpoint}: not a chat completion response: {payload[:300]!r}") from None
        if not isinstance(reply, str):
            raise JudgeError(f"{self.endpoint}: message content is {type(reply).__name__}, expected text")
        return reply

    def reply(self, story: str, prompt: str | None = None) -> str:
        """The judge's raw reply for a story, from the cache when it was asked before."""
        messages = self.messages(story, prompt)
        key = self.cache_key(messages)
        if key not in self.cache:
            reply = self._post(messages)
            self.cache[key] = reply
            if self.cache_path is not None:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.cache_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": key, "model": self.model, "reply": reply}) + "\n")
        return self.cache[key]

    def grade(self, story: str, prompt: str | None = None) -> dict[str, float]:
        """The four rubric scores of one story (raises :class:`JudgeParseError` on an unreadable reply)."""
        return parse_scores(self.reply(story, prompt))

    # --- many stories

    def grade_stories(self, stories: Sequence[str], prompts: Sequence[str | None] | None = None, *,
                      progress: bool = False) -> dict[str, Any]:
        """Grade every story; unreadable replies are counted (``unparsed``) and left out of the means."""
        from tqdm.auto import tqdm

        prompts = list(prompts) if prompts is not None else [None] * len(stories)
        if len(prompts) != len(stories):
            raise ValueError(f"grade_stories: {len(stories)} stories but {len(prompts)} prompts")
        rows: list[dict[str, float] | None] = []
        failures: list[str] = []
        for story, prompt in tqdm(list(zip(stories, prompts)), desc="judge", unit="story", disable=not progress,
                                  leave=False):
            try:
                rows.append(self.grade(story, prompt))
            except JudgeParseError as e:
                rows.append(None)
                failures.append(str(e))
        graded = [r for r in rows if r is not None]
        means = {d: statistics.fmean(r[d] for r in graded) if graded else math.nan for d in DIMENSIONS}
        return {"model": self.model, "n": len(stories), "unparsed": len(failures), "means": means,
                "scores": rows, "failures": failures[:5]}
