"""Model presets, explicit dimensions over a size, and --target_params (sizing by a parameter budget)."""

import re

import pytest

import train_ttt
from helpers import FAST, fails
from ttt import TTT_STANDARD_CONFIGS
from ttt_train import models


def config_for(*flags, vocab=259):
    run = train_ttt.parse_args(list(flags))
    return models.build_config(run.model, run.e2e, vocab, 1, 2, report=lambda line: None)


def saved_parameters(folder) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder / "final_model")
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model_type", ["ttt", "transformer", "e2e"])
def test_presets_are_about_their_scale(model_type):
    expected = {"nano": (1e6, 259), "small": (50e6, 32000), "medium": (125e6, 32000)}
    for preset, (scale, vocab) in expected.items():
        count = models.parameter_count(config_for("--model_size", preset, "--model_type", model_type, vocab=vocab))
        assert 0.75 * scale < count < 1.3 * scale, (preset, model_type, count)
    config = config_for("--model_size", "large")
    assert config.hidden_size == TTT_STANDARD_CONFIGS["350m"]["hidden_size"]


def test_explicit_dimensions_override_a_size():
    config = config_for("--model_size", "tiny", "--hidden_size", "128", "--num_hidden_layers", "2")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size) == (
        128, 2, 4, 512)
    e2e = config_for("--model_type", "e2e", "--model_size", "125m", "--num_hidden_layers", "8")
    assert (e2e.num_hidden_layers, e2e.suffix_len, e2e.intermediate_size) == (8, 2, 1664)


def test_target_params_picks_the_closest_shape_and_reports_the_real_count(tmp_path, capsys):
    folder = tmp_path / "run"
    train_ttt.main([*FAST[2:], "--target_params", "1.5M", "--max_train_steps", "1", "--output_dir", str(folder)])
    line = re.search(r"--target_params 1500000: hidden (\d+), (\d+) layers, (\d+) heads, MLP (\d+) -> (\d+) "
                     r"parameters \(vocabulary 259\)", capsys.readouterr().out)
    assert line, "the chosen shape is printed before training"
    hidden, layers, _, _, count = map(int, line.groups())
    assert count == saved_parameters(folder)  # counted on the model with the real vocabulary
    assert abs(count - 1.5e6) <= 0.1 * 1.5e6
    deep = config_for("--target_params", "1.5M", "--prefer_depth")
    assert deep.num_hidden_layers > layers
    assert abs(models.parameter_count(deep) - 1.5e6) <= 0.1 * 1.5e6
    big = config_for("--target_params", "300M", vocab=32000)
    assert abs(models.parameter_count(big) - 3e8) <= 0.1 * 3e8 and big.hidden_size >= 768


@pytest.mark.parametrize("flags,match", [
    (["--target_params", "100"], "--target_params 100 is below the smallest model of this type"),
    (["--target_params", "5M", "--model_size", "nano"], "it does not go with --model_size"),
    (["--target_params", "5M", "--hidden_size", "256"], "--hidden_size conflicts with it"),
    (["--model_size", "tiny", "--num_attention_heads", "3"], "(from --num_attention_heads on --model_size tiny)"),
    (["--target_params", "lots"], "expected a parameter count like 10M"),
    (["--prefer_depth"], "--prefer_depth applies to --target_params"),
])
def test_sizing_errors(tmp_path, capsys, flags, match):
    fails(capsys, *FAST[2:], "--output_dir", str(tmp_path / "run"), *flags, match=match)
