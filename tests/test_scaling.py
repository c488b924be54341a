"""The scaling fit against points drawn from a known law L = a C^b + c (exact and noisy), its errors,
and (slow) a tiny ladder through pretrain end to end."""

import json

import numpy as np
import pytest

from tinygpt.scaling import ScalingConfig, fit_power_law, main, power_law
from tinygpt.tokenizer import Tokenizer


def test_power_law_by_hand():
    # 4 * 100^-0.5 + 1 = 4 / 10 + 1
    assert power_law(100.0, 4.0, -0.5, 1.0) == pytest.approx(1.4)


def test_fit_recovers_a_known_law_and_predicts_15x_past_it():
    a, b, c = 60.0, -0.12, 1.4
    C = np.geomspace(3e9, 4e10, 5)
    fit = fit_power_law(C, power_law(C, a, b, c))
    assert fit["b"] == pytest.approx(b, rel=0.02) and fit["c"] == pytest.approx(c, abs=0.01)
    assert fit["rmse"] < 1e-3
    far = 15 * C[-1]
    assert power_law(far, fit["a"], fit["b"], fit["c"]) == pytest.approx(power_law(far, a, b, c), rel=1e-3)


def test_fit_with_noise_predicts_within_a_few_percent():
    rng = np.random.default_rng(0)
    a, b, c = 60.0, -0.12, 1.4
    C = np.geomspace(3e9, 4e10, 6)
    L = power_law(C, a, b, c) * (1 + 0.005 * rng.standard_normal(len(C)))  # 0.5% noise per run
    fit = fit_power_law(C, L)
    far = 15 * C[-1]
    assert abs(power_law(far, fit["a"], fit["b"], fit["c"]) / power_law(far, a, b, c) - 1) < 0.03


def test_fit_errors_are_clear():
    with pytest.raises(ValueError, match="three or more"):
        fit_power_law([1e9, 2e9], [3.0, 2.9])
    with pytest.raises(ValueError, match="does not fall"):
        fit_power_law([1e9, 2e9, 4e9], [2.0, 2.5, 3.0])
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([0, 2e9, 4e9], [3.0, 2.5, 2.0])


def test_ladder_config_errors(tmp_path):
    with pytest.raises(ValueError, match="--data"):
        main(ScalingConfig())
    with pytest.raises(ValueError, match="three"):
        main(ScalingConfig(data=str(tmp_path), widths=[8, 12]))
    with pytest.raises(ValueError, match="past the ladder"):
        main(ScalingConfig(data=str(tmp_path), widths=[8, 12, 16], target_width=16))


@pytest.mark.slow
def test_tiny_ladder_end_to_end(tmp_path):
    tok = Tokenizer.train(["a tiny corpus for a tiny tokenizer"] * 4, vocab_size=300, show_progress=False)
    V = tok.vocab_size
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 20000), ("val", 4000)):
        # a learnable stream: each token is the previous one plus 1 or 2 (mod V)
        steps = rng.integers(1, 3, size=n)
        np.cumsum(steps).astype(np.int64).__mod__(V).astype(np.uint16).tofile(data / f"{split}.bin")
    (data / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": V, "bos_id": 1, "eos_id": 2,
                                                "train_tokens": 20000, "val_tokens": 4000}))
    (data / "tokenizer.json").write_text(tok.to_str())
    result = main(ScalingConfig(data=str(data), out=str(tmp_path / "ladder"), widths=[8, 12, 16], target_width=24,
                                tokens_per_param=1.0, block_size=32, batch_size=8, eval_batches=4, device="cpu"))
    assert len(result["ladder"]) == 3 and result["compute_ratio"] > 1
    assert all(r["val_loss"] > 0 for r in result["ladder"] + [result["target"]])
    assert (tmp_path / "ladder" / "scaling.png").is_file()
    saved = json.loads((tmp_path / "ladder" / "scaling.json").read_text())
    assert saved["relative_error"] == pytest.approx(result["relative_error"])
