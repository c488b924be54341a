"""The demo pipeline on a tiny config: every stage runs, a rerun skips what is complete."""

import json

from tinygpt.pipeline import DemoConfig, main


def test_demo_end_to_end_and_rerun_skips(tmp_path, capsys):
    cfg = DemoConfig(out=str(tmp_path / "demo"), n_stories=300, vocab_size=400, model_size="0.5m", block_size=64,
                     batch_size=4, max_steps=6, eval_every=3, n_samples=4, device="cpu", dtype="float32")
    summary = main(cfg)
    out = tmp_path / "demo"
    for f in ("world/world.json", "tokenizer/tokenizer.json", "data/meta.json", "pretrain/metrics.jsonl",
              "pretrain/loss.png", "samples.md", "summary.json"):
        assert (out / f).exists(), f
    assert summary["n"] == 4 and 0.0 <= summary["grammar"] <= 1.0
    assert json.loads((out / "summary.json").read_text())["step"] == 6
    capsys.readouterr()
    main(cfg)  # everything is complete: each stage is skipped
    printed = capsys.readouterr().out
    assert printed.count("skip:") == 4
