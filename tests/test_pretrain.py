"""The pretraining stage end to end on a tiny corpus: exact resume, divergence, DDP equivalence."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinygpt.checkpoint import CheckpointError, resolve_checkpoint
from tinygpt.data.shards import prepare_shards
from tinygpt.runlog import read_metrics
from tinygpt.stages import pretrain
from tinygpt.stages.pretrain import PretrainConfig, TrainingDiverged
from tinygpt.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pretrain_data")
    rng = random.Random(0)
    names, things = ["Lily", "Tom", "Max", "Sue", "Ben"], ["ball", "kite", "cake", "hat", "box"]
    docs = []
    for _ in range(600):
        n, o = rng.choice(names), rng.choice(things)
        docs.append(f"Once upon a time, {n} had a {o}. {n} liked the {o}. One day the {o} was lost. {n} was sad.")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = Tokenizer.train(docs, vocab_size=300, show_progress=False)
    prepare_shards([corpus], tok, root / "data", val_fraction=0.1, seed=0, show_progress=False)
    return root / "data"


def _cfg(data_dir, out, **kw) -> PretrainConfig:
    base = dict(data=str(data_dir), out=str(out), model_size="0.5m", block_size=32, n_layer=2, d_model=32,
                n_head=2, batch_size=4, max_steps=8, warmup_steps=2, eval_every=4, eval_batches=2, log_every=1,
                save_every=100, device="cpu", dtype="float32", progress=False, seed=3)
    base.update(kw)
    return PretrainConfig(**base)


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(resolve_checkpoint(run) / "model.safetensors"))


def test_resume_is_bit_identical(data_dir, tmp_path):
    pretrain.main(_cfg(data_dir, tmp_path / "straight"))
    pretrain.main(_cfg(data_dir, tmp_path / "split", stop_after=3))
    assert resolve_checkpoint(tmp_path / "split").name == "step_00000003"
    pretrain.main(_cfg(data_dir, tmp_path / "split", resume=True))

    straight, split = _losses(tmp_path / "straight"), _losses(tmp_path / "split")
    assert [s for s, _ in straight] == list(range(1, 9))
    assert straight == split  # exact float equality, step by step, no duplicated steps
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert straight[-1][1] < straight[0][1]  # it learned something


def test_resume_without_checkpoint_is_an_error(data_dir, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        pretrain.main(_cfg(data_dir, tmp_path / "fresh", resume=True))


def test_nan_loss_stops_without_writing_a_checkpoint(data_dir, tmp_path, monkeypatch):
    real = pretrain.lm_loss
    calls = {"n": 0}

    def poisoned(logits, targets, mask=None):
        calls["n"] += 1
        loss = real(logits, targets, mask)
        return loss * float("nan") if calls["n"] > 4 else loss

    monkeypatch.setattr(pretrain, "lm_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="step 4"):
        pretrain.main(_cfg(data_dir, tmp_path / "nan", save_every=2, eval_every=100))
    # the step-2 and step-4 checkpoints exist; nothing was written for the NaN step
    assert resolve_checkpoint(tmp_path / "nan").name == "step_00000004"
    for w in _weights(tmp_path / "nan").values():
        assert torch.isfinite(w).all()


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_process(data_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--data", str(data_dir), "--model-size", "0.5m", "--block-size", "32", "--n-layer", "2", "--d-model", "32",
              "--n-head", "2", "--max-steps", "5", "--warmup-steps", "2", "--eval-every", "100", "--eval-batches", "2",
              "--log-every", "1",
              "--device", "cpu", "--dtype", "float32", "--progress", "false", "--seed", "3"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           "-m", "tinygpt.cli", "pretrain", "--out", str(tmp_path / "ddp"), "--batch-size", "2", *common]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    pretrain.main(_cfg(data_dir, tmp_path / "single", batch_size=4, max_steps=5, eval_every=100))
    ddp, single = _losses(tmp_path / "ddp"), _losses(tmp_path / "single")
    assert [s for s, _ in ddp] == [s for s, _ in single] == [1, 2, 3, 4, 5]
    for (_, a), (_, b) in zip(ddp, single):
        assert abs(a - b) < 1e-5
    # and they measure the same validation loss (each rank scores its rows of the global batch)
    val_ddp, val_single = ([r["val_loss"] for r in read_metrics(tmp_path / run / "metrics.jsonl") if "val_loss" in r]
                           for run in ("ddp", "single"))
    assert len(val_ddp) == len(val_single) == 1 and abs(val_ddp[0] - val_single[0]) < 1e-5
    wa, wb = _weights(tmp_path / "ddp"), _weights(tmp_path / "single")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_sigterm_saves_a_resumable_checkpoint(data_dir, tmp_path):
    import signal
    import time

    out = tmp_path / "term"
    cmd = [sys.executable, "-m", "tinygpt.cli", "pretrain", "--data", str(data_dir), "--out", str(out),
           "--model-size", "0.5m", "--block-size", "32", "--n-layer", "2", "--d-model", "32", "--n-head", "2",
           "--max-steps", "100000", "--save-every", "100000", "--eval-every", "100000", "--log-every", "1",
           "--device", "cpu", "--dtype", "float32", "--progress", "false"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.2)
    while time.time() < deadline and len(read_metrics(out / "metrics.jsonl")) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "interrupted: saving step" in output
    step = int(resolve_checkpoint(out).name.split("_")[1])
    assert step >= 3
    # the saved state resumes: one more step on top of it
    pretrain.main(_cfg(data_dir, out, max_steps=100000, stop_after=1, resume=True, save_every=100000, batch_size=16,
                       eval_every=100000, block_size=32, n_layer=2, d_model=32, n_head=2, seed=1337))
    assert resolve_checkpoint(out).name == f"step_{step + 1:08d}"
