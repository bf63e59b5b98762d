"""What only a GPU can show (skipped without CUDA; bench/gpu_check.sh runs them on one):
- the attention kernel taken under bf16 (flash-attn when installed, else SDPA) agrees with fp32 attention;
- bf16 training through the real loop on one GPU: finite losses that fall, with one host sync per step
  from gptds (torch's sync debug mode counts every synchronising call in the step path);
- compiled blocks train like eager ones, and sampling after training does not recompile;
- chat fine-tuning (the output layer on the trained positions only, their indices found on the host) keeps the
  same number of host syncs in every step;
- two ranks on one GPU with a process group that, like NCCL, refuses CPU tensors ("cuda:gloo"): the loop,
  evaluation, HellaSwag, samples and checkpoints under ZeRO-2 and ZeRO-3, and `gptds rl` (rollouts, rewards
  all-reduced, held-out pass@k) under ZeRO-2 and ZeRO-3;
- Hugging Face logits parity on the GPU."""

import json
import os
import subprocess
import warnings

import pytest
import torch
from conftest import BIN, ROOT, TINY_RUN, free_port

from gptds.__main__ import build_parser
from gptds.config import run_config_from_flags
from gptds.model import GPT, GPTConfig, attention_backend

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
DEVICE = torch.device("cuda", 0)


def test_bf16_attention_path_agrees_with_fp32():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2-micro")).to(DEVICE).eval()
    idx = torch.randint(0, 50257, (4, 256), device=DEVICE)
    with torch.no_grad():
        reference = model(idx)[0].float()
        got = model.to(torch.bfloat16)(idx)[0].float()
    assert attention_backend(DEVICE, torch.bfloat16) in ("flash-attn", "sdpa")
    assert (got - reference).abs().max().item() < 0.1 * reference.abs().max().item()


def _train(tmp_path, text_data, *flags) -> object:
    from gptds.train import train
    args = build_parser().parse_args(["pretrain", "--data_dir", str(text_data), "--log_dir", str(tmp_path),
                                      "--deepspeed_config", "zero2", *TINY_RUN, *flags])
    return train(run_config_from_flags("pretrain", args))


def count_syncs(monkeypatch) -> list[list[str]]:
    """Every synchronising call in each optimizer step from here on (torch's sync debug mode), step by step."""
    from gptds import train as train_module
    syncs = []
    step = train_module.optimizer_step

    def counted(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                return step(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)
            syncs.append([str(w.message) for w in caught if "synchroniz" in str(w.message)])
    monkeypatch.setattr(train_module, "optimizer_step", counted)
    return syncs


def test_chat_fine_tuning_on_the_trained_positions_syncs_the_same_every_step(tmp_path, chat_data, monkeypatch):
    from gptds.train import train
    syncs = count_syncs(monkeypatch)
    args = build_parser().parse_args(["finetune", "--data_dir", str(chat_data), "--log_dir", str(tmp_path),
                                      "--deepspeed_config", "zero2", *TINY_RUN, "--max_steps", "8"])
    assert train(run_config_from_flags("finetune", args)).state.step == 8
    counts = [len(x) for x in syncs]
    print(f"host syncs per chat fine-tuning step (all libraries): {counts}")
    assert len(set(counts[2:])) == 1, counts  # no sync whose count depends on the batch's masks


def test_bf16_training_on_one_gpu_syncs_once_per_step(tmp_path, text_data, monkeypatch):
    syncs = count_syncs(monkeypatch)
    s = _train(tmp_path, text_data, "--max_steps", "12", "--grad_accum_steps", "2", "--lr", "3e-3")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "loss" in line]
    assert s.state.step == 12 and all(map(lambda v: v == v, losses)) and losses[-1] < losses[0]
    # every synchronising call in a step, gptds's one (the all-reduced sums read back) and DeepSpeed's: printed
    # for the GPU check's log; a data-dependent sync would make the count vary from step to step
    counts = [len(x) for x in syncs]
    print(f"host syncs per optimizer step (all libraries): {counts}; first step's: {syncs[0][:6]}")
    assert min(counts[2:]) >= 1 and len(set(counts[2:])) == 1, counts


def test_compiled_blocks_train_like_eager_and_sampling_does_not_recompile(tmp_path, text_data):
    from torch._dynamo.utils import counters
    eager = _train(tmp_path / "eager", text_data, "--max_steps", "5", "--no-compile", "--deepspeed_config",
                   "zero2_fp32")
    compiled = _train(tmp_path / "compiled", text_data, "--max_steps", "5", "--compile", "--deepspeed_config",
                      "zero2_fp32")

    def losses(folder):
        return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()
                if "loss" in line]
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-3)
    frames_before = counters["stats"]["unique_graphs"]
    from gptds.generate import sample
    sample(compiled.eng.module, ["ROMEO:", "The meaning of life is"], 20, seed=1, device=DEVICE)
    assert counters["stats"]["unique_graphs"] == frames_before  # sampling runs the eager blocks
    del eager


@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_two_ranks_on_one_gpu_with_a_cuda_only_process_group(tmp_path, text_data, config):
    """NCCL's rule without two GPUs: backend "cuda:gloo" registers gloo for CUDA tensors only, so a CPU
    tensor in any collective gptds starts raises "No backend type associated with device type cpu"."""
    env = {**os.environ, "GPTDS_DIST_BACKEND": "cuda:gloo", "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m",
                           "gptds", "pretrain", "--data_dir", str(text_data), "--log_dir", str(tmp_path),
                           "--deepspeed_config", config, *TINY_RUN, "--max_steps", "4", "--eval_interval", "2",
                           "--eval_batches", "2", "--hellaswag_interval", "4", "--hellaswag_limit", "8",
                           "--generate_interval", "4", "--generate_max_new_tokens", "8", "--checkpoint_interval", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "step_00000004" / "meta.json").is_file()


def test_hf_logits_parity_on_the_gpu():
    transformers = pytest.importorskip("transformers")
    from gptds.weights import hf_to_gptds_state_dict, model_from_state_dict
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=4, n_embd=128, n_positions=128))
    ours = model_from_state_dict(GPTConfig(block_size=128, n_layer=2, n_head=4, n_embd=128),
                                 hf_to_gptds_state_dict(hf.state_dict()))
    idx = torch.randint(0, 50257, (2, 64), device=DEVICE)
    with torch.no_grad():
        a = hf.to(DEVICE).eval()(idx).logits
        b = ours.to(DEVICE).eval()(idx)[0]
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)



@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_rl_on_two_ranks_of_one_gpu_with_a_cuda_only_process_group(tmp_path, chat_data, config):
    """`gptds rl` under NCCL's rule: a chat model fine-tuned briefly, then rollouts, rewards, the policy step,
    held-out pass@k and a checkpoint on two ranks whose process group refuses CPU tensors."""
    from gptds.train import train
    args = build_parser().parse_args(["finetune", "--data_dir", str(chat_data), "--log_dir", str(tmp_path / "sft"),
                                      "--deepspeed_config", "zero2", *TINY_RUN, "--max_steps", "2"])
    train(run_config_from_flags("finetune", args))
    env = {**os.environ, "GPTDS_DIST_BACKEND": "cuda:gloo", "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m",
                           "gptds", "rl", "--pretrained_checkpoint", str(tmp_path / "sft" / "checkpoints"),
                           "--log_dir", str(tmp_path / "rl"), "--deepspeed_config", config, "-B", "16",
                           "--max_steps", "3", "--eval_task_interval", "3", "--generate_interval", "3"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logged = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in logged if "reward" in r]) == 3 and any("arithmetic_pass@8" in r for r in logged)
