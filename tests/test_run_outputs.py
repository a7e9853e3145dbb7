"""What a run leaves besides checkpoints: best_model/ (--save_best), training_summary.json, and the document limits
--max_train_examples / --max_eval_examples."""

import json

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
