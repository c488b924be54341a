"""`tinygpt export data`: the world's chats and prompts and the ranker's pairs in TRL's conversational
schemas, loaded back with `datasets` and rendered by TRL's own apply_chat_template into tinygpt's ids."""

from __future__ import annotations

import json
import os

import pytest

from export_fixtures import make_tokenizer, save, seeded_model, tiny_config
from tinygpt import cli
from tinygpt.data.sources import DataError
from tinygpt.export.data import export_data
from tinygpt.export.hf import export_hf
from tinygpt.world.export import export_world

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A world, and pairs.jsonl / pairs_val.jsonl as `tinygpt rank` writes them (prompt messages, string answers)."""
    root = tmp_path_factory.mktemp("trl_data")
    export_world(root / "world", n_stories=20, n_sft_chats=12, n_rl_prompts=8, formats=["jsonl"], progress=False)
    prompts = [json.loads(line) for line in (root / "world" / "rl_prompts.jsonl").read_text().splitlines()]
    (root / "rank").mkdir()
    for name, rows in (("pairs", prompts[:6]), ("pairs_val", prompts[6:])):
        pairs = [{"prompt": p["prompt"], "chosen": f"good answer {i}", "rejected": f"bad answer {i}",
                  "family": p["family"], "index": p["index"]} for i, p in enumerate(rows)]
        (root / "rank" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return root


def load(path):
    return datasets.load_dataset("json", data_files=str(path), split="train")


def test_files_load_with_datasets_in_trl_schemas(sources, tmp_path):
    counts = export_data(sources / "world", tmp_path, rank=sources / "rank")
    assert counts == {"sft_train.jsonl": 12, "sft_test.jsonl": counts["sft_test.jsonl"], "prompts.jsonl": 8,
                      "preferences.jsonl": 6, "preferences_val.jsonl": 2} and counts["sft_test.jsonl"] > 0
    sft = load(tmp_path / "sft_train.jsonl")
    assert sft.column_names == ["messages"] and sft[0]["messages"][-1]["role"] == "assistant"
    world_chats = [json.loads(line)["messages"] for line in (sources / "world" / "sft_train.jsonl").read_text().splitlines()]
    assert [row["messages"] for row in sft] == world_chats  # nothing changed but the fields kept
    prompts = load(tmp_path / "prompts.jsonl")
    assert prompts.column_names == ["prompt"] and all(p["prompt"][-1]["role"] == "user" for p in prompts)
    prefs = load(tmp_path / "preferences.jsonl")
    assert prefs.column_names == ["prompt", "chosen", "rejected"]
    assert prefs[0]["chosen"] == [{"role": "assistant", "content": "good answer 0"}]
    assert load(tmp_path / "preferences_val.jsonl").num_rows == 2


def test_trl_renders_them_with_the_exported_chat_template(sources, tmp_path):
    trl_data = pytest.importorskip("trl.data_utils", reason="trl is not installed (pip install trl)")
    transformers = pytest.importorskip("transformers")
    tok = make_tokenizer()
    export_hf(save(tmp_path / "ckpt", seeded_model(tiny_config("llama", tok.vocab_size)), tok), tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    export_data(sources / "world", tmp_path / "trl", rank=sources / "rank")
    pair = load(tmp_path / "trl" / "preferences.jsonl")[0]
    assert trl_data.is_conversational(pair)
    rendered = trl_data.apply_chat_template(pair, hf_tok)  # what TRL's DPO / reward trainers do first
    ids, _ = tok.render_chat(pair["prompt"], add_generation_prompt=True)
    assert hf_tok(rendered["prompt"], add_special_tokens=False)["input_ids"] == ids
    full, _ = tok.render_chat(pair["prompt"] + pair["chosen"])
    assert hf_tok(rendered["prompt"] + rendered["chosen"], add_special_tokens=False)["input_ids"] == full
    chat = load(tmp_path / "trl" / "sft_train.jsonl")[0]
    assert hf_tok(trl_data.apply_chat_template(chat, hf_tok)["text"], add_special_tokens=False)["input_ids"] == \
        tok.render_chat(chat["messages"])[0]
    # tinygpt rank's own pairs (string answers after message prompts) are not TRL's schema
    raw = json.loads((sources / "rank" / "pairs.jsonl").read_text().splitlines()[0])
    with pytest.raises(TypeError, match="concatenate list"):
        trl_data.apply_chat_template({k: raw[k] for k in ("prompt", "chosen", "rejected")}, hf_tok)


def test_bad_input_names_file_and_line(sources, tmp_path):
    with pytest.raises(FileNotFoundError, match="pairs.jsonl"):
        export_data(sources / "world", tmp_path / "a", rank=tmp_path)
    bad = tmp_path / "badworld"
    bad.mkdir()
    for name in ("sft_train", "sft_test", "rl_prompts"):
        (bad / f"{name}.jsonl").write_text((sources / "world" / f"{name}.jsonl").read_text())
    (bad / "sft_test.jsonl").write_text('{"messages": [{"role": "robot", "content": "hi"}]}\n')
    with pytest.raises(DataError, match=r"sft_test.jsonl:1: field 'messages': message 0: field 'role'"):
        export_data(bad, tmp_path / "b")
    export_data(sources / "world", tmp_path / "c")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_data(sources / "world", tmp_path / "c")
    assert cli.run(["export", "data", "--world", str(sources / "world"), "--out", str(tmp_path / "c"),
                    "--overwrite"])["prompts.jsonl"] == 8
