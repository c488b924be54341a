"""Data readers (text, JSONL, Parquet, datasets dirs), their error policy, token shards, TokenDataset."""

import json
import random

import numpy as np
import pytest
import torch

from tinygpt.data import (DataError, ReadStats, TokenDataset, expand_paths, iter_documents, iter_records,
                          prepare_shards, require_field, token_dtype)
from tinygpt.data.shards import is_validation
from tinygpt.tokenizer import Tokenizer

WORDS = "once upon a time a cat and a dog played in the park with a red ball they were happy".split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"Story {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))) + "." for i in range(n)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(make_docs(300), vocab_size=320, show_progress=False)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def read(paths, **kwargs):
    stats = ReadStats()
    return list(iter_documents(paths, stats=stats, **kwargs)), stats


# --- plain text ----------------------------------------------------------------------------------


def test_text_documents_split_on_separator_lines(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"First story.\r\nSecond line.\r\n<|endoftext|>\r\n  Two.  \n <|endoftext|> \nThree\n"
                                     b"<|endoftext|>\n\n")
    (tmp_path / "b.txt").write_text("A whole file is one document,\nwith <|endoftext|> inside a line kept.\n")
    docs, stats = read([tmp_path / "a.txt", tmp_path / "b.txt"])
    assert docs == ["First story.\r\nSecond line.", "Two.", "Three",
                    "A whole file is one document,\nwith <|endoftext|> inside a line kept."]
    assert stats.documents == 4 and stats.skipped == 0


def test_text_empty_document_and_invalid_utf8_name_file_and_line(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("one\n<|endoftext|>\n\n<|endoftext|>\ntwo\n")
    with pytest.raises(DataError, match=r"empty\.txt:3-4: empty document"):
        read(empty)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good\n<|endoftext|>\nline two\nbad \xff byte\nmore\n<|endoftext|>\nlast\n")
    with pytest.raises(DataError, match=r"bad\.txt:4: invalid UTF-8 at byte 4"):
        read(bad)
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\n")
    with pytest.raises(DataError, match=r"blank\.txt: empty document \(the file holds only whitespace\)"):
        read(blank)
    docs, stats = read([bad, empty, blank], skip_bad=True)
    assert docs == ["good", "last", "one", "two"]
    assert stats.skipped == 3 and stats.skipped_by_reason == {"invalid UTF-8": 1, "empty document": 2}
    assert "bad.txt:4" in stats.first_errors[0]


# --- JSONL ---------------------------------------------------------------------------------------


def test_jsonl_reads_field_and_ignores_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "  kept exactly \n", "id": 1}, "", "   ", {"text": "two"}])
    docs, _ = read(path)
    assert docs == ["  kept exactly \n", "two"]
    other = write_jsonl(tmp_path / "o.jsonl", [{"body": "x"}])
    assert read(other, text_field="body")[0] == ["x"]


@pytest.mark.parametrize("line, match", [
    ('{"text": "ok"', r"bad\.jsonl:2: invalid JSON"),
    ('["text"]', r"bad\.jsonl:2: expected a JSON object, got list"),
    ('{"body": "x"}', r"bad\.jsonl:2: missing field 'text'"),
    ('{"text": 5}', r"bad\.jsonl:2: field 'text' must be a string, got int"),
    ('{"text": null}', r"bad\.jsonl:2: field 'text' is null"),
    ('{"text": " \\n "}', r"bad\.jsonl:2: empty document"),
])
def test_jsonl_errors_name_file_line_and_problem(tmp_path, line, match):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "first"}, line, {"text": "third"}])
    with pytest.raises(DataError, match=match):
        read(path)
    docs, stats = read(path, skip_bad=True)
    assert docs == ["first", "third"] and stats.skipped == 1 and stats.documents == 2


def test_jsonl_invalid_utf8_and_skip_counts_by_reason(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "\xc3\x28"}\n{"text": 1}\n{oops\n{"text": "b"}\n{"text": 2}\n')
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: invalid UTF-8"):
        read(path)
    docs, stats = read(path, skip_bad=True)
    assert docs == ["a", "b"]
    assert stats.skipped == 4
    assert stats.skipped_by_reason == {"invalid UTF-8": 1, "text not a string": 2, "invalid JSON": 1}
    assert stats.as_dict()["skipped"] == 4


def test_iter_records_and_require_field(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": []}, {"messages": "no"}])
    records = list(iter_records(path))
    assert [where for where, _ in records] == [f"{path}:1", f"{path}:2"]
    assert require_field(records[0][1], "messages", list, records[0][0]) == []
    with pytest.raises(DataError, match=r"chat\.jsonl:2: field 'messages' must be list, got str"):
        require_field(records[1][1], "messages", list, records[1][0])
    with pytest.raises(DataError, match=r"chat\.jsonl:1: missing field 'prompt'"):
        require_field(records[0][1], "prompt", str, records[0][0])


# --- Parquet and datasets ------------------------------------------------------------------------


def test_parquet_reader_and_row_errors(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["alpha", "beta", None, "gamma"], "n": [1, 2, 3, 4]}), path)
    assert read(path, text_field="content", skip_bad=True)[0] == ["alpha", "beta", "gamma"]
    with pytest.raises(DataError, match=r"d\.parquet: row 2: field 'content' is null"):
        read(path, text_field="content")
    with pytest.raises(DataError, match=r"d\.parquet: no column 'text' \(columns: \['content', 'n'\]\)"):
        read(path)
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="fake.parquet: not a readable Parquet file"):
        read(tmp_path / "fake.parquet")


def test_datasets_directory_reader(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["one", "two", ""]}).save_to_disk(str(tmp_path / "ds"))
    docs, stats = read(tmp_path / "ds", skip_bad=True)
    assert docs == ["one", "two"] and stats.skipped_by_reason == {"empty document": 1}
    with pytest.raises(DataError, match=r"ds: row 2: empty document"):
        read(tmp_path / "ds")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="DatasetDict with splits.*train"):
        read(tmp_path / "dd")
    assert read(tmp_path / "dd" / "train")[0] == ["a"]


# --- paths ---------------------------------------------------------------------------------------


def test_directories_globs_and_path_errors(tmp_path):
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "b.jsonl", [{"text": "from b"}])
    (tmp_path / "a.txt").write_text("from a")
    (tmp_path / "sub" / "c.txt").write_text("from c")
    (tmp_path / ".hidden.txt").write_text("hidden")
    (tmp_path / "notes.csv").write_text("ignored in directories")
    assert read(tmp_path)[0] == ["from a", "from b", "from c"]
    assert read(str(tmp_path / "**" / "*.txt"))[0] == ["from a", "from c"]
    assert expand_paths([tmp_path / "a.txt", str(tmp_path / "*.jsonl")]) == [tmp_path / "a.txt", tmp_path / "b.jsonl"]
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="matches no readable file"):
        read(str(tmp_path / "*.parquet"))
    with pytest.raises(DataError, match=r"notes\.csv: unsupported file type '\.csv'"):
        read(tmp_path / "notes.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no readable file"):
        read(tmp_path / "empty")


# --- shards --------------------------------------------------------------------------------------


def split_on_eos(ids: np.ndarray, eos: int, bos: int = 1) -> list[list[int]]:
    assert ids[-1] == eos  # every document is followed by EOS
    docs, current = [], []
    for i in ids.tolist():
        if i == eos:
            assert current[0] == bos  # ... and starts with BOS
            docs.append(current[1:])
            current = []
        else:
            current.append(i)
    return docs


def test_prepare_shards_layout_dtype_eos_and_meta(tmp_path, tok):
    docs = make_docs(200)
    write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in docs])
    meta = prepare_shards(tmp_path / "in.jsonl", tok, tmp_path / "out", val_fraction=0.1, seed=3, show_progress=False)
    assert meta == json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["eos_id"] == tok.eos_id == 2
    train = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "out" / "val.bin", dtype=np.uint16)
    assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"])
    train_docs = [tok.decode(ids) for ids in split_on_eos(train, tok.eos_id)]
    val_docs = [tok.decode(ids) for ids in split_on_eos(val, tok.eos_id)]
    assert (len(train_docs), len(val_docs)) == (meta["train_docs"], meta["val_docs"])
    assert train_docs + val_docs != docs and sorted(train_docs + val_docs) == sorted(docs)
    assert train_docs == [d for d in docs if not is_validation(d, 3, 0.1)]  # order kept within a split
    assert 5 <= len(val_docs) <= 40  # ~10% of 200
    assert meta["tokenizer_sha256"] == tok.fingerprint
    assert Tokenizer.load(tmp_path / "out").fingerprint == tok.fingerprint
    assert meta["sources"] == [str(tmp_path / "in.jsonl")] and meta["skipped"] == 0
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_token_dtype_switches_at_65536():
    assert token_dtype(4096) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_split_is_deterministic_and_duplicates_stay_together(tmp_path, tok):
    docs = make_docs(300)
    assert [is_validation(d, 0, 0.2) for d in docs] == [is_validation(d, 0, 0.2) for d in docs]
    assert [is_validation(d, 0, 0.2) for d in docs] != [is_validation(d, 1, 0.2) for d in docs]
    assert not any(is_validation(d, 0, 0.0) for d in docs)
    write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in docs + docs])  # every doc twice
    meta = prepare_shards(tmp_path / "in.jsonl", tok, tmp_path / "out", val_fraction=0.2, show_progress=False,
                          batch_documents=7)
    val = np.fromfile(tmp_path / "out" / "val.bin", dtype=np.uint16)
    val_docs = [tok.decode(ids) for ids in split_on_eos(val, tok.eos_id)]
    assert meta["val_docs"] % 2 == 0 and all(val_docs.count(d) == 2 for d in val_docs)


def test_tiny_corpus_still_gets_a_validation_document(tmp_path, tok):
    docs = ["The cat sat.", "The dog ran."]
    assert not any(is_validation(d, 0, 0.01) for d in docs)
    write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in docs])
    meta = prepare_shards(tmp_path / "in.jsonl", tok, tmp_path / "out", val_fraction=0.01, show_progress=False)
    assert meta["val_fallback"] and (meta["train_docs"], meta["val_docs"]) == (1, 1)
    val = np.fromfile(tmp_path / "out" / "val.bin", dtype=np.uint16)
    train = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16)
    assert tok.decode(val[1:-1]) == docs[1] and tok.decode(train[1:-1]) == docs[0]  # BOS doc EOS


def test_prepare_shards_bad_input_strict_and_skipped(tmp_path, tok):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "good one"}, {"text": 7}, '{"text": "unterminated', {"text": "two"}])
    with pytest.raises(DataError, match=r"in\.jsonl:2: field 'text' must be a string"):
        prepare_shards(path, tok, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out" / "meta.json").exists() and not list((tmp_path / "out").iterdir())
    meta = prepare_shards(path, tok, tmp_path / "out", skip_bad=True, show_progress=False)
    assert meta["skipped"] == 2 and meta["train_docs"] + meta["val_docs"] == 2
    assert meta["skipped_by_reason"] == {"text not a string": 1, "invalid JSON": 1}
    with pytest.raises(ValueError, match="no documents read"):
        prepare_shards(write_jsonl(tmp_path / "all_bad.jsonl", [{"text": 1}]), tok, tmp_path / "o2",
                       skip_bad=True, show_progress=False)


# --- TokenDataset --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, tok):
    directory = tmp_path_factory.mktemp("shards")
    write_jsonl(directory / "in.jsonl", [{"text": d} for d in make_docs(150)])
    prepare_shards(directory / "in.jsonl", tok, directory / "out", val_fraction=0.1, show_progress=False)
    return directory / "out"


def test_batch_shapes_and_targets_are_shifted_windows(shard_dir):
    data = TokenDataset(shard_dir, "train")
    tokens = np.fromfile(shard_dir / "train.bin", dtype=np.uint16).astype(np.int64)
    assert len(data) == data.num_tokens == len(tokens)
    x, y = data.batch(step=5, batch_size=4, block_size=16, seed=1)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x.numpy(), y.numpy()):  # each row is a real window of the file
        starts = [s for s in range(len(tokens) - 16) if np.array_equal(tokens[s:s + 16], row_x)]
        assert any(tokens[s + 16] == row_y[-1] for s in starts)


def test_batch_is_a_function_of_seed_and_step(shard_dir):
    data, again = TokenDataset(shard_dir), TokenDataset(shard_dir / "train.bin")
    x1, y1 = data.batch(7, 8, 12, seed=3)
    x2, y2 = again.batch(7, 8, 12, seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, data.batch(8, 8, 12, seed=3)[0])
    assert not torch.equal(x1, data.batch(7, 8, 12, seed=4)[0])


def test_ranks_slice_the_same_global_batch(shard_dir):
    data = TokenDataset(shard_dir)
    for step in (0, 11):
        global_x, global_y = data.batch(step, 6, 10, seed=2)  # one process, batch 2 * 3
        parts = [data.batch(step, 3, 10, seed=2, rank=r, world_size=2) for r in range(2)]
        assert torch.equal(torch.cat([p[0] for p in parts]), global_x)
        assert torch.equal(torch.cat([p[1] for p in parts]), global_y)
    with pytest.raises(ValueError, match="rank"):
        data.batch(0, 3, 10, rank=2, world_size=2)


def test_eval_batches_walk_sequential_windows(shard_dir):
    val = TokenDataset(shard_dir, "val")
    tokens = torch.from_numpy(np.fromfile(shard_dir / "val.bin", dtype=np.uint16).astype(np.int64))
    block = 8
    batches = list(val.eval_batches(batch_size=5, block_size=block))
    xs, ys = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    n = (len(tokens) - 1) // block
    assert xs.shape == (n, block) == (val.num_windows(block), block)
    assert torch.equal(xs.flatten(), tokens[:n * block]) and torch.equal(ys.flatten(), tokens[1:n * block + 1])
    assert all(b[0].shape[0] == 5 for b in batches[:-1])
    assert len(list(val.eval_batches(5, block, max_batches=2))) == 2


def test_dataset_errors(shard_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json not found"):
        TokenDataset(tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        TokenDataset(shard_dir, "test")
    val = TokenDataset(shard_dir, "val")
    with pytest.raises(ValueError, match=rf"val\.bin: {val.num_tokens} tokens, too few for one window"):
        val.batch(0, 2, val.num_tokens)
    val.batch(0, 2, val.num_tokens - 1)  # exactly one window fits
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("meta.json", "val.bin"):
        (copy / name).write_bytes((shard_dir / name).read_bytes())
    (copy / "train.bin").write_bytes((shard_dir / "train.bin").read_bytes()[:-2])
    with pytest.raises(ValueError, match="stale or truncated"):
        TokenDataset(copy, "train")


# --- stages --------------------------------------------------------------------------------------


def test_tokenizer_and_prepare_stages(tmp_path, capsys):
    from tinygpt.stages.prepare import PrepareConfig
    from tinygpt.stages.prepare import main as prepare_main
    from tinygpt.stages.tokenizer import TokenizerConfig
    from tinygpt.stages.tokenizer import main as tokenizer_main

    write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in make_docs(120)] + [{"text": 3}])
    with pytest.raises(DataError, match="in.jsonl:121"):
        tokenizer_main(TokenizerConfig(inputs=[str(tmp_path)], out=str(tmp_path / "tok"), vocab_size=300,
                                       progress=False))
    summary = tokenizer_main(TokenizerConfig(inputs=[str(tmp_path / "in.jsonl")], out=str(tmp_path / "tok"),
                                             vocab_size=300, max_docs=50, skip_bad=True, progress=False))
    assert summary["documents"] == 50 and summary["skipped"] == 0 and summary["chars_per_token"] > 1.5
    assert "chars/token" in capsys.readouterr().out
    stats = prepare_main(PrepareConfig(inputs=[str(tmp_path / "in.jsonl")], tokenizer=str(tmp_path / "tok"),
                                       out=str(tmp_path / "data"), skip_bad=True, progress=False))
    assert stats["skipped"] == 1 and stats["train_docs"] + stats["val_docs"] == 120
    assert (tmp_path / "data" / "prepare_config.json").is_file()
    assert TokenDataset(tmp_path / "data").meta["tokenizer_sha256"] == Tokenizer.load(tmp_path / "tok").fingerprint
    with pytest.raises(ValueError, match="inputs"):
        prepare_main(PrepareConfig(inputs=[], out=str(tmp_path / "x")))


def test_every_record_reader_takes_jsonl_parquet_and_datasets_dirs(tmp_path):
    """Chats (SFT), preferences (reward, DPO), prompts (rank, PPO) and task records read one way."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tinygpt.data.conversations import iter_conversations
    from tinygpt.data.prompts import read_prompts
    from tinygpt.data.sources import iter_records

    chats = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
             for i in range(3)]
    prompts = [{"prompt": f"p{i}", "meta": json.dumps({"family": "arithmetic", "gold": str(i)})} for i in range(3)]
    for name, rows in (("chats", chats), ("prompts", prompts)):
        write_jsonl(tmp_path / f"{name}.jsonl", rows)
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{name}.parquet")
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / f"{name}_ds"))
    want = [m for _, m in iter_conversations(tmp_path / "chats.jsonl")]
    for source in ("chats.parquet", "chats_ds"):
        assert [m for _, m in iter_conversations(tmp_path / source)] == want
        assert [w for w, _ in iter_records(tmp_path / source)][1].endswith(": row 1")
        got = [p.meta for p in read_prompts(str(tmp_path / source.replace("chats", "prompts")), require_meta=True)]
        assert got == [{"family": "arithmetic", "gold": str(i)} for i in range(3)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(chats)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="DatasetDict; pass one split"):
        list(iter_records(tmp_path / "dd"))
    (tmp_path / "deep.jsonl").write_text("[" * 5000 + "]" * 5000 + "\n" + json.dumps(chats[0]) + "\n")
    with pytest.raises(DataError, match="deep.jsonl:1: invalid JSON"):
        list(iter_records(tmp_path / "deep.jsonl"))
    assert len(list(iter_records(tmp_path / "deep.jsonl", skip_bad=True))) == 1
