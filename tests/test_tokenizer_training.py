"""--train_tokenizer: a byte-level BPE trained on the run's data, saved with the run, kept on resume."""

import json
import os
import shlex
import signal
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

import train_ttt
from conftest import ROOT
from helpers import FAST, HANG_GUARD_S, fails, losses, run, wait_for_steps
from ttt_train import data


def corpus(tmp_path):
    words = ["king", "queen", "crown", "sword", "castle", "river", "night", "morning", "honour", "brother"]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(words[(i * 7 + j * 3) % 10] for j in range(40))}) + "\n"
                            for i in range(120)))
    return path


def test_trained_tokenizer_is_used_saved_and_kept_on_resume(tmp_path, capsys):
    folder = run(tmp_path, "--dataset_name", str(corpus(tmp_path)), "--train_tokenizer", "--vocab_size", "300",
                 "--max_train_steps", "2", "--save_checkpoint_freq", "1")
    assert "--train_tokenizer: byte-level BPE of 300 tokens" in capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    assert len(tokenizer) == 300 and tokenizer.eos_token == "</s>" and tokenizer.bos_token == "<s>"
    text = "king queen crown sword castle"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(text) / 2 and tokenizer.decode(ids) == text  # merges learned, lossless
    assert json.loads((folder / "final_model" / "config.json").read_text())["vocab_size"] == 300
    assert AutoTokenizer.from_pretrained(folder / "checkpoint-1").get_vocab() == tokenizer.get_vocab()
    assert json.loads((folder / "training_args.json").read_text())["tokenizer_name"] == str(folder / "tokenizer")
    stamp = os.stat(folder / "tokenizer" / "tokenizer.json").st_mtime_ns
    run(tmp_path, "--dataset_name", str(corpus(tmp_path)), "--max_train_steps", "3", "--resume_from_checkpoint",
        "latest")
    assert os.stat(folder / "tokenizer" / "tokenizer.json").st_mtime_ns == stamp  # not retrained
    assert AutoTokenizer.from_pretrained(folder / "final_model").get_vocab() == tokenizer.get_vocab()


def test_auto_vocab_size_rule():
    texts = ["a b c a b", "c d e f"]  # a, b, c occur at least twice
    assert data.auto_vocab_size(texts, 1, 10**6) == 320  # 256 + 3 + 3 = 262 -> 320
    assert data.auto_vocab_size(texts, 1024, 10**6) == 1024 and data.auto_vocab_size(texts, 1, 300) == 300
    many = [" ".join(f"w{i}" for i in range(1000))] * 2
    assert data.auto_vocab_size(many, 1, 10**6) == 1280  # 1259 -> 1280


def test_auto_vocab_size_through_the_trainer(tmp_path, capsys):
    run(tmp_path, "--dataset_name", str(corpus(tmp_path)), "--train_tokenizer", "--auto_vocab_size",
        "--min_vocab_size", "260", "--max_vocab_size", "4096", "--max_train_steps", "1")
    # 10 distinct words occur: the rule asks 320; BPE stops when no pair is left to merge (fewer tokens, said so)
    assert "tokens (320 asked, --auto_vocab_size) from" in capsys.readouterr().out


def test_tokenizer_training_errors(tmp_path, capsys):
    base = [*FAST, "--dataset_name", str(corpus(tmp_path)), "--output_dir", str(tmp_path / "run")]
    fails(capsys, *base, "--train_tokenizer", "--vocab_size", "100",
          match="--vocab_size 100 is smaller than the 256 byte symbols plus 3 special tokens (259)")
    fails(capsys, *base, "--vocab_size", "500", match="--vocab_size applies to --train_tokenizer")
    fails(capsys, *base, "--train_tokenizer", "--tokenizer_name", "builtin:bytes",
          match="it does not go with --tokenizer_name")
    fails(capsys, *base, "--train_tokenizer", "--vocab_size", "500", "--auto_vocab_size",
          match="give --vocab_size or --auto_vocab_size, not both")
    assert not (tmp_path / "run" / "tokenizer").exists()
    assert train_ttt.parse_args(["--train_tokenizer"]).data.vocab_size == 8192


@pytest.mark.slow
def test_the_readme_custom_corpus_command_resumes_with_one_flag_added(tmp_path, capsys):
    """The README's own-corpus command (trained tokenizer, --auto_vocab_size, --target_params, --epochs, --save_best),
    stopped by SIGTERM, resumes by the command the stop prints (the same line plus --resume_from_checkpoint latest)
    to the losses of an uninterrupted run, bit for bit; a repeated start option that disagrees is one line."""
    command = ["--dataset_name", str(corpus(tmp_path)), "--train_tokenizer", "--auto_vocab_size", "--min_vocab_size",
               "260", "--target_params", "1M", "--seq_length", "64", "--epochs", "20", "--save_best",
               "--save_checkpoint_freq", "0", "--eval_steps", "10", "--max_eval_samples", "4", "--logging_steps", "1"]
    whole = tmp_path / "whole"
    train_ttt.main([*command, "--output_dir", str(whole)])
    stopped = tmp_path / "stopped"
    proc = wait_for_steps(subprocess.Popen([sys.executable, str(ROOT / "train_ttt.py"), *command, "--output_dir",
                                            str(stopped)], cwd=ROOT, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True), stopped)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 143, output
    resume = shlex.split(next(line for line in output.splitlines() if "resume with:" in line).split("with: ", 1)[1])
    assert resume == ["python", str(ROOT / "train_ttt.py"), *command, "--output_dir", str(stopped),
                      "--resume_from_checkpoint", "latest"]
    step = max(losses(stopped))
    assert step < max(losses(whole))
    capsys.readouterr()
    train_ttt.main(resume[2:])
    assert f"resumed from {stopped / f'checkpoint-{step}'} at step {step}" in capsys.readouterr().out
    assert losses(stopped) == losses(whole)
    best = json.loads((whole / "training_summary.json").read_text())["best_step"]
    assert json.loads((stopped / "training_summary.json").read_text())["best_step"] == best
    fails(capsys, *resume[2:], "--target_params", "2M", match="--target_params 2000000 conflicts with checkpoint")
