"""The watermark: the z-score and p-value against hand-worked numbers, green lists, repeated bigrams
counted once, the logits processor, and on a tiny random model: watermarked samples are found and
unwatermarked ones (and text) stay under the threshold; `sample`/`chat --watermark-key` and
`tinygpt watermark detect` end to end."""

import io
import json
import math
import random

import pytest
import torch

from tinygpt.chat import ChatConfig, main as chat_main
from tinygpt.checkpoint import save_checkpoint
from tinygpt.cli import run
from tinygpt.generate import SamplingConfig, generate
from tinygpt.model import GPT, ModelConfig
from tinygpt.stages import sample
from tinygpt.tokenizer import Tokenizer
from tinygpt.watermark import (GreenLists, binomial_p_value, WatermarkDetector, count_green, green_list, green_seed, p_value,
                               watermark_processor, z_score)

V = 256


# --- pure statistics, by hand ---

def test_z_score_by_hand():
    # g = 20 of T = 40 at gamma 1/4: expected 10, variance 40 * 1/4 * 3/4 = 7.5, z = 10 / sqrt(7.5) = 3.6515
    assert z_score(20, 40, 0.25) == pytest.approx(3.6515, abs=1e-4)
    # exactly the expected count: z = 0
    assert z_score(25, 100, 0.25) == 0.0
    # g = 0 of T = 12 at gamma 1/2: (0 - 6) / sqrt(3) = -3.4641
    assert z_score(0, 12, 0.5) == pytest.approx(-3.4641, abs=1e-4)
    # the notes' 25 tokens, all green at gamma 1/4: (25 - 6.25) / sqrt(4.6875) = 8.660
    assert z_score(25, 25, 0.25) == pytest.approx(8.6603, abs=1e-4)
    with pytest.raises(ValueError, match="no tokens"):
        z_score(0, 0, 0.25)
    with pytest.raises(ValueError, match="between 0"):
        z_score(5, 4, 0.25)


def test_p_value_by_hand():
    assert p_value(0.0) == pytest.approx(0.5)
    assert p_value(1.6449) == pytest.approx(0.05, abs=1e-5)
    assert p_value(3.0902) == pytest.approx(1e-3, rel=1e-3)
    assert p_value(4.0) == pytest.approx(3.167e-5, rel=1e-3)
    assert p_value(-10) == pytest.approx(1.0)


class Sevens:
    """A stub green list: only token 7 is green, whatever came before."""
    fraction = 0.25

    def is_green(self, prev, tok):
        return tok == 7


def test_repeated_bigrams_count_once_as_the_reference_does():
    ids = [5, 7, 5, 7, 5, 7, 9]
    # bigrams: (5,7) (7,5) (5,7) (7,5) (5,7) (7,9): 6 scored, 3 of them green;
    # distinct: (5,7) (7,5) (7,9): 3 scored, 1 green
    assert count_green(ids, Sevens(), ignore_repeated_ngrams=False) == (3, 6)
    assert count_green(ids, Sevens(), ignore_repeated_ngrams=True) == (1, 3)
    # (7, 7) twice in a row is one distinct bigram; the first id is context only
    assert count_green([3, 7, 7, 7], Sevens()) == (2, 2)
    assert count_green([7], Sevens()) == (0, 0)


# --- green lists and the processor ---

def test_green_list_size_determinism_and_key():
    g = green_list("secret", 12, V, 0.25)
    assert g.dtype == torch.bool and g.shape == (V,) and int(g.sum()) == 64
    assert torch.equal(g, green_list("secret", 12, V, 0.25))
    assert not torch.equal(g, green_list("secret", 13, V, 0.25))  # seeded by the previous token
    assert not torch.equal(g, green_list("other", 12, V, 0.25))   # and by the key
    assert green_seed("secret", 12) != green_seed("secret", 13)
    # every token is green after about gamma of the possible previous tokens
    share = torch.stack([green_list("secret", p, V, 0.25) for p in range(V)]).float().mean(0)  # (V,)
    assert 0.15 < float(share.min()) and float(share.max()) < 0.37
    with pytest.raises(ValueError, match="gamma"):
        green_list("k", 0, V, 1.0)
    with pytest.raises(ValueError, match="key"):
        GreenLists("", 0.25, V)


def test_processor_adds_delta_to_the_green_list_of_each_rows_last_token():
    proc = watermark_processor("k", 0.25, 3.0, vocab_size=V)
    logits = torch.randn(2, V)
    out = proc(logits, [[1, 2, 40], [9]])
    for row, prev in enumerate([40, 9]):
        g = green_list("k", prev, V, 0.25)
        assert torch.allclose(out[row][g], logits[row][g] + 3.0)
        assert torch.equal(out[row][~g], logits[row][~g])
    with pytest.raises(ValueError, match="vocabulary"):
        proc(torch.zeros(1, V + 1), [[1]])
    with pytest.raises(ValueError, match="delta"):
        watermark_processor("k", 0.25, -1.0, vocab_size=V)


# --- a tiny random model: found when watermarked, not when not ---

def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=V, block_size=128, n_layer=1, n_head=2, d_model=32))


def test_watermarked_samples_are_found_and_unwatermarked_ones_are_not():
    model = tiny_model()
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=60, seed=0)
    prompts = [[1]] * 16
    det = WatermarkDetector("k", 0.25, vocab_size=V)
    marked = generate(model, prompts, cfg, logits_processors=[watermark_processor("k", 0.25, 2.0, vocab_size=V)])
    plain = generate(model, prompts, cfg)
    z_marked = [det.score_ids([1] + ids)["z"] for ids in marked]
    z_plain = [det.score_ids([1] + ids)["z"] for ids in plain]
    # a near-uniform model: delta 2 takes the green share from 0.25 to about e^2/(e^2 + 3) = 0.71, z ~ 8 at T 60
    assert min(z_marked) > 4.0, z_marked
    assert max(z_plain) < 4.0, z_plain
    # the wrong key sees no watermark
    wrong = WatermarkDetector("not-k", 0.25, vocab_size=V)
    assert max(wrong.score_ids([1] + ids)["z"] for ids in marked) < 4.0


def test_binomial_p_value_by_hand():
    # P(Bin(4, 1/2) >= 3) = (4 + 1) / 16
    assert binomial_p_value(3, 4, 0.5) == pytest.approx(5 / 16)
    # P(Bin(3, 1/4) >= 3) = 1/64; P(>= 0) = 1
    assert binomial_p_value(3, 3, 0.25) == pytest.approx(1 / 64)
    assert binomial_p_value(0, 10, 0.25) == pytest.approx(1.0)
    # T = 50: z >= 4 means g >= 25, whose exact tail 1.23e-4 is four times the normal's 3.2e-5
    assert math.ceil(0.25 * 50 + 4 * math.sqrt(50 * 0.25 * 0.75)) == 25
    assert binomial_p_value(25, 50, 0.25) == pytest.approx(1.2251e-4, rel=1e-3)


def test_random_token_streams_stay_under_the_threshold():
    """Under the null the green count is Binomial(T, 1/4). Of 2000 random texts of 50 tokens about 0.25
    should reach z >= 4 (the exact tail above), so more than 3 would be a broken detector; the share at
    z >= 1.645 is near its nominal 5%."""
    rng = random.Random(0)
    det = WatermarkDetector("k", 0.25, vocab_size=V)
    zs = [det.score_ids([rng.randrange(V) for _ in range(51)])["z"] for _ in range(2000)]
    assert sum(z >= 4.0 for z in zs) <= 3
    assert 0.02 < sum(z >= 1.645 for z in zs) / len(zs) < 0.08
    assert abs(sum(zs) / len(zs)) < 0.1


# --- the commands ---

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("wm")
    words = ("tom sue cat dog ball park milk tree sun moon bird fish cake box hat red big sad happy ran saw "
             "had liked play went home friend little girl boy mom dad day night rain snow frog duck bee").split()
    texts = [" ".join(random.Random(i).sample(words, len(words))) for i in range(40)]
    tok = Tokenizer.train(texts, vocab_size=400, show_progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=1, n_head=2, d_model=32)
    save_checkpoint(root / "init", model=GPT(cfg), model_config=cfg, tokenizer_json=tok.to_str(), meta={"stage": "init"})
    return root / "init"


def word_texts(tok: Tokenizer, key: str | None, n: int, length: int = 40) -> list[str]:
    """Texts of whole-word tokens (" cat", " dog": they re-tokenize to themselves side by side). With a key
    each next word is a green one after the previous token, as a strong watermark would choose; without,
    any word. A random model's samples cannot stand in: its random byte tokens do not survive
    decode -> encode, so the text path is tested on these."""
    words = [t for t in range(tok.vocab_size) if (s := tok.decode([t])).startswith(" ") and s[1:].isalpha()
             and tok.encode(s) == [t]]
    assert len(words) >= 20
    green = GreenLists(key or "unused", 0.25, tok.vocab_size)
    rng = random.Random(0)
    out = []
    for _ in range(n):
        ids = [rng.choice(words)]
        for _ in range(length):
            pool = [w for w in words if green.is_green(ids[-1], w)] if key else words
            ids.append(rng.choice(pool or words))
        out.append(tok.decode(ids))
    return out


def test_detect_command_on_a_jsonl_file(ckpt, tmp_path, capsys):
    tok = Tokenizer.from_str((ckpt / "tokenizer.json").read_text())
    marked, plain = word_texts(tok, "s3cret", 5), word_texts(tok, None, 5)
    f = tmp_path / "texts.jsonl"
    f.write_text("".join(json.dumps({"story": t}) + "\n" for t in marked + plain))
    capsys.readouterr()
    results = run(["watermark", "detect", str(ckpt), "--key", "s3cret", "--file", str(f), "--field", "story",
                   "--out", str(tmp_path / "scores.jsonl")])
    printed = capsys.readouterr().out
    assert "| 1 |" in printed and "5 of 10 text(s) watermarked" in printed
    assert [r["watermarked"] for r in results] == [True] * 5 + [False] * 5, [round(r["z"], 1) for r in results]
    assert len((tmp_path / "scores.jsonl").read_text().splitlines()) == 10
    det = WatermarkDetector("s3cret", 0.25, vocab_size=tok.vocab_size, tokenizer=tok)
    assert run(["watermark", "detect", str(ckpt), "--key", "s3cret", "--text", marked[0]])[0] == det.score_text(marked[0])
    # the wrong key finds nothing
    assert not any(r["watermarked"] for r in run(["watermark", "detect", str(ckpt), "--key", "other", "--file", str(f),
                                                  "--field", "story"]))


def test_sample_and_chat_pass_the_watermark_to_the_sampler(ckpt, monkeypatch):
    seen = []

    def spy(fn):
        def wrapped(*args, **kwargs):
            seen.append(list(kwargs.get("logits_processors", ())))
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(sample, "generate", spy(sample.generate))
    common = dict(checkpoint=str(ckpt), num_samples=2, max_new_tokens=20, temperature=1.0, top_p=1.0, device="cpu")
    marked = sample.main(sample.SampleConfig(**common, watermark_key="s3cret", watermark_gamma=0.5, watermark_delta=4.0))
    plain = sample.main(sample.SampleConfig(**common))
    assert marked != plain
    (proc,), none = seen
    assert none == [] and (proc.green.key, proc.green.gamma, proc.delta) == ("s3cret", 0.5, 4.0)
    import tinygpt.chat as chat
    monkeypatch.setattr(chat, "stream", spy(chat.stream))
    out = io.StringIO()
    chat_main(ChatConfig(checkpoint=str(ckpt), device="cpu", max_new_tokens=5, seed=0, watermark_key="k2"),
              stdin=io.StringIO("hello\n"), stdout=out)
    (cproc,) = seen[-1]
    assert (cproc.green.key, cproc.green.gamma, cproc.delta) == ("k2", 0.25, 2.0)


def test_detect_errors_name_the_problem(ckpt, tmp_path):
    from tinygpt.watermark import DetectConfig, main
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "fine"}\n{"story": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*'text'"):
        main(DetectConfig(checkpoint=str(ckpt), key="k", file=str(f)))
    with pytest.raises(ValueError, match="--key"):
        main(DetectConfig(checkpoint=str(ckpt), text=["x"]))
    with pytest.raises(ValueError, match="either"):
        main(DetectConfig(checkpoint=str(ckpt), key="k"))
    assert math.isnan(WatermarkDetector("k", vocab_size=V).score_ids([5])["z"])
