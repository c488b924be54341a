"""checkpoint.py: round trip, atomic replacement, refusals and errors that name the file."""

import json
import random

import numpy as np
import pytest
import torch

from tinygpt.checkpoint import (CheckpointError, capture_rng_state, latest_checkpoint, load_config, load_meta,
                                load_model, load_trainer_state, resolve_checkpoint, restore_rng_state,
                                save_checkpoint, save_training_checkpoint)
from tinygpt.model import GPT, ModelConfig

CFG = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=16)


def _model(seed=0, cfg=CFG):
    torch.manual_seed(seed)
    return GPT(cfg)


def test_round_trip_same_logits_and_tied_weights(tmp_path):
    model = _model()
    save_checkpoint(tmp_path / "ck", model=model, model_config=CFG, tokenizer_json='{"x": 1}',
                    meta={"stage": "test", "step": 3})
    loaded, cfg = load_model(tmp_path / "ck")
    assert cfg == CFG
    x = torch.randint(0, 64, (2, 8))
    assert torch.equal(model(x), loaded(x))
    assert load_meta(tmp_path / "ck")["step"] == 3
    assert (tmp_path / "ck" / "tokenizer.json").read_text() == '{"x": 1}'
    # the tied matrix is stored once and stays shared after loading
    assert loaded.lm_head.weight.data_ptr() == loaded.tok_emb.weight.data_ptr()


def test_replacing_keeps_no_temp_dirs(tmp_path):
    save_checkpoint(tmp_path / "ck", model=_model(0), model_config=CFG, tokenizer_json=None, meta={})
    save_checkpoint(tmp_path / "ck", model=_model(1), model_config=CFG, tokenizer_json=None, meta={"v": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert load_meta(tmp_path / "ck")["v"] == 2


def test_nan_weights_are_never_written(tmp_path):
    model = _model()
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    with pytest.raises(CheckpointError, match="NaN"):
        save_checkpoint(tmp_path / "ck", model=model, model_config=CFG, tokenizer_json=None, meta={})
    assert not (tmp_path / "ck").exists()


def test_truncated_weights_error_names_file(tmp_path):
    save_checkpoint(tmp_path / "ck", model=_model(), model_config=CFG, tokenizer_json=None, meta={},
                    trainer_state={"step": 1})
    w = tmp_path / "ck" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path / "ck")
    ts = tmp_path / "ck" / "trainer_state.pt"
    ts.write_bytes(ts.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="trainer_state.pt"):
        load_trainer_state(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_config(tmp_path / "ck")


def test_missing_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        resolve_checkpoint(tmp_path / "empty")
    assert latest_checkpoint(tmp_path / "empty") is None


def test_training_checkpoints_latest_pointer_and_pruning(tmp_path):
    for step in (10, 20, 30):
        save_training_checkpoint(tmp_path, step, keep_last=2, model=_model(step), model_config=CFG,
                                 tokenizer_json=None, meta={"step": step}, trainer_state={"step": step})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_00000020", "step_00000030"]
    assert resolve_checkpoint(tmp_path).name == "step_00000030"
    assert load_trainer_state(tmp_path)["step"] == 30
    # a stale temp dir from a killed writer does not confuse readers
    (tmp_path / "checkpoints" / ".step_00000040.tmp-999").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_00000030"


def test_scalar_head_added_on_load(tmp_path):
    save_checkpoint(tmp_path / "ck", model=_model(), model_config=CFG, tokenizer_json=None, meta={})
    model, cfg = load_model(tmp_path / "ck", config_overrides={"scalar_head": True})
    assert cfg.scalar_head
    hidden = model(torch.randint(0, 64, (1, 4)), return_hidden=True)
    assert model.scalar(hidden).shape == (1, 4)
    # the other way round (a config lacking weights the file has) is an error
    save_checkpoint(tmp_path / "rm", model=model, model_config=cfg, tokenizer_json=None, meta={})
    (tmp_path / "rm" / "config.json").write_text(json.dumps({**cfg.to_dict(), "scalar_head": False}))
    with pytest.raises(CheckpointError, match="does not match"):
        load_model(tmp_path / "rm")


def test_rng_state_round_trip_through_weights_only(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_kill_between_the_two_renames_of_a_resave_still_resumes(tmp_path, monkeypatch):
    """Re-saving the step `latest` names swaps directories in two renames; a kill between them used to
    leave `latest` naming nothing, with the complete checkpoint set aside in .step_N.old-PID."""
    from pathlib import Path

    save_training_checkpoint(tmp_path, 10, model=_model(1), model_config=CFG, tokenizer_json=None,
                             meta={"step": 10}, trainer_state={"step": 10})
    real_rename = Path.rename

    def killed_after_first_rename(self, target):
        if ".old-" in str(target):
            real_rename(self, target)
            raise KeyboardInterrupt  # the process dies here
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        save_training_checkpoint(tmp_path, 10, model=_model(2), model_config=CFG, tokenizer_json=None,
                                 meta={"step": 10, "again": True}, trainer_state={"step": 10})
    monkeypatch.setattr(Path, "rename", real_rename)
    root = tmp_path / "checkpoints"
    assert not (root / "step_00000010").exists() and list(root.glob(".step_00000010.old-*"))
    ckpt = latest_checkpoint(tmp_path)  # restored from the set-aside copy
    assert ckpt.name == "step_00000010" and load_trainer_state(tmp_path)["step"] == 10
    model, _ = load_model(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), _model(1).state_dict().values()))
    # the next save clears what the kill left: the new checkpoint's temp dir and any set-aside copy
    assert list(root.glob(".step_00000010.tmp-*"))
    save_training_checkpoint(tmp_path, 20, model=_model(3), model_config=CFG, tokenizer_json=None,
                             meta={"step": 20}, trainer_state={"step": 20})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000010", "step_00000020"]
