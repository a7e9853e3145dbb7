"""LoRA fine-tuning through peft (--use_lora): only the adapters train and are saved, resume is exact, --merge_lora
writes a plain model with the adapted logits, and a target that matches nothing is one error line."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import train_ttt
from helpers import FAST, assert_close, fails, losses

peft = pytest.importorskip("peft", reason="peft is optional (pip install peft); CI installs it")


def train(folder, *flags):
    train_ttt.main([*FAST[2:], "--output_dir", str(folder), *flags])
    return folder


@pytest.fixture
def base(trained_run):
    """The final model of the session's shared TTT-Linear run (conftest.trained_run)."""
    return trained_run("ttt") / "final_model"


def test_only_adapters_train_and_resume_is_exact(tmp_path, base, capsys):
    flags = ["--init_from", str(base), "--use_lora", "--lora_rank", "4", "--max_train_steps", "6",
             "--save_checkpoint_freq", "3", "--learning_rate", "1e-2"]
    full = train(tmp_path / "full", *flags)
    out = capsys.readouterr().out
    assert "LoRA: rank 4, alpha 16" in out and "% of " in out
    adapters = load_file(full / "checkpoint-3" / "adapter_model.safetensors")
    assert adapters and all("lora_" in k for k in adapters)
    assert not (full / "checkpoint-3" / "model.safetensors").exists()
    assert sum(t.numel() for t in adapters.values()) < 0.1 * sum(t.numel() for t in load_file(
        base / "model.safetensors").values())
    assert any(t.abs().max() > 0 for k, t in adapters.items() if "lora_B" in k)  # B starts at 0: it trained
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    # the LoRA settings come from the checkpoint (the flags may be repeated or left out)
    train(resumed, "--init_from", str(base), "--max_train_steps", "6", "--save_checkpoint_freq", "3",
          "--learning_rate", "1e-2", "--resume_from_checkpoint", "latest")
    expected = losses(full)
    assert {s: v for s, v in losses(resumed).items()} == {s: v for s, v in expected.items() if s > 3}
    # the adapted model loads for evaluation (transformers + peft: the base from --init_from, then the adapters)
    from ttt_train.data import load_model

    adapted = load_model(str(full / "final_model"))
    ids = torch.randint(3, 200, (1, 40))
    plain = load_model(str(base))
    with torch.no_grad():
        assert (adapted(ids).logits - plain(ids).logits).abs().max() > 1e-4


def test_merge_lora_writes_a_plain_model_with_the_adapted_logits(tmp_path, base):
    from ttt_train.data import load_model

    run = train(tmp_path / "run", "--init_from", str(base), "--use_lora", "--max_train_steps", "3",
                "--learning_rate", "1e-2", "--save_checkpoint_freq", "3")
    merged = train(tmp_path / "merged", "--init_from", str(base), "--use_lora", "--max_train_steps", "3",
                   "--learning_rate", "1e-2", "--save_checkpoint_freq", "3", "--merge_lora")
    assert (merged / "final_model" / "model.safetensors").exists()
    assert not (merged / "final_model" / "adapter_config.json").exists()
    ids = torch.randint(3, 200, (2, 48))
    with torch.no_grad():
        assert_close("merged vs adapters", load_model(str(merged / "final_model"))(ids).logits,
                     load_model(str(run / "final_model"))(ids).logits, atol=1e-4)
    assert json.loads((merged / "final_model" / "config.json").read_text())["model_type"] == "ttt"


def test_lora_errors(tmp_path, base, capsys):
    out = ["--output_dir", str(tmp_path / "run")]
    fails(capsys, *FAST[2:], *out, "--init_from", str(base), "--use_lora", "--lora_target_modules", "nope_proj",
          match="--lora_target_modules ['nope_proj']")
    fails(capsys, *FAST, *out, "--use_lora", match="--use_lora adapts a saved model: give --init_from")
    fails(capsys, *FAST, *out, "--lora_rank", "4", match="--lora_rank applies to --use_lora")
    assert not (tmp_path / "run" / "final_model").exists()


@pytest.mark.parametrize("model_type", ["ttt", "transformer", "e2e"])
def test_default_targets_per_model_type(model_type):
    from ttt_train import models

    run = train_ttt.parse_args(["--model_type", model_type])
    model = models.build_model(models.build_config(run.model, run.e2e, 300, 1, 2))
    wrapped = models.apply_lora(model, dict(models.LORA_DEFAULTS))
    adapted = {name.rsplit(".lora_A", 1)[0].rsplit(".", 1)[-1] for name, _ in wrapped.named_parameters()
               if ".lora_A." in name}
    expected = {"ttt": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
                "transformer": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
                "e2e": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}}[model_type]
    assert adapted == expected
    assert not any("prime_mlp" in name and "lora_" in name for name, _ in wrapped.named_parameters())
    assert all(("lora_" in name) == p.requires_grad for name, p in wrapped.named_parameters())


@pytest.fixture(scope="module")
def e2e_base(tmp_path_factory):
    return train(tmp_path_factory.mktemp("e2e") / "run", "--model_type", "e2e", "--model_size", "tiny",
                 "--mini_batch_size", "16", "--sliding_window", "32", "--max_train_steps", "2") / "final_model"


def test_lora_on_an_e2e_model_meta_learns_through_the_frozen_inner_loop(e2e_base):
    """With theta(0) frozen, the adapters' gradient is still the meta-gradient through the inner loop: the same as
    when every weight trains (second-order terms included), and not zero."""
    from ttt_train import models
    from ttt_train.data import load_model

    model = models.apply_lora(load_model(str(e2e_base)).train(), dict(models.LORA_DEFAULTS))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at 0 (then A's gradient is 0): a non-degenerate point
            p.data.normal_(0, 0.02)
    ids = torch.randint(3, 259, (2, 64))

    def adapter_gradients():
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}

    frozen = adapter_gradients()
    assert frozen and all(g.abs().max() > 0 for g in frozen.values())
    for p in model.parameters():
        p.requires_grad_(True)
    everything = adapter_gradients()
    for name, grad in frozen.items():
        assert_close(f"gradient of {name}", grad, everything[name], atol=1e-6, rtol=1e-4)


def test_lora_on_an_e2e_model_trains_through_the_cli(tmp_path, e2e_base):
    run = train(tmp_path / "run", "--init_from", str(e2e_base), "--use_lora", "--max_train_steps", "6",
                "--learning_rate", "3e-2", "--save_checkpoint_freq", "6")
    adapters = load_file(run / "checkpoint-6" / "adapter_model.safetensors")
    assert any(t.abs().max() > 0 for k, t in adapters.items() if "lora_B" in k)
    assert len(set(losses(run).values())) == 6  # the loss moves step by step
