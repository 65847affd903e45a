"""Self-generated replay: the dense model's own samples, mixed into the training blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import tiny_model

from hf_oto.errors import ConfigError
from hf_oto.replay import generate_replay, mix_replay


def test_generated_sequences_have_the_length_asked_start_with_the_start_token_and_follow_the_seed():
    model = tiny_model("llama").train()
    before = torch.random.get_rng_state()
    a = generate_replay(model, 5, 9, start_token_id=1, seed=3, batch_size=2, progress=False)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's random stream is untouched
    assert model.training  # put back as it was
    assert a.shape == (5, 9) and a.dtype == torch.long and bool((a[:, 0] == 1).all())
    assert torch.equal(a, generate_replay(model, 5, 9, start_token_id=1, seed=3, batch_size=2, progress=False))
    assert not torch.equal(a, generate_replay(model, 5, 9, start_token_id=1, seed=4, batch_size=2, progress=False))
    with pytest.raises(ConfigError, match="at least one sequence"):
        generate_replay(model, 0, 9, start_token_id=1)


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_the_mix_draws_generated_rows_at_the_fraction_and_keeps_every_training_block_once(fraction):
    blocks = torch.arange(200 * 4).reshape(200, 4)  # rows 0..199 (values < 800)
    generated = 1000 + torch.arange(10 * 4).reshape(10, 4)  # rows tagged by values >= 1000
    mixed = mix_replay(blocks, generated, fraction)
    is_gen = mixed[:, 0] >= 1000
    assert abs(float(is_gen.float().mean()) - fraction) < 0.03
    kept = mixed[~is_gen]
    assert sorted(kept[:, 0].tolist()) == blocks[:, 0].tolist()  # each training block exactly once
    assert set(mixed[is_gen][:, 0].tolist()) == set(generated[:, 0].tolist())
    front = is_gen[:len(generated) * round(1 / fraction)]  # the calibration front holds the same share
    assert float(front.float().mean()) == pytest.approx(fraction)


def test_bad_mixes_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="fraction"):
        mix_replay(torch.zeros(4, 3), torch.zeros(2, 3), 1.0)
    with pytest.raises(ConfigError, match="shape"):
        mix_replay(torch.zeros(4, 3), torch.zeros(2, 5), 0.5)


def test_the_main_job_trains_on_the_models_own_samples_at_the_replay_fraction(tmp_path, monkeypatch):
    from jobs import SMALL

    import hf_oto.replay
    from hf_oto.job import prune_job

    made, seen = [], {}
    generate = hf_oto.replay.generate_replay

    def recorded(*args, **kwargs):
        made.append(generate(*args, **kwargs))
        return made[-1]

    class Recording(prune_job.HFOTOTrainer):
        def __init__(self, *args, **kwargs):
            seen["train"] = kwargs["train_dataset"]
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(hf_oto.replay, "generate_replay", recorded)
    monkeypatch.setattr(prune_job, "HFOTOTrainer", Recording)
    summary = prune_job.run("configs/quickstart.yaml", SMALL + [
        "--replay_fraction", "0.5", "--output_dir", str(tmp_path / "run"), "--pruned_output_dir", str(tmp_path / "p")])
    assert summary.params_after < summary.params_before
    assert len(made) == 1 and made[0].shape == (16, 32)  # 8 steps x 4 sequences x 0.5, of block_size tokens
    rows = torch.stack([seen["train"][i]["input_ids"] for i in range(len(seen["train"]))])
    replayed = (rows[:, None, :] == made[0][None]).all(-1).any(-1)
    assert abs(float(replayed.float().mean()) - 0.5) < 0.05
    from hf_oto.manifest import Manifest

    assert Manifest.read(summary.output).replay_fraction == 0.5  # the export says what it was trained on
    assert "50% of the training draws were text the source model sampled itself" in \
        (Path(summary.output) / "README.md").read_text()


@pytest.mark.parametrize(("extra", "message"), [(["--replay_fraction", "1.0"], "replay_fraction must be in"),
                                                (["--replay_fraction", "0.2", "--replay_samples", "0"],
                                                 "replay_samples must be at least 1")])
def test_bad_replay_settings_are_refused_before_any_work(tmp_path, extra, message):
    from jobs import SMALL

    from hf_oto.job.prune_job import run

    with pytest.raises(ConfigError, match=message):
        run("configs/quickstart.yaml", SMALL + extra + ["--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_replay_is_refused_with_streaming():
    from hf_oto.data import DataArguments, check_data_args

    with pytest.raises(ConfigError, match="streaming"):
        check_data_args(DataArguments(text_source="python-stdlib", streaming=True, replay_fraction=0.2))
