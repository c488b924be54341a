"""The one prompt reader of `tinygpt rank` and `tinygpt ppo` (data/prompts.py)."""

import json

import pytest

from tinygpt.data.prompts import read_prompts, task_meta
from tinygpt.data.sources import DataError


def test_read_prompts_accepts_strings_and_names_bad_lines(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"prompt": "hello"}) + "\n\n"
                    + json.dumps({"prompt": [{"role": "user", "content": "x"}]}) + "\n")
    records = read_prompts(str(good))
    assert records[0].messages == [{"role": "user", "content": "hello"}] and len(records) == 2
    assert records[0].where == f"{good}:1" and records[1].where == f"{good}:3"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": [{"role": "bot", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'prompt'"):
        read_prompts(str(bad))
    ends_with_answer = tmp_path / "a.jsonl"
    ends_with_answer.write_text(json.dumps({"prompt": [{"role": "user", "content": "q"},
                                                       {"role": "assistant", "content": "a"}]}) + "\n")
    with pytest.raises(ValueError, match="a.jsonl:1"):
        read_prompts(str(ends_with_answer))


def test_meta_as_a_json_string_is_graded_like_an_object(tmp_path):
    """`datasets` directories store meta as a JSON string: PPO used to leave those prompts ungraded."""
    meta = {"family": "arithmetic", "gold": "4"}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "2+2?", "meta": meta}) + "\n"
                    + json.dumps({"prompt": "2+2?", "meta": json.dumps(meta)}) + "\n"
                    + json.dumps({"prompt": "2+2?", "family": "arithmetic", "meta": {"gold": "4"}}) + "\n")
    prompts = read_prompts(str(path), require_meta=True)
    assert [p.meta for p in prompts] == [meta, meta, meta]
    assert [p.family for p in prompts] == ["arithmetic"] * 3


def test_require_meta_refuses_an_ungradeable_prompt_and_names_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "meta": {"family": "arithmetic", "gold": "1"}}) + "\n"
                    + json.dumps({"prompt": "hi"}) + "\n")
    assert read_prompts(str(path))[1].meta is None  # PPO: answered, not graded
    with pytest.raises(DataError, match=r"p.jsonl:2: field 'meta'"):
        read_prompts(str(path), require_meta=True)  # rank: the labeler must grade every answer
    with pytest.raises(DataError, match="not JSON"):
        task_meta({"meta": "{not json"}, "x:1")
    with pytest.raises(DataError, match="must be an object"):
        task_meta({"meta": [1, 2]}, "x:1")
    assert len(read_prompts(str(path), limit=1)) == 1
