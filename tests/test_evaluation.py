"""evaluate.py, generate.py, plot_metrics.py and the Transformer++ baseline."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

import train_ttt
from helpers import FAST, assert_close
from ttt_lm import evaluate, generate, plot_metrics

EVAL_BLOCKS = 4  # helpers.FAST's --max_eval_samples: the blocks the trainer's last evaluation read


@pytest.fixture
def trained(trained_run) -> dict:
    """The session's shared TTT-Linear and Transformer++ runs (conftest.trained_run), by model type."""
    return {model_type: trained_run(model_type) for model_type in ("ttt", "transformer")}


def eval_losses(run):
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in lines if "eval_loss" in r]


def test_transformer_baseline_is_a_hugging_face_model_of_equal_size(trained):
    model = AutoModelForCausalLM.from_pretrained(trained["transformer"] / "final_model")
    assert isinstance(model, MistralForCausalLM) and model.config._attn_implementation == "sdpa"
    ttt = AutoModelForCausalLM.from_pretrained(trained["ttt"] / "final_model")
    sizes = [sum(p.numel() for p in m.parameters()) for m in (model, ttt)]
    assert abs(sizes[0] - sizes[1]) / sizes[1] < 0.05
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (256, 4)


def test_sliding_window_baseline(tmp_path):
    train_ttt.main([*FAST, "--model_type", "transformer", "--sliding_window", "4", "--max_train_steps", "4",
                    "--output_dir", str(tmp_path)])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final_model").eval()
    assert model.config.sliding_window == 4
    ids = torch.randint(3, 200, (1, 48))
    changed = ids.clone()
    changed[0, :10] = 5  # beyond the reach of the last position: 4 layers of 4-token windows
    with torch.no_grad():
        assert torch.allclose(model(ids).logits[0, -1], model(changed).logits[0, -1], atol=1e-5)
        assert not torch.allclose(model(ids).logits[0, 12], model(changed).logits[0, 12], atol=1e-5)


def test_evaluate_matches_the_trainer_and_buckets_positions(trained, tmp_path):
    models = [str(trained[t] / "final_model") for t in ("ttt", "transformer")]
    results = evaluate.evaluate(evaluate.parse_args(
        ["--model_name_or_path", *models, "--dataset_name", "builtin:synthetic", "--seq_length", "64",
         "--max_eval_tokens", str(EVAL_BLOCKS * 64), "--output_dir", str(tmp_path)]))
    assert [r["model"] for r in results] == models
    for result, model_type in zip(results, ("ttt", "transformer")):
        assert abs(result["loss"] - eval_losses(trained[model_type])[-1]) < 1e-5
        assert result["tokens"] == EVAL_BLOCKS * 63
        assert abs(result["perplexity"] - torch.tensor(result["loss"]).exp().item()) < 1e-4
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert [r["loss"] for r in saved] == [r["loss"] for r in results]
    assert (tmp_path / "ppl_by_position.png").stat().st_size > 10_000


def test_by_position_beyond_the_training_context(trained, tmp_path):
    """At 2x the training context (64), buckets of 16 positions cover predicted positions 1..127."""
    [result] = evaluate.evaluate(evaluate.parse_args(
        ["--model_name_or_path", str(trained["ttt"] / "final_model"), "--dataset_name", "builtin:synthetic",
         "--seq_length", "128", "--bucket_size", "16", "--max_eval_tokens", "512", "--output_dir", str(tmp_path)]))
    buckets = result["by_position"]
    assert [(b["start"], b["end"]) for b in buckets] == [(s, min(s + 16, 128)) for s in range(1, 128, 16)]
    weighted = sum(b["loss"] * (b["end"] - b["start"]) for b in buckets) / 127
    assert abs(weighted - result["loss"]) < 1e-6 and result["training_context"] == 64


def test_evaluate_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model_name_or_path", str(tmp_path), "--dataset_name", "builtin:synthetic",
                       "--seq_length", "64", "--output_dir", str(tmp_path / "o")])
    assert exit_info.value.code != 0 and "has no config.json" in capsys.readouterr().err


def test_generate_streams_sampled_text(trained, capsys):
    generate.main(["--model_name_or_path", str(trained["transformer"] / "final_model"), "--prompt", "Bob",
                   "--max_new_tokens", "8", "--temperature", "0.7", "--top_p", "0.9", "--seed", "3"])
    assert capsys.readouterr().out.startswith("Bob")


def test_plot_metrics_writes_pngs(trained, tmp_path):
    plot_metrics.main([str(trained["ttt"]), str(trained["transformer"]), "--output_dir", str(tmp_path)])
    assert (tmp_path / "training_curves.png").stat().st_size > 10_000
    assert (tmp_path / "ttt_statistics_ttt.png").exists() and not (tmp_path / "ttt_statistics_transformer.png").exists()


@pytest.mark.parametrize("context, dotted", [(64, False), (32, True)])
def test_the_plot_mentions_a_dotted_line_only_when_it_draws_one(tmp_path, monkeypatch, context, dotted):
    """The training context is marked (dotted) only when the evaluation goes beyond it; the axis label says so
    only then."""
    import matplotlib.axes

    from ttt_lm import evaluate

    labels, lines = [], []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xlabel", lambda self, label, *a, **k: labels.append(label))
    original = matplotlib.axes.Axes.axvline
    monkeypatch.setattr(matplotlib.axes.Axes, "axvline",
                        lambda self, x, *a, **k: lines.append(x) or original(self, x, *a, **k))
    result = {"label": "m", "perplexity": 2.0, "training_context": context,
              "by_position": [{"start": 1, "end": 33, "perplexity": 3.0}, {"start": 33, "end": 64, "perplexity": 2.0}]}
    evaluate.plot([result], tmp_path / "p.png", seq_length=64)
    assert ("dotted" in labels[0]) == dotted and (lines == [32]) == dotted


@pytest.mark.parametrize("family", ["ttt", "transformer"])
def test_the_comparisons_peak_memory_is_the_models_not_the_losss_logits(family):
    """With a 32K vocabulary the logits of a training loss block ([B, 1024, V] and their log-softmax) would be most
    of a small model's evaluation memory, the same number for every model: the evaluation's loss takes
    EVAL_LOSS_BLOCK positions at a time, so the peak stays far below one such block's logits, and the losses are
    those of the whole logits."""
    from ttt import TTTConfig, TTTForCausalLM
    from ttt_train.memory import PeakMemory

    torch.manual_seed(0)
    dims = dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    if family == "ttt":
        model = TTTForCausalLM(TTTConfig(**dims, mini_batch_size=16)).eval()
    else:
        model = MistralForCausalLM(MistralConfig(**dims, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 32000, (2, 512))
    with torch.no_grad(), PeakMemory() as memory:
        losses = evaluate.next_token_losses(model, ids)
    logits_block = 2 * 512 * 32000 * 4  # one block of the training loss's logits, float32
    assert memory.peak_bytes < logits_block / 2, (memory.peak_bytes, logits_block)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(ids).logits[:, :-1].transpose(1, 2), ids[:, 1:],
                                                     reduction="none")
    assert_close("next-token losses", losses[:, :-1], expected, atol=1e-5)
