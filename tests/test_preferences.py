"""Preference data (rankings, pairs, per-prompt batching) and the `tinygpt rank` stage on a tiny policy."""

import json
import math
from pathlib import Path

import pytest
import torch

from tinygpt.checkpoint import save_checkpoint
from tinygpt.data.preferences import (PreferenceDataset, held_out_preferences, parse_prompt, ranking_to_pairs,
                                      read_preference_groups)
from tinygpt.data.sources import DataError
from tinygpt.model import GPT, ModelConfig
from tinygpt.stages import rank
from tinygpt.stages.rank import RankConfig
from tinygpt.tokenizer import Tokenizer
from tinygpt.world.labeler import tier_positions
from tinygpt.world.tasks import FAMILIES


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = [f"What is {a} plus {b}? The answer is {a + b}. You are a silly fool! I do not know."
             for a in range(10) for b in range(10)]
    return Tokenizer.train(texts, vocab_size=300, show_progress=False)


def _write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_ranking_to_pairs_is_all_k_choose_2_best_first():
    assert ranking_to_pairs([2, 0, 1]) == [(2, 0), (2, 1), (0, 1)]
    assert len(ranking_to_pairs(list(range(9)))) == math.comb(9, 2)


def test_tied_completions_make_no_pair():
    assert ranking_to_pairs([2, [0, 1]]) == [(2, 0), (2, 1)]
    assert ranking_to_pairs([[3, 1], 0, 2]) == [(3, 0), (1, 0), (3, 2), (1, 2), (0, 2)]
    assert ranking_to_pairs([[0, 1, 2]]) == []


def test_prompt_forms():
    assert parse_prompt("hi", "f:1") == [{"role": "user", "content": "hi"}]
    msgs = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}]
    assert parse_prompt(msgs, "f:1") == msgs
    with pytest.raises(DataError, match="f:3: field 'prompt': message 0: field 'role'"):
        parse_prompt([{"role": "robot", "content": "x"}], "f:3")


def test_rankings_and_pairs_group_by_prompt(tmp_path):
    """A ranking of 3 gives 3 pairs in one group; pair records of the same prompt join one group;
    identical texts are dropped and counted; TRL's conversational chosen/rejected is read too."""
    path = _write(tmp_path / "p.jsonl", [
        {"prompt": "What is 2 plus 3?", "completions": ["5", "4", "5", "fool"], "ranking": [0, 2, 1, 3],
         "utilities": [2.5, 1.5, 2.5, 0.5], "family": "arithmetic"},
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "Go away."},
        {"prompt": "Hi", "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": "Whatever."},
    ])
    groups = read_preference_groups(path)
    assert len(groups) == 2
    g0, g1 = groups
    # ranking [0, 2, 1, 3] -> 6 pairs; (0, 2) has identical text "5" -> dropped; "5" interned once
    assert g0.completions == ["5", "4", "fool"]
    assert sorted(g0.pairs) == sorted([(0, 1), (0, 2), (0, 1), (0, 2), (1, 2)])
    assert g0.utilities == [2.5, 1.5, 0.5] and g0.info == {"family": "arithmetic"}
    assert g1.completions == ["Hello!", "Go away.", "Whatever."] and g1.pairs == [(0, 1), (0, 2)]
    assert g1.where.endswith("p.jsonl:2")


@pytest.mark.parametrize("record, message", [
    ({"completions": ["a", "b"], "ranking": [0, 1]}, "p.jsonl:1: missing field 'prompt'"),
    ({"prompt": "x", "completions": ["a", "b"], "ranking": [0, 5]}, r"'ranking' must hold completion indices in \[0, 2\)"),
    ({"prompt": "x", "completions": ["a", "b"], "ranking": [1, 1]}, "repeats an index"),
    ({"prompt": "x", "completions": ["a", "b"], "ranking": [1]}, "at least 2"),
    ({"prompt": "x", "completions": ["a", "b", "c"], "ranking": [2, [1]]}, "a tie must list at least 2"),
    ({"prompt": "x", "completions": ["a", "b", "c"], "ranking": [[0, 1], [1, 2]]}, "repeats an index"),
    ({"prompt": "x", "completions": ["a", 3], "ranking": [0, 1]}, "'completions' item 1 must be a string"),
    ({"prompt": "x", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "x", "chosen": "a", "rejected": 3}, "'rejected' must be str or list"),
    ({"prompt": "x", "answer": "a"}, "neither a ranking"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_records_name_file_line_and_field(tmp_path, record, message):
    path = _write(tmp_path / "p.jsonl", [record])
    with pytest.raises(DataError, match=message):
        read_preference_groups(path)


def test_skip_bad_counts_what_it_skips(tmp_path, tok):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "x", "chosen": "a"}, "not json",
                                         {"prompt": "What is 1 plus 1?", "chosen": "2", "rejected": "fool"}])
    data = PreferenceDataset(path, tok, 64, skip_bad=True)
    assert data.stats.skipped_bad == 2 and len(data.stats.first_skipped) == 2 and data.num_pairs == 1


def test_dataset_batches_whole_prompts_and_is_deterministic(tmp_path, tok):
    records = [{"prompt": f"What is {a} plus 1?", "completions": [str(a + 1), "I do not know.", "You are a fool!"],
                "ranking": [0, 1, 2]} for a in range(5)]
    data = PreferenceDataset(_write(tmp_path / "r.jsonl", records), tok, max_tokens=64)
    assert len(data) == 5 and data.num_pairs == 15
    batch = data.batch(0, 2, seed=3)
    assert batch.ids.shape[0] == 6 and batch.num_pairs == 6  # 2 prompts x 3 completions, 2 x 3 pairs
    assert batch.group.tolist() == [0, 0, 0, 1, 1, 1]
    assert (batch.chosen // 3 == batch.group).all() and (batch.rejected // 3 == batch.group).all()
    again = data.batch(0, 2, seed=3)
    assert torch.equal(batch.ids, again.ids) and torch.equal(batch.chosen, again.chosen)
    # the first epoch visits every prompt once; rank 1 of 2 takes the second half of the global batch
    assert sorted(data.indices(0, 5, seed=3)) == [0, 1, 2, 3, 4]
    assert data.indices(0, 2, seed=3, rank=1, world_size=2) == data.indices(0, 4, seed=3)[2:]
    # a row renders prompt + assistant answer + <|end|>; mask 1 exactly on the answer and its <|end|>
    row = 0
    n = int(batch.lengths[row])
    ids, mask = batch.ids[row, :n].tolist(), batch.mask[row, :n].tolist()
    assert ids[-1] == tok.end_id and mask[-1] == 1
    answer_start = ids.index(tok.assistant_id) + 1
    assert mask == [0] * answer_start + [1] * (n - answer_start)
    assert batch.ids[row, n:].eq(tok.pad_id).all() and batch.mask[row, n:].eq(0).all()
    x, y, m = batch.inputs_targets()
    assert x.shape == y.shape == m.shape == (6, batch.ids.shape[1] - 1)


def test_too_long_completions_are_dropped_and_counted(tmp_path, tok):
    records = [{"prompt": "What is 1 plus 1?", "completions": ["2", "fool " * 40, "I do not know."], "ranking": [0, 2, 1]},
               {"prompt": "What is 2 plus 2?", "completions": ["4" * 90, "fool " * 40], "ranking": [0, 1]}]
    data = PreferenceDataset(_write(tmp_path / "r.jsonl", records), tok, max_tokens=30)
    assert data.stats.too_long_completions == 3 and data.stats.too_long_pairs == 3
    assert data.stats.prompts_without_pairs == 1 and data.num_pairs == 1 and len(data) == 1
    with pytest.raises(DataError, match="no usable preference pair"):
        PreferenceDataset(_write(tmp_path / "s.jsonl", records[1:]), tok, max_tokens=30)


def test_held_out_file_without_a_pair_means_no_validation_not_a_crash(tmp_path, tok, capsys):
    tied = [{"prompt": "What is 1 plus 1?", "completions": ["5", "7"], "ranking": [[0, 1]]}]
    assert held_out_preferences(_write(tmp_path / "tied.jsonl", tied), tok, 64, stage="reward") is None
    assert "reward: warning: no validation" in capsys.readouterr().out
    ok = [{"prompt": "What is 1 plus 1?", "completions": ["2", "7"], "ranking": [0, 1]}]
    assert held_out_preferences(_write(tmp_path / "ok.jsonl", ok), tok, 64).num_pairs == 1
    with pytest.raises(DataError, match="bad.jsonl:1: invalid JSON"):  # unreadable data is still an error
        held_out_preferences(_write(tmp_path / "bad.jsonl", ["{not json"]), tok, 64)


def test_noise_ceiling_hand_worked(tmp_path, tok):
    """Prompt 1: utilities (2, 1, 0) ranked [0, 1, 2]: 3 pairs agree with the utility order.
    Prompt 2: utilities (2, 1, 1) ranked [2, 0, 1]: (2 over 0) disagrees, (2 over 1) tie = 1/2, (0 over 1) agrees.
    Ceiling = (3 + 0 + 0.5 + 1) / 6 = 0.75."""
    records = [{"prompt": "a", "completions": ["x", "y", "z"], "ranking": [0, 1, 2], "utilities": [2, 1, 0]},
               {"prompt": "b", "completions": ["x", "y", "z"], "ranking": [2, 0, 1], "utilities": [2, 1, 1]}]
    data = PreferenceDataset(_write(tmp_path / "r.jsonl", records), tok, max_tokens=64)
    assert data.noise_ceiling() == pytest.approx(0.75)
    pairs_only = PreferenceDataset(_write(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "x", "rejected": "y"}]), tok, 64)
    assert pairs_only.noise_ceiling() is None


# --- the rank stage -------------------------------------------------------------------------------


def test_rank_stage_writes_rankings_pairs_and_a_val_split(tmp_path, tok):
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=2, d_model=32)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "sft", model=GPT(cfg), model_config=cfg, tokenizer_json=tok.to_str(), meta={"stage": "sft"})
    items = [FAMILIES["arithmetic"].item(i) for i in range(10)]
    prompts = _write(tmp_path / "rl_prompts.jsonl", [
        {"prompt": [{"role": "user", "content": it.instruction}], "family": "arithmetic", "index": it.index,
         "meta": it.meta} for it in items])
    out = tmp_path / "rank"
    run = lambda: rank.main(RankConfig(policy=str(tmp_path / "sft"), prompts=str(prompts), out=str(out), k=4,  # noqa: E731
                                       max_new_tokens=12, val_fraction=0.2, batch_size=16, device="cpu",
                                       progress=False, seed=5))
    summary = run()
    rankings = [json.loads(line) for line in (out / "rankings.jsonl").read_text().splitlines()]
    val = [json.loads(line) for line in (out / "rankings_val.jsonl").read_text().splitlines()]
    assert len(rankings) == 8 and len(val) == 2 and summary["val_prompts"] == 2
    assert {r["index"] for r in rankings}.isdisjoint({r["index"] for r in val})
    expected_pairs = 0
    for r in rankings + val:
        assert len(r["completions"]) == 4 and sorted(tier_positions(r["ranking"])) == [0, 1, 2, 3]
        assert len(r["utilities"]) == 4 and r["meta"]["family"] == "arithmetic"
        for a, b in ranking_to_pairs(r["ranking"]):  # tied answers are never a pair, and never far apart
            expected_pairs += r["completions"][a] != r["completions"][b]
        for tier in r["ranking"]:
            if isinstance(tier, list):
                assert max(r["utilities"][i] for i in tier) - min(r["utilities"][i] for i in tier) <= 0.05
    pairs = (out / "pairs.jsonl").read_text().splitlines() + (out / "pairs_val.jsonl").read_text().splitlines()
    assert len(pairs) == summary["pairs_written"] == expected_pairs
    assert 0.0 <= summary["mean_utility"] <= 2.5 and 0.0 <= summary["tie_share"] <= 1.0
    if summary["labeler_agreement_expected"] is not None:  # the noise was set for 73% agreement on these pairs
        assert summary["labeler_agreement_expected"] == pytest.approx(0.73, abs=1e-6)
    # the files read back as preference data; the same seed gives the same bytes
    assert len(read_preference_groups(out / "rankings.jsonl")) == 8
    first = (out / "rankings.jsonl").read_bytes()
    run()
    assert (out / "rankings.jsonl").read_bytes() == first


def test_stories_get_the_long_answer_budget(tmp_path):
    """A random policy rarely ends an answer, so answers run to their budget: 6 tokens for sums,
    20 for stories (``--long-max-new-tokens``), or 6 for both when it is 0. The tokenizer has no
    merges, so a token decodes to at most one character."""
    tok = Tokenizer.train(["a small corpus"], vocab_size=263, show_progress=False)  # bytes only
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=2, n_head=2, d_model=32)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "sft", model=GPT(cfg), model_config=cfg, tokenizer_json=tok.to_str(), meta={"stage": "sft"})
    items = [FAMILIES[f].item(i) for f in ("arithmetic", "write_story") for i in range(4)]
    prompts = _write(tmp_path / "rl_prompts.jsonl", [
        {"prompt": [{"role": "user", "content": it.instruction}], "family": it.family, "index": it.index,
         "meta": it.meta} for it in items])

    def longest(long_budget: int) -> dict[str, int]:
        out = tmp_path / f"rank{long_budget}"
        rank.main(RankConfig(policy=str(tmp_path / "sft"), prompts=str(prompts), out=str(out), k=2, max_new_tokens=6,
                             long_max_new_tokens=long_budget, val_fraction=0.0, batch_size=4, device="cpu",
                             progress=False, seed=5))
        chars: dict[str, int] = {}
        for line in (out / "rankings.jsonl").read_text().splitlines():
            r = json.loads(line)
            chars[r["family"]] = max([chars.get(r["family"], 0)] + [len(c) for c in r["completions"]])
        return chars

    long, short = longest(20), longest(0)
    assert long["arithmetic"] <= 6 and short["arithmetic"] <= 6 and short["write_story"] <= 6
    assert 10 <= long["write_story"] <= 20


def test_rank_rejects_prompts_the_labeler_cannot_grade(tmp_path, tok):
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, d_model=32)
    save_checkpoint(tmp_path / "sft", model=GPT(cfg), model_config=cfg, tokenizer_json=tok.to_str(), meta={})
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": "What is 1 plus 1?"}])
    with pytest.raises(DataError, match="p.jsonl:1: field 'meta' must be an object with the task's 'family'"):
        rank.main(RankConfig(policy=str(tmp_path / "sft"), prompts=str(prompts), out=str(tmp_path / "o"),
                             device="cpu", progress=False))
