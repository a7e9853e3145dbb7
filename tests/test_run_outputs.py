"""What a run leaves besides checkpoints: best_model/ (--save_best), training_summary.json, and the document limits
--max_train_examples / --max_eval_examples."""

import json
import types

import datasets
from safetensors.torch import load_file

from helpers import assert_close, metrics, run
from ttt_train import data


def eval_losses(folder) -> dict:
    return {r["step"]: r["eval_loss"] for r in metrics(folder) if "eval_loss" in r}


def test_best_model_is_the_lowest_validation_loss_across_resumes_and_the_summary_says_so(tmp_path):
    common = ["--eval_steps", "2", "--save_best", "--save_checkpoint_freq", "2", "--save_total_limit", "10"]
    folder = run(tmp_path, *common, "--max_train_steps", "4")
    first = eval_losses(folder)
    assert first[4] < first[2]  # learning: the best is step 4
    # resumed with a learning rate that wrecks the model: later evaluations are worse, the best stays at step 4
    run(tmp_path, *common, "--max_train_steps", "8", "--learning_rate", "0.5", "--lr_scheduler_type", "constant",
        "--resume_from_checkpoint", "latest")
    losses = eval_losses(folder)
    assert sorted(losses) == [2, 4, 6, 8] and min(losses[6], losses[8]) > losses[4]
    best = json.loads((folder / "best_model" / "trainer_state.json").read_text())
    assert (best["step"], best["eval_loss"]) == (4, losses[4])
    weights, at_step_4 = load_file(folder / "best_model" / "model.safetensors"), load_file(
        folder / "checkpoint-4" / "model.safetensors")
    assert weights.keys() == at_step_4.keys() and weights
    for name, tensor in weights.items():
        assert_close(name, tensor, at_step_4[name], atol=0)
    summary = json.loads((folder / "training_summary.json").read_text())
    assert (summary["steps"], summary["tokens"]) == (8, 8 * 2 * 64)  # FAST: 2 sequences of 64 tokens per step
    assert (summary["best_step"], summary["best_eval_loss"]) == (4, losses[4])
    assert summary["final_eval_loss"] == losses[8] and summary["parameters"] > 1e6
    assert summary["train_time_sec"] > 0 and summary["tokens_per_sec"] > 0
    expected_perplexity = 2.718281828459045 ** losses[4]
    assert abs(summary["best_eval_perplexity"] - expected_perplexity) < 1e-6 * expected_perplexity


def test_without_save_best_no_best_model(tmp_path):
    folder = run(tmp_path, "--max_train_steps", "2", "--eval_steps", "1")
    assert not (folder / "best_model").exists()
    summary = json.loads((folder / "training_summary.json").read_text())
    assert summary["best_step"] is None and summary["final_eval_loss"] == eval_losses(folder)[2]


def test_document_limits(tmp_path):
    table = datasets.Dataset.from_dict({"text": [f"document {i}" for i in range(10)]})
    assert data.first_documents(table, 3)["text"] == ["document 0", "document 1", "document 2"]
    assert len(data.first_documents(table, 30)) == 10 and data.first_documents(table, None) is table
    stream = table.to_iterable_dataset()
    assert [row["text"] for row in data.first_documents(stream, 2)] == ["document 0", "document 1"]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"story {i} " * 5}) + "\n" for i in range(200)))
    folder = run(tmp_path, "--dataset_name", str(corpus), "--max_train_examples", "3", "--max_eval_examples", "2",
                 "--max_train_steps", "12", "--save_checkpoint_freq", "12")
    state = json.loads((folder / "checkpoint-12" / "trainer_state.json").read_text())
    # 12 steps x 128 tokens read 3 short documents (about 50 bytes each) over and over: many epochs
    assert state["data"][0]["epoch"] >= 8


def test_resuming_from_an_earlier_checkpoint_sets_aside_a_later_best_model(tmp_path):
    common = ["--eval_steps", "2", "--save_best", "--save_checkpoint_freq", "2", "--save_total_limit", "10",
              "--max_train_steps", "4"]
    folder = run(tmp_path, *common)
    assert json.loads((folder / "best_model" / "trainer_state.json").read_text())["step"] == 4
    run(tmp_path, *common, "--resume_from_checkpoint", str(folder / "checkpoint-2"))
    set_aside = list((folder / "abandoned").glob("*/best_model"))
    assert len(set_aside) == 1 and json.loads((set_aside[0] / "trainer_state.json").read_text())["step"] == 4
    # the resumed branch's own evaluations decide its best (its step 2 one, the branch point, is not re-run)
    assert json.loads((folder / "best_model" / "trainer_state.json").read_text())["step"] == 4


def test_epochs_set_the_step_count_from_the_data_also_on_resume(tmp_path, capsys):
    import re
    import shutil

    from helpers import FAST, fails, losses

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{i:03d}" + "x" * 28}) + "\n" for i in range(60)))  # 31 bytes
    flags = ["--dataset_name", str(corpus), "--epochs", "2", "--save_checkpoint_freq", "10"]
    full = run(tmp_path, *flags, out="full")
    line = re.search(r"--num_train_epochs 2: (\d+) training tokens, (\d+) blocks of 64, 2 per step -> (\d+) steps",
                     capsys.readouterr().out)
    tokens, blocks, steps = map(int, line.groups())
    assert tokens % 32 == 0 and 50 <= tokens // 32 < 60  # 32 tokens per document (31 bytes and EOS), minus validation
    assert blocks == tokens // 64 and steps == -(-2 * blocks // 2)
    assert max(losses(full)) == steps and json.loads((full / "training_summary.json").read_text())["steps"] == steps
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-10", resumed / "checkpoint-10")
    run(tmp_path, *flags, "--resume_from_checkpoint", "latest", out="resumed")
    assert losses(resumed) == {s: v for s, v in losses(full).items() if s > 10}
    fails(capsys, *FAST, "--output_dir", str(tmp_path / "x"), "--epochs", "1", "--max_steps", "5",
          match="give --max_train_steps or --num_train_epochs, not both")
    fails(capsys, *FAST, "--output_dir", str(tmp_path / "y"), *flags, "--streaming", "--streaming_eval_docs", "5",
          match="--num_train_epochs needs training data of known size")


def test_alias_spellings_and_did_you_mean(capsys):
    import pytest

    import train_ttt

    args = train_ttt.parse_args(["--max_steps", "7", "--bf16", "--batch-size", "3", "--seq-len", "128",
                                 "--save_steps", "6", "--log-every", "2", "--eval-every", "4",
                                 "--warmup_steps", "1", "--resume-from", "latest", "--model-preset", "125m",
                                 "--max-eval-samples", "9", "--no-first-order"]).flat()
    args = types.SimpleNamespace(**args)
    assert (args.max_train_steps, args.mixed_precision, args.per_device_train_batch_size, args.seq_length) == (
        7, "bf16", 3, 128)
    assert (args.save_checkpoint_freq, args.logging_steps, args.eval_steps, args.lr_warmup_steps) == (6, 2, 4, 1)
    assert (args.resume_from_checkpoint, args.model_size, args.max_eval_samples, args.first_order) == (
        "latest", "125m", 9, False)
    assert train_ttt.parse_args(["--epochs", "1.5"]).optim.num_train_epochs == 1.5
    assert train_ttt.parse_args(["--save-every", "5", "--save_steps", "5"]).checkpoints.save_checkpoint_freq == 5
    with pytest.raises(SystemExit):  # two spellings of one setting that disagree: refused, not last-wins
        train_ttt.parse_args(["--save-every", "5", "--save_steps", "6"])
    assert "--save-every 5 and --save_steps 6 set the same setting (save_checkpoint_freq)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_ttt.parse_args(["--max_trian_steps", "3"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --max_trian_steps 3 (did you mean --max_train_steps?)" in err
    assert len(err.strip().splitlines()) == 1 and "--help lists the options" in err  # one line, not the usage
    help_text = train_ttt.build_parser().format_help()
    assert "--max_steps MAX_TRAIN_STEPS" in help_text and "--max-train-steps MAX" not in help_text
    assert "--bf16 " not in help_text
    # one entry per flag: the usage line and the flag's line, its named aliases on that line
    assert help_text.count("--save_checkpoint_freq SAVE_CHECKPOINT_FREQ") == 2
    assert help_text.count("--save-every SAVE_CHECKPOINT_FREQ") == 1


def test_yaml_config_takes_switches_and_the_flag_not_its_alias(tmp_path):
    import train_ttt

    config = tmp_path / "run.yaml"
    config.write_text("use_lora: true\ninit_from: some/model\nmixed_precision: bf16\ntrain_tokenizer: false\n"
                      "save_best: true\n")
    args = types.SimpleNamespace(**train_ttt.parse_args(["--config", str(config)]).flat())
    assert (args.use_lora, args.init_from, args.mixed_precision, args.train_tokenizer, args.save_best) == (
        True, "some/model", "bf16", False, True)


# Every flag spelling of the guides this toolkit replaces (../shared/seeds 000-002): (its value, the setting and
# value it gives), or the words of its one-line refusal (something done differently here).
SAME_MEANING = {
    "--dataset-id": ("roneneldan/TinyStories", "dataset_name", "roneneldan/TinyStories"),
    "--dataset-config": ("en", "dataset_config", "en"), "--dataset_config": ("en", "dataset_config", "en"),
    "--dataset_name": ("x", "dataset_name", "x"),
    "--d-model": ("512", "hidden_size", 512), "--num-layers": ("8", "num_hidden_layers", 8),
    "--num-heads": ("8", "num_attention_heads", 8), "--d-ff": ("2048", "intermediate_size", 2048),
    "--tokenizer-path": ("tok", "tokenizer_name", "tok"), "--retrain-tokenizer": (None, "train_tokenizer", True),
    "--tokenizer-train-examples": ("500", "tokenizer_train_docs", 500),
    "--auto-vocab-size": (None, "auto_vocab_size", True), "--vocab-size": ("4096", "vocab_size", 4096),
    "--min-vocab-size": ("512", "min_vocab_size", 512), "--max-vocab-size": ("9000", "max_vocab_size", 9000),
    "--max-val-examples": ("50", "max_eval_examples", 50), "--max-train-examples": ("60", "max_train_examples", 60),
    "--text-column": ("body", "text_column", "body"),
    "--use-streaming": (None, "streaming", True), "--use-mixed-precision": (None, "mixed_precision", "bf16"),
    "--mixed_precision": ("bf16", "mixed_precision", "bf16"),
    "--grad-clip": ("0.5", "max_grad_norm", 0.5), "--warmup-steps": ("100", "lr_warmup_steps", 100),
    "--lr_warmup_steps": ("100", "lr_warmup_steps", 100), "--warmup_ratio": ("0.2", "warmup_ratio", 0.2),
    "--batch-size": ("3", "per_device_train_batch_size", 3),
    "--per_device_train_batch_size": ("3", "per_device_train_batch_size", 3),
    "--gradient-accumulation-steps": ("2", "gradient_accumulation_steps", 2),
    "--gradient_accumulation_steps": ("2", "gradient_accumulation_steps", 2),
    "--learning-rate": ("1e-3", "learning_rate", 1e-3), "--learning_rate": ("1e-3", "learning_rate", 1e-3),
    "--lr_end": ("1e-6", "lr_end", 1e-6), "--lr_scheduler_type": ("linear", "lr_scheduler_type", "linear"),
    "--weight-decay": ("0.01", "weight_decay", 0.01), "--weight_decay": ("0.01", "weight_decay", 0.01),
    "--epochs": ("2", "num_train_epochs", 2.0), "--max_train_steps": ("9", "max_train_steps", 9),
    "--eval-every": ("50", "eval_steps", 50), "--log-every": ("5", "logging_steps", 5),
    "--logging_steps": ("5", "logging_steps", 5), "--save-every": ("40", "save_checkpoint_freq", 40),
    "--save_checkpoint_freq": ("40", "save_checkpoint_freq", 40),
    "--save_milestone_freq": ("80", "save_milestone_freq", 80),
    "--seq-len": ("256", "seq_length", 256), "--seq_length": ("256", "seq_length", 256),
    "--max_seq_length": ("256", "seq_length", 256),
    "--model-preset": ("small", "model_size", "small"), "--model_size": ("125m", "model_size", "125m"),
    "--target-params": ("10M", "target_params", 10_000_000), "--prefer-depth": (None, "prefer_depth", True),
    "--use-lora": (None, "use_lora", True), "--lora-rank": ("4", "lora_rank", 4),
    "--output-dir": ("out", "output_dir", "out"), "--output_dir": ("out", "output_dir", "out"),
    "--resume-from": ("latest", "resume_from_checkpoint", "latest"),
    "--resume_from_checkpoint": ("latest", "resume_from_checkpoint", "latest"),
    "--ttt_layer_type": ("mlp", "ttt_layer_type", "mlp"), "--ttt_base_lr": ("0.1", "ttt_base_lr", 0.1),
    "--conv_kernel": ("2", "conv_kernel", 2), "--pre_conv": (None, "pre_conv", True),
    "--share_qk": (None, "share_qk", True), "--use_gate": (None, "use_gate", True),
    "--wandb_project": ("p", "wandb_project", "p"), "--wandb_run_name": ("r", "wandb_run_name", "r"),
}
# what a flag applies to (it is refused alone)
COMPANIONS = {"auto_vocab_size": ["--train_tokenizer"], "vocab_size": ["--train_tokenizer"],
              "prefer_depth": ["--target_params", "1M"], "use_lora": ["--init_from", "m"],
              "lora_rank": ["--use_lora", "--init_from", "m"]}
REFUSED = {
    "--split": ("train", "choose data with --dataset_name / --dataset_config"),
    "--val-split": ("validation", "--validation_split 0.05"),
    "--dropout-rate": ("0.1", "these models train without dropout"),
    "--activation": ("gelu", "choose the model with --model_type"),
    "--no-rmsnorm": (None, "the architectures are the papers'"), "--no-swiglu": (None, "the architectures are"),
    "--no-rope": (None, "the architectures are the papers'"),
    "--no-flash-attention": (None, "scaled_dot_product_attention"),
    "--stride": ("128", "without overlap"), "--shuffle-buffer-size": ("5000", "fixed, seeded buffer"),
    "--azure-account-name": ("acct", "AZURE_STORAGE_ACCOUNT_NAME"), "--azure-sas-token": ("tok", "az://"),
    "--config_file": ("f.yaml", "belongs to accelerate launch"),
    "--cloud-provider": ("gcs", "--output_dir gs://BUCKET/checkpoints"),
    "--cloud-bucket": ("b", "--output_dir s3://b/checkpoints"),
    "--cloud-prefix": ("runs/x", "--output_dir s3://BUCKET/runs/x"),
    "--cloud-region": ("us-east-1", "the region and credentials come from the provider's environment"),
}


def test_every_spelling_of_the_guides_this_toolkit_replaces_is_accepted_or_refused_with_the_replacement(capsys):
    import pytest

    import train_ttt

    for spelling, (value, setting, expected) in SAME_MEANING.items():
        args = train_ttt.parse_args([spelling] + ([value] if value is not None else []) + COMPANIONS.get(setting, []))
        assert args.flat()[setting] == expected, (spelling, args.flat()[setting])
    for spelling, (value, words) in REFUSED.items():
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            train_ttt.parse_args(["--max_train_steps", "3", spelling] + ([value] if value is not None else []))
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1, (spelling, err)
        assert words in err and "unrecognized" not in err, (spelling, err)
    capsys.readouterr()
    with pytest.raises(SystemExit):  # the guide's own example: provider, bucket and region into one URL
        train_ttt.parse_args(["--cloud-provider", "gcs", "--cloud-bucket", "my-tpu-checkpoints", "--cloud-region",
                              "us-central1"])
    assert "--output_dir gs://my-tpu-checkpoints/checkpoints" in capsys.readouterr().err


def test_the_spelling_table_covers_every_flag_of_the_guides():
    import re

    import pytest

    from conftest import SHARED

    guides = sorted((SHARED / "seeds").glob("00[012]_*.txt"))
    if not guides:
        pytest.skip(f"{SHARED / 'seeds'} is absent (it exists only beside the developers' checkout)")
    spellings = {m for guide in guides for m in re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", guide.read_text())}
    assert len(spellings) > 80
    assert sorted(spellings - SAME_MEANING.keys() - REFUSED.keys()) == []
