"""convert_jax_checkpoint.py ttt: checkpoints written by the official ttt-lm-jax trainer (../shared/reference_jax)
converted, then run through ttt.py against the official JAX logits; every kind of bad input refused in one line
with nothing written; the converted model evaluated, sampled and fine-tuned with --init_from as a user would."""

import json
import shutil

import msgpack
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import convert_jax_checkpoint as convert
import train_ttt
import ttt
from conftest import SHARED
from helpers import FAST, assert_close, fails
from ttt_lm import evaluate, generate

JAX = SHARED / "reference_jax"
CASES = {"ttt_linear": "linear", "ttt_mlp": "mlp"}
needs_jax = pytest.mark.skipif(not (JAX / "ttt_linear" / "checkpoint").is_dir(),
                               reason=f"{JAX} is absent (it exists only beside the developers' checkout)")


def converted(tmp_path, checkpoint, *flags, name="out"):
    out = tmp_path / name
    assert convert.main(["ttt", "--checkpoint", str(checkpoint), "--output_dir", str(out), *flags]) == 0
    return out


def jax_logits_error(folder, case) -> dict:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    io = load_file(JAX / case / "io.safetensors")
    with torch.no_grad():
        return {suffix: (model(io["input_ids" + suffix]).logits, io["logits" + suffix]) for suffix in ("", "_T64")}


def run(tmp_path, *extra, out):
    """A short training run (helpers.FAST without --model_size: --init_from sets the size)."""
    train_ttt.main([*FAST[2:], "--output_dir", str(tmp_path / out), *extra])
    return tmp_path / out


def convert_fails(tmp_path, capsys, *argv, match):
    """The converter exits 1 with one error line containing `match`, and writes no output folder."""
    out = tmp_path / "refused"
    capsys.readouterr()
    assert convert.main(["ttt", *argv, "--output_dir", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".refused.partial-*"))
    return err[0]


# ---------------------------------------------------------------- writing records as StreamingCheckpointer does

def pack_array(tensor) -> bytes:
    """flax.serialization.to_bytes of one array: msgpack of ExtType(1, msgpack([shape, dtype name, bytes]))."""
    dtype = str(tensor.dtype).removeprefix("torch.")
    raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return msgpack.packb(msgpack.ExtType(1, msgpack.packb([list(tensor.shape), dtype, raw])))


def write_records(path, records: dict):
    with open(path, "wb") as f:
        for key, value in records.items():
            f.write(msgpack.packb([list(key), value if isinstance(value, bytes) else pack_array(value)]))


def fixture_params(case) -> dict:
    """{key tuple: tensor} of the parameters of a fixture checkpoint, params-only keys (no params/params)."""
    records = convert.read_records(JAX / case / "checkpoint" / "streaming_train_state")
    return {k[2:]: v for k, v in records.items() if k[:2] == convert.PARAMS_PREFIX}


# ---------------------------------------------------------------- the official checkpoints reproduce the JAX logits

@needs_jax
@pytest.mark.parametrize("case,where", [("ttt_linear", "checkpoint"), ("ttt_mlp", "checkpoint/step_1"),
                                        ("ttt_linear", "trainstate_params::checkpoint/step_1/streaming_train_state_1")])
def test_converted_checkpoint_reproduces_the_jax_logits(tmp_path, case, where):
    prefix, _, relative = where.rpartition("::")
    out = converted(tmp_path, (prefix + "::" if prefix else "") + str(JAX / case / relative))
    config = json.loads((out / "config.json").read_text())
    assert config["ttt_layer_type"] == CASES[case] and config["ttt_base_lr"] == {"linear": 1.0, "mlp": 0.1}[CASES[case]]
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["intermediate_size"], config["vocab_size"], config["mini_batch_size"]) == (64, 2, 4, 128, 512, 16)
    assert config["pre_conv"] and config["share_qk"] and config["use_gate"] and config["tie_word_embeddings"]
    assert json.loads((out / "conversion.json").read_text())["step"] == 1
    for suffix, (logits, expected) in jax_logits_error(out, case).items():
        assert expected.abs().max() > 0.5  # non-degenerate reference
        assert_close(f"{case} logits{suffix}", logits, expected, atol=1e-5)


@needs_jax
def test_params_only_file_and_bfloat16_output(tmp_path):
    """A `streaming_params` file (--checkpointer.save_optimizer_state=False: no params/params prefix) converts to
    the same model; --dtype bfloat16 writes the checkpoint's bf16 values exactly."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_records(run_dir / "streaming_params", fixture_params("ttt_mlp"))
    out = converted(tmp_path, run_dir, "--dtype", "bfloat16", "--official_config", str(JAX / "ttt_mlp" / "config.json"))
    weights = load_file(out / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    for suffix, (logits, expected) in jax_logits_error(out, "ttt_mlp").items():
        assert_close(f"bf16-saved logits{suffix}", logits, expected, atol=1e-5)


def test_other_backbone_options_round_trip(tmp_path):
    """The Transformer backbone (separate wk, no convs, no gate) with an untied lm_head: every option inferred
    from the tensors, the weights back unchanged (the inverse of the mapping written as JAX records)."""
    config = ttt.TTTConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=2, mini_batch_size=8, ttt_layer_type="linear", share_qk=False,
                           pre_conv=False, use_gate=False, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = ttt.TTTForCausalLM(config).eval()
    state = model.state_dict()
    inverse = {"T": lambda x: x.T, "conv": lambda x: x.permute(2, 1, 0), "lr": lambda x: x.permute(0, 2, 1),
               None: lambda x: x}
    records = {}
    for key, (jax, _, transform) in convert.ttt_mapping(config).items():
        parts = jax.split("/")
        if parts[-2] in ("learnable_ttt_lr", "ttt_norm"):  # one key element holding a "/", as the trainer writes it
            parts = parts[:-2] + ["/".join(parts[-2:])]
        records[tuple(parts)] = inverse[transform](state[key]).contiguous()
    write_records(tmp_path / "streaming_params", records)
    out = converted(tmp_path, tmp_path / "streaming_params", "--ttt_base_lr", "1.0")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    for key in ("share_qk", "pre_conv", "use_gate", "tie_word_embeddings", "mini_batch_size", "vocab_size"):
        assert getattr(loaded.config, key) == getattr(config, key), key
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close("round-trip logits", loaded(ids).logits, model(ids).logits, atol=1e-6)
    assert_close("lm_head", loaded.lm_head.weight, model.lm_head.weight, atol=0)


# ---------------------------------------------------------------- bad input: one line, nothing written

@needs_jax
def test_corrupted_and_truncated_files(tmp_path, capsys):
    source = (JAX / "ttt_linear" / "checkpoint" / "streaming_train_state").read_bytes()
    damaged, at = tmp_path / "damaged", source.index(b"seq_modeling_block")
    cases = {
        "truncated": (source[: len(source) // 2], "is truncated"),
        # bytes that are no msgpack where a record's key starts (the format has no checksums: damage inside an
        # array's raw bytes is found only when it makes a value non-finite)
        "garbage bytes": (source[:at - 8] + b"\xc1" * 64 + source[at + 56:], "corrupted"),
        "unknown dtype": (source.replace(b"bfloat16", b"bfloat17", 1), "unsupported array dtype 'bfloat17'"),
        "empty": (b"", "holds no records"),
        "bytes after the end": (source + b"\x92", "truncated"),
    }
    for content, match in cases.values():
        damaged.write_bytes(content)
        convert_fails(tmp_path, capsys, "--checkpoint", str(damaged), match=match)
    # a record whose array holds fewer bytes than its shape needs
    params = fixture_params("ttt_linear")
    key = ("model", "h", "0", "seq_modeling_block", "wq", "kernel")
    params[key] = msgpack.packb(msgpack.ExtType(1, msgpack.packb([[64, 64], "bfloat16", b"\0" * 100])))
    write_records(damaged, params)
    convert_fails(tmp_path, capsys, "--checkpoint", str(damaged), match="model/h/0/seq_modeling_block/wq/kernel: "
                                                                           "bfloat16[64, 64] needs 8192 bytes")


@needs_jax
def test_missing_extra_misshaped_and_nonfinite_parameters(tmp_path, capsys):
    params, path = fixture_params("ttt_mlp"), tmp_path / "streaming_params"
    wo = ("model", "h", "1", "seq_modeling_block", "wo", "kernel")
    variants = {
        "missing": ({k: v for k, v in params.items() if k != wo},
                    "missing parameter model/h/1/seq_modeling_block/wo/kernel"),
        "extra": ({**params, ("model", "h", "0", "seq_modeling_block", "wz", "kernel"): params[wo]},
                  "unexpected parameter model/h/0/seq_modeling_block/wz/kernel"),
        "misshaped": ({**params, wo: params[wo][:, :32]}, "parameter model/h/1/seq_modeling_block/wo/kernel has shape "
                                                          "[64, 32], expected [64, 64]"),
        "non-finite": ({**params, wo: params[wo].clone().fill_(float("nan"))}, "non-finite values"),
        "layer gap": ({k: v for k, v in params.items() if k[:3] != ("model", "h", "0")}, "not 0..N-1"),
    }
    for records, match in variants.values():
        write_records(path, records)
        convert_fails(tmp_path, capsys, "--checkpoint", str(path), match=match)


@needs_jax
def test_wrong_flags_and_occupied_output(tmp_path, capsys):
    checkpoint = str(JAX / "ttt_linear" / "checkpoint")
    convert_fails(tmp_path, capsys, "--checkpoint", checkpoint, "--model_size", "125m",
                  match="--model_size 125m says hidden_size=768, but the checkpoint's tensors have hidden_size=64")
    convert_fails(tmp_path, capsys, "--checkpoint", checkpoint, "--ttt_layer_type", "mlp",
                  match="ttt_layer_type=mlp, but the checkpoint's tensors have ttt_layer_type=linear")
    convert_fails(tmp_path, capsys, "--checkpoint", checkpoint, "--official_config",
                  str(JAX / "ttt_mlp" / "config.json"), match="seq_modeling_block=ttt_mlp")
    convert_fails(tmp_path, capsys, "--checkpoint", checkpoint, "--official_config",
                  str(JAX / "ttt_linear" / "config.json"), "--ttt_base_lr", "0.5",
                  match="contradicts --official_config")
    convert_fails(tmp_path, capsys, "--checkpoint", str(tmp_path / "nope"), match="does not exist")
    convert_fails(tmp_path, capsys, "--checkpoint", str(JAX / "ttt_linear"), match="holds no streaming_train_state")
    convert_fails(tmp_path, capsys, "--checkpoint", checkpoint, "--tokenizer_name",
                  str(SHARED / "data" / "llama2_tokenizer"),
                  match="has 32000 tokens, more than the checkpoint's vocabulary of 512")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert convert.main(["ttt", "--checkpoint", checkpoint, "--output_dir", str(occupied)]) == 1
    assert "not empty" in capsys.readouterr().err and [p.name for p in occupied.iterdir()] == ["notes.txt"]


# ---------------------------------------------------------------- as a user: convert, evaluate, generate, fine-tune

@needs_jax
def test_convert_evaluate_generate_and_fine_tune(tmp_path, capsys, shakespeare):
    out = converted(tmp_path, JAX / "ttt_mlp" / "checkpoint", "--tokenizer_name", "builtin:bytes")
    evaluate.main(["--model_name_or_path", str(out), "--dataset_name", str(shakespeare), "--seq_length", "64",
                   "--max_eval_tokens", "1000", "--output_dir", str(tmp_path / "eval")])
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())[0]
    assert result["tokens"] > 900 and 5.0 < result["loss"] < 7.0  # near ln(512): the fixture is a fresh init
    capsys.readouterr()
    generate.main(["--model_name_or_path", str(out), "--prompt", "ROMEO:", "--max_new_tokens", "6", "--seed", "0"])
    assert capsys.readouterr().out.startswith("ROMEO:")

    # Fine-tune: the run starts from the converted weights (a learning rate of 1e-12 leaves them in place).
    data = ["--dataset_name", str(shakespeare), "--init_from", str(out)]
    tuned = run(tmp_path, *data, "--max_train_steps", "2", "--learning_rate", "1e-12", "--lr_end", "0",
                "--weight_decay", "0", "--save_checkpoint_freq", "1", out="tuned")
    assert "weights from --init_from" in capsys.readouterr().out
    start, after = load_file(out / "model.safetensors"), load_file(tuned / "final_model" / "model.safetensors")
    assert start.keys() == after.keys() and start
    for key in start:
        assert_close(key, after[key], start[key], atol=1e-6)
    assert json.loads((tuned / "final_model" / "config.json").read_text())["ttt_layer_type"] == "mlp"
    # It trains (a real learning rate moves the loss), and resumes with or without repeating --init_from.
    longer = run(tmp_path, *data, "--max_train_steps", "3", "--save_checkpoint_freq", "1", out="longer")
    shutil.rmtree(longer / "final_model")
    shutil.rmtree(longer / "checkpoint-3")
    run(tmp_path, *data, "--max_train_steps", "3", "--resume_from_checkpoint", "latest", out="longer")
    run(tmp_path, "--dataset_name", str(shakespeare), "--max_train_steps", "4", "--resume_from_checkpoint", "latest",
        out="longer")
    assert (longer / "final_model").is_dir()
    fails(capsys, *FAST[2:], "--dataset_name", str(shakespeare), "--init_from", str(tuned / "final_model"),
          "--max_train_steps", "5", "--resume_from_checkpoint", "latest", "--output_dir", str(longer),
          match="differs from that of the run")


@needs_jax
def test_init_from_bad_input(tmp_path, capsys, shakespeare):
    out = converted(tmp_path, JAX / "ttt_linear" / "checkpoint")  # no tokenizer saved
    base = [*FAST[2:], "--dataset_name", str(shakespeare), "--output_dir", str(tmp_path / "run")]
    fails(capsys, *base, "--init_from", str(out), match="has no usable tokenizer")
    fails(capsys, *base, "--init_from", str(out), "--tokenizer_name", str(SHARED / "data" / "llama2_tokenizer"),
          match="has 32000 tokens, more than the vocabulary of --init_from")
    fails(capsys, *base, "--init_from", str(out), "--tokenizer_name", "builtin:bytes", "--ttt_layer_type", "mlp",
          match="--ttt_layer_type mlp conflicts with --init_from")
    fails(capsys, *base, "--init_from", str(out), "--model_size", "tiny", match="--model_size does not apply")
    fails(capsys, *base, "--init_from", str(tmp_path / "missing"), match="does not exist")
    assert not (tmp_path / "run" / "final_model").exists()


def test_init_from_never_unpickles(tmp_path, capsys):
    """A folder holding only a pickled pytorch_model.bin is refused without loading it (loading would run the
    pickle's code: here, creating a file)."""
    folder, marker = tmp_path / "pickled", tmp_path / "pickle-ran"
    config = ttt.TTTConfig.from_size("tiny", vocab_size=300)
    config.save_pretrained(folder)

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model.embed_tokens.weight": Payload()}, folder / "pytorch_model.bin")
    fails(capsys, *FAST[2:], "--dataset_name", "builtin:synthetic", "--init_from", str(folder), "--tokenizer_name",
          "builtin:bytes", "--output_dir", str(tmp_path / "run"), match="no file named model.safetensors")
    assert not marker.exists()


def test_help_is_fast_and_imports_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys, convert_jax_checkpoint as c\n"
            "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'msgpack') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=train_ttt.__file__.rsplit("/", 1)[0])
    assert result.stdout.strip().endswith("[]"), result.stdout


# ---------------------------------------------------------------- TTT-E2E: convert_jax_checkpoint.py e2e

E2E = SHARED / "reference_e2e"
needs_e2e = pytest.mark.skipif(not (E2E / "params.safetensors").is_file(),
                               reason=f"{E2E} is absent (it exists only beside the developers' checkout)")


def convert_e2e(tmp_path, *flags, params=None, config=None, name="e2e"):
    out = tmp_path / name
    code = convert.main(["e2e", "--params", str(params or E2E / "params.safetensors"), "--official_config",
                         str(config or E2E / "config.json"), "--output_dir", str(out), *flags])
    return code, out


@needs_e2e
def test_e2e_conversion_loads_and_runs_the_inner_loop(tmp_path):
    import torch.nn.functional as F

    import ttt_e2e
    from helpers import official_gradients

    code, out = convert_e2e(tmp_path)
    assert code == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, ttt_e2e.E2EForCausalLM) and model.config.train_mode == "meta"
    io = {k: v.long() if v.dtype == torch.int32 else v for k, v in load_file(E2E / "io.safetensors").items()}
    model.eval()
    with torch.no_grad():
        logits = model(io["input_ids"]).logits  # evaluation: the inner loop runs, without a graph
    nll = F.cross_entropy(logits.transpose(1, 2), io["target_tokens"], reduction="none")
    assert_close("token NLL (eval mode)", nll, io["meta.token_nll"], atol=1e-4 * io["meta.token_nll"].max().item())
    model.train()  # training: the same forward keeps the graph through the inner loop
    ttt_e2e.chunk_losses(model(io["input_ids"]).logits, io["target_tokens"], 16, 1).mean().backward()
    grads = official_gradients(model)
    for path in ("language_model.model.h.prime_storage.feed_forward_prime.w2.weight",
                 "language_model.model.h.blocks.seq_modeling_block.wq.weight", "language_model.model.wte.weight"):
        reference = io[f"meta.grad.{path}"]
        assert_close(f"meta-gradient of {path}", grads[path], reference, atol=1e-4 * reference.abs().max().item())


@needs_e2e
def test_e2e_conversion_bad_input(tmp_path, capsys):
    from safetensors.torch import save_file

    params = load_file(E2E / "params.safetensors")
    config = json.loads((E2E / "config.json").read_text())
    cases = []
    missing = {k: v for k, v in params.items() if not k.endswith("ln_f.weight")}
    cases.append((dict(params=missing), "missing parameter language_model.model.ln_f.weight"))
    extra = {**params, "language_model.model.h.blocks.seq_modeling_block.wz.weight": params[
        "language_model.model.ln_f.weight"].clone()}
    cases.append((dict(params=extra), "unexpected parameter language_model.model.h.blocks.seq_modeling_block.wz"))
    fewer_layers = json.loads(json.dumps(config))
    fewer_layers["model"]["num_hidden_layers"] = 3
    cases.append((dict(config=fewer_layers), "its leading (layer) axis should be 3"))
    wider = json.loads(json.dumps(config))
    wider["model"]["intermediate_size"] = 96
    cases.append((dict(config=wider), "which does not give [96, 64]"))
    for n, (change, match) in enumerate(cases):
        paths = {}
        if "params" in change:
            paths["params"] = tmp_path / f"params{n}.safetensors"
            save_file(change["params"], paths["params"])
        if "config" in change:
            paths["config"] = tmp_path / f"config{n}.json"
            paths["config"].write_text(json.dumps(change["config"]))
        capsys.readouterr()
        code, out = convert_e2e(tmp_path, **paths, name="refused")
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(err) == 1 and match in err[0], err
        assert not out.exists()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((E2E / "params.safetensors").read_bytes()[:5000])
    code, out = convert_e2e(tmp_path, params=truncated, name="refused")
    assert code == 1 and "not a readable safetensors file" in capsys.readouterr().err and not out.exists()
