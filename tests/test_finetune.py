"""Fine-tuning specifics: the loss counts response tokens only, and the overfitting warning."""

import pytest
import torch

from gptds.data.loaders import build_loader
from gptds.model import GPT, GPTConfig
from gptds.train import lr_at, overfitting_warning


def test_finetune_loss_counts_response_tokens_only(dolly_data):
    loader = build_loader(dolly_data, "train", 2, 128, 0, 1, seed=0)
    x, y = loader.next_batch()
    counted = y != -100
    assert 0 < counted.sum() < counted.numel()  # some prompt positions are excluded
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny")).eval()
    with torch.no_grad():
        model.transformer.wte.weight.normal_(std=1.0)  # confident, position-dependent predictions
        logits, loss = model(x, y)
        manual = torch.nn.functional.cross_entropy(logits[counted], y[counted])
        assert abs(loss.item() - manual.item()) < 1e-5
        # The masked positions do hold predictable targets: counting them (the next input token) moves the loss.
        y_all = y.clone()
        y_all[:, :-1][~counted[:, :-1]] = x[:, 1:][~counted[:, :-1]]
        _, loss_all = model(x, y_all)
        assert abs(loss_all.item() - loss.item()) > 1.0


def test_overfitting_warning_only_when_val_rises_while_train_falls():
    assert overfitting_warning(None, (2.0, 1.0)) is None
    assert overfitting_warning((2.0, 1.5), (1.9, 1.4)) is None   # both fall: fine
    assert overfitting_warning((2.0, 1.5), (2.1, 1.6)) is None   # both rise: not overfitting
    message = overfitting_warning((2.0, 1.5), (2.1, 1.4))
    assert "validation loss rose (2.0000 -> 2.1000)" in message and "training loss fell" in message


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    lrs = [lr_at(s, 1e-3, 1e-4, 10, 100) for s in range(120)]
    assert lrs[0] == 1e-4 and lrs[9] == 1e-3
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:101]))
    assert abs(lrs[55] - (1e-4 + 0.5 * 0.9e-3)) < 1e-12  # halfway through the cosine
    assert lrs[100] == lrs[119] == 1e-4


@pytest.mark.slow
def test_finetune_without_max_steps_trains_one_epoch(dolly_data, tmp_path, capsys):
    """Fine-tuning's default length: one pass over the training split (packed rows / global batch)."""
    from gptds.__main__ import main
    loader = build_loader(dolly_data, "train", 8, 128, 0, 1, seed=1337)
    epoch_steps = loader.rows_per_epoch() // 8
    assert epoch_steps == loader.batches_per_epoch() > 1
    assert main(["finetune", "--data_dir", str(dolly_data), "--log_dir", str(tmp_path), "--model", "tiny", "-B", "8",
                 "-T", "128", "--eval_interval", "0", "--generate_interval", "0", "--checkpoint_interval", "0",
                 "--log_interval", "1", "--deepspeed_config", "zero2_fp32", "--optimizer", "adamw"]) == 0
    out = capsys.readouterr().out
    assert f"{epoch_steps} steps (one epoch)" in out
    assert f"step {epoch_steps}/{epoch_steps} | loss" in out and f"step {epoch_steps + 1}/" not in out
