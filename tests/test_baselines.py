"""The recurrent baselines (Mamba-2, Gated DeltaNet: transformers' classes) through the whole toolkit, the family
registry they are records of, their parameter-matched sizes and the kernel path a run records."""

import json
import subprocess
import sys

import pytest
import torch

import train_ttt
from conftest import ROOT
from helpers import FAST, assert_close, fails, losses, run, wait_until
from ttt_train import config, families, models

BASELINES = ["mamba2", "gated_deltanet"]
# byte tokenizer (vocabulary 259), 2 layers: a few seconds per run on a CPU
SMALL = ["--model_size", "nano", "--num_hidden_layers", "2", "--learning_rate", "3e-3"]


def flags_of(**given):
    """The model and TTT-E2E settings with only `given` set (build_config's arguments)."""
    return config.ModelArguments(**given), config.E2EArguments()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Each baseline trained for 40 steps on the built-in corpus (its final model and metrics)."""
    root = tmp_path_factory.mktemp("baselines")
    return {family: run(root, *SMALL, "--model_type", family, "--max_train_steps", "40", "--logging_steps", "10",
                        out=family) for family in BASELINES}


@pytest.mark.parametrize("family", BASELINES)
def test_trains_and_the_loss_falls(trained, family):
    got = losses(trained[family])
    assert sorted(got) == [10, 20, 30, 40]
    assert got[40] < got[10] - 0.5, got  # bytes of the synthetic corpus: from ~5.5 nats towards its entropy


@pytest.mark.parametrize("family", BASELINES)
def test_generation_with_the_cache_equals_full_forwards(trained, family):
    """Greedy generate() (through the family's cache) gives the tokens that argmax over a full forward of the
    growing sequence gives, and its per-step logits match those forwards."""
    from ttt_train import data

    model = data.load_model(str(trained[family] / "final_model"))
    prompt = torch.tensor([[2, 66, 111, 98, 32, 119, 101, 110, 116]])  # a trained model: not one repeated token
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                         pad_token_id=0, eos_token_id=None, return_dict_in_generate=True, output_logits=True,
                         **families.generation_kwargs(model))
    new = out.sequences[0, prompt.shape[1]:]
    assert len(set(new.tolist())) > 1, new  # the check below would be weak on a constant continuation
    # decoded through a cache (one token per forward), not by re-reading the whole sequence at each step
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    assert cache is not None and cache.get_seq_length() == out.sequences.shape[1] - 1, cache
    with torch.no_grad():
        full = model(out.sequences[:, :-1], use_cache=False).logits[0, prompt.shape[1] - 1:]
    assert torch.equal(full.argmax(-1), new)
    assert_close(f"{family} cached logits", torch.cat(out.logits), full, atol=1e-4)


def test_generate_cli_on_gated_deltanet(trained, capsys):
    """generate.py on a model whose every layer is recurrent: transformers' own cache raises there (see
    families.RecurrentCache)."""
    from ttt_lm import generate

    capsys.readouterr()
    generate.main(["--model_name_or_path", str(trained["gated_deltanet"] / "final_model"), "--prompt", "Bob",
                   "--max_new_tokens", "20", "--greedy"])
    assert capsys.readouterr().out.startswith("Bob")


def test_without_recurrent_cache_transformers_raises(trained):
    """Why RecurrentCache exists: if transformers fixes this, the workaround can go (this test then fails)."""
    from ttt_train import data

    model = data.load_model(str(trained["gated_deltanet"] / "final_model"))
    prompt = torch.tensor([[2, 66, 111, 98]])
    with pytest.raises(ValueError, match="can only be called on Attention layers"):
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False,
                       pad_token_id=0, use_cache=True)


@pytest.mark.parametrize("family", BASELINES)
def test_loads_back_with_the_auto_classes_in_a_fresh_process(trained, family):
    """transformers' own classes load these folders (no code of this project imported) to the same logits."""
    from ttt_train import data

    folder = trained[family] / "final_model"
    ids = torch.tensor([[2, 66, 111, 98, 32, 119, 101]])
    with torch.no_grad():
        expected = data.load_model(str(folder))(ids).logits
    script = ("import sys, torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
              "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
              "AutoTokenizer.from_pretrained(sys.argv[1])\n"
              "assert not any(k in sys.modules for k in ('ttt', 'ttt_train')), 'project code was imported'\n"
              f"torch.save(m(torch.tensor({ids.tolist()})).logits.detach(), sys.argv[2])\n")
    result = subprocess.run([sys.executable, "-c", script, str(folder), str(trained[family] / "logits.pt")],
                            cwd="/", capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert_close(f"{family} logits loaded by Auto classes", torch.load(trained[family] / "logits.pt"), expected,
                 atol=0)


def test_one_command_compares_and_agrees_with_single_evaluations(trained, tmp_path):
    """evaluate.py on both models writes one table and one plot whose values are those each model gets when
    evaluated alone (the same blocks)."""
    from ttt_lm import evaluate

    def evaluate_models(*names, out):
        evaluate.main(["--model_name_or_path", *(str(trained[f] / "final_model") for f in names),
                       "--dataset_name", "builtin:synthetic", "--seq_length", "64", "--max_eval_tokens", "600",
                       "--bucket_size", "16", "--output_dir", str(tmp_path / out)])
        return json.loads((tmp_path / out / "eval.json").read_text())

    together = evaluate_models(*BASELINES, out="both")
    for family, result in zip(BASELINES, together):
        alone, = evaluate_models(family, out=family)
        for key in ("loss", "perplexity", "tokens", "parameters", "by_position", "by_position_log"):
            assert result[key] == alone[key], (family, key)
        assert result["tokens_per_sec"] > 0 and result["peak_memory_bytes"] > 0
    table = (tmp_path / "both" / "comparison.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| Mamba-2") or line.startswith("| Gated DeltaNet")]
    assert len(rows) == 2 and all(f"{r['loss']:.4f}" in row for r, row in zip(together, rows)), table
    assert (tmp_path / "both" / "ppl_by_position.png").stat().st_size > 0


@pytest.mark.parametrize("family", BASELINES)
def test_a_killed_run_resumes_bitwise(tmp_path, family):
    """kill -9 once checkpoint-4 is saved, resume from `latest`: the losses of the steps after it are those of an
    uninterrupted run, bit for bit (the model, AdamW, the schedule and the data stream all restored)."""
    common = [*SMALL, "--model_type", family, "--max_train_steps", "40", "--save_checkpoint_freq", "4"]
    full = run(tmp_path, *common, out="full")
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_ttt.py"), *FAST, *common, "--output_dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # a few lines before the kill
    wait_until(lambda: (out / "checkpoint-4" / "trainer_state.json").exists(), proc, "checkpoint-4")
    proc.kill()
    proc.wait()
    assert not (out / "final_model").exists()  # killed before its end
    run(tmp_path, *common, "--resume_from_checkpoint", "latest", out="killed")
    expected, got = losses(full), losses(out)
    assert sorted(got) == list(range(1, 41)) and all(got[s] == expected[s] for s in got), (got, expected)


# ---------------------------------------------------------------- parameter-matched sizes


@pytest.mark.parametrize("size", ["nano", "small", "tiny", "125m", "350m", "760m", "1b"])
def test_every_size_counts_the_ttt_linear_parameters_within_5_percent(size):
    """Counted on the meta device (nothing allocated), with the Llama-2 vocabulary."""
    counts = {}
    for family in ["ttt", "transformer", *BASELINES]:
        config = models.build_config(*flags_of(model_type=family, model_size=size), 32000, 1, 2, report=lambda _: None)
        counts[family] = models.parameter_count(config)
    for family, count in counts.items():
        assert abs(count / counts["ttt"] - 1) < 0.05, (family, counts)


def test_the_published_shapes_of_the_families():
    """Mamba-2 at 125m has mamba2-130m's shape (layers of 768, state 128, heads of 64), 23 layers with the Llama-2
    vocabulary (mamba2-130m's 24 come with GPT-NeoX's 50K); Gated DeltaNet keeps the TTT size's depth with
    Qwen3.5's head shape; the chosen dimension is reported."""
    said = []
    mamba = models.build_config(*flags_of(model_type="mamba2", model_size="125m"), 32000, 1, 2, report=said.append)
    assert (mamba.num_hidden_layers, mamba.hidden_size, mamba.state_size, mamba.head_dim, mamba.expand) == \
        (23, 768, 128, 64, 2)
    gdn = models.build_config(*flags_of(model_type="gated_deltanet", model_size="125m"), 32000, 1, 2,
                              report=said.append)
    assert gdn.num_hidden_layers == 12 and set(gdn.layer_types) == {"linear_attention"}
    assert (gdn.linear_num_key_heads, gdn.linear_num_value_heads, gdn.linear_key_head_dim) == (3, 6, 128)
    assert said[0].startswith("Mamba-2: num_hidden_layers 23 -> ") and "of TTT-Linear's" in said[0]


def test_explicit_dimensions_are_not_rematched():
    config = models.build_config(*flags_of(model_type="mamba2", model_size="tiny", num_hidden_layers=3), 300, 1, 2,
                                 report=lambda _: None)
    assert config.num_hidden_layers == 3


def test_target_params_searches_the_baselines_shapes():
    config = models.build_config(*flags_of(model_type="mamba2", target_params=20_000_000), 32000, 1, 2,
                                 report=lambda _: None)
    assert abs(models.parameter_count(config) / 20e6 - 1) < 0.1


# ---------------------------------------------------------------- the kernel path, never silent


@pytest.mark.parametrize("family", ["ttt", "transformer", "e2e", *BASELINES])
def test_the_kernel_path_is_the_fallback_on_a_cpu(family):
    config = models.build_config(*flags_of(model_type=family, model_size="tiny"), 300, 1, 2, report=lambda _: None)
    path = families.FAMILIES[family].kernels(config, torch.device("cpu"))
    assert not path.fused and path.record()["kernels"] == "fallback" and path.install


def test_a_run_records_its_kernel_path(trained):
    out = trained["mamba2"]
    start = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][0]
    assert start["event"] == "start" and start["kernels"] == "fallback"
    assert "Mamba-2 scan: PyTorch reference path" in start["kernel_detail"]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["kernels"] == "fallback" and summary["kernel_detail"] == start["kernel_detail"]


@pytest.mark.parametrize("family,install", [("mamba2", "pip install mamba-ssm causal-conv1d"),
                                            ("gated_deltanet", "pip install flash-linear-attention causal-conv1d"),
                                            ("ttt", "triton (on a CUDA GPU)")])
def test_require_fused_kernels_refuses_the_fallback(tmp_path, capsys, family, install):
    fails(capsys, *FAST, *SMALL, "--model_type", family, "--require_fused_kernels", "--output_dir",
          str(tmp_path / "run"), match=f"; for the fused kernels: {install}")
    assert not (tmp_path / "run" / "final_model").exists()


# ---------------------------------------------------------------- the registry


def test_every_saved_model_type_names_one_family():
    """family_of is the inverse of the records: the config of each family's model maps back to that family."""
    for name, family in families.FAMILIES.items():
        config = models.build_config(*flags_of(model_type=name, model_size="tiny"), 300, 1, 2, report=lambda _: None)
        assert families.family_of(config) is family, name
        assert config.model_type == family.config_type


def test_the_cli_names_the_registry():
    assert train_ttt.FAMILIES == families.NAMES


@pytest.mark.parametrize("family", families.NAMES)
def test_the_fsdp_config_shards_each_familys_own_block(family):
    """accelerate_fsdp_config.yaml as Accelerate reads it: the shard unit is the family's block class."""
    import yaml
    from accelerate.utils import FullyShardedDataParallelPlugin

    fsdp = yaml.safe_load((ROOT / "accelerate_fsdp_config.yaml").read_text())["fsdp_config"]
    config = models.build_config(*flags_of(model_type=family, model_size="tiny"), 300, 1, 2, report=lambda _: None)
    with torch.device("meta"):
        model = models.build_model(config)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=fsdp["fsdp_version"], auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"].lower(),
        transformer_cls_names_to_wrap=fsdp.get("fsdp_transformer_layer_cls_to_wrap"))
    plugin.set_auto_wrap_policy(model)
    wrapped = plugin.auto_wrap_policy.keywords["transformer_layer_cls"]
    blocks = {type(layer) for layer in model.get_decoder().layers}
    assert wrapped == blocks, (wrapped, blocks)


@pytest.mark.parametrize("family", BASELINES)
def test_lora_adapts_the_mixer_and_mlp_and_init_from_continues(trained, tmp_path, family):
    """The default LoRA targets exist in the model (peft raises otherwise) and only the adapters train; a LoRA
    run starts from the trained model with --init_from, and its first loss is that model's (not a fresh one's)."""
    pytest.importorskip("peft")
    config = models.build_config(*flags_of(model_type=family, model_size="nano"), 300, 1, 2, report=lambda _: None)
    wrapped = models.apply_lora(models.build_model(config), dict(models.LORA_DEFAULTS))
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in wrapped.named_parameters()
               if ".lora_A." in name}
    assert adapted == set(families.FAMILIES[family].lora_targets)
    assert all(("lora_" in name) == p.requires_grad for name, p in wrapped.named_parameters())
    out = tmp_path / "lora"
    train_ttt.main([*FAST[2:], "--output_dir", str(out), "--init_from", str(trained[family] / "final_model"),
                    "--use_lora", "--max_train_steps", "2"])
    first = losses(out)[1]
    assert first < losses(trained[family])[10], (first, losses(trained[family]))  # trained, not from scratch
