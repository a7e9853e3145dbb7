import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import types

import datasets
import pytest
import torch

import train_ttt
from conftest import ROOT
from helpers import FAST, HANG_GUARD_S, HEAVY_MODULES, fails, losses, metrics, run, wait_for_steps
from ttt import TTTForCausalLM


def test_loss_falls_on_tinyshakespeare(tmp_path, shakespeare, llama_tokenizer_dir):
    folder = run(tmp_path, "--dataset_name", str(shakespeare), "--tokenizer_name", str(llama_tokenizer_dir),
                 "--max_train_steps", "40", "--learning_rate", "3e-3", "--save_checkpoint_freq", "0",
                 "--eval_steps", "20", "--logging_steps", "5")
    records = metrics(folder)
    train = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert train[-1] < train[0] - 2.0  # from ~10.4 (uniform over 32000) down
    assert len(evals) == 2 and evals[1] < evals[0]
    model = TTTForCausalLM.from_pretrained(folder / "final_model")
    assert model.config.vocab_size == 32000
    for record in records:
        if "loss" in record:
            assert set(record) == {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "elapsed"}
            assert record["tokens_per_sec"] > 0 and record["grad_norm"] > 0
        elif "eval_loss" in record:
            assert set(record) == {"step", "eval_loss", "eval_perplexity"}
            assert abs(record["eval_perplexity"] - torch.tensor(record["eval_loss"]).exp().item()) < 1e-3
        elif "event" in record:  # the start: which implementation runs the TTT scan
            assert set(record) == {"step", "event", "kernels", "kernel_detail"} and record["step"] == 0
            assert record["kernels"] == "fallback" and record["kernel_detail"].startswith("TTT scan: recomputing scan")
        else:
            assert set(record) == {"step"} | {f"ttt/layer{i}/{n}" for i in range(4)
                                              for n in ("initial", "before", "after", "update_factor")}
    # TTT statistics of the trained model: each layer's inner update lowers the inner loss of the token it saw
    last_stats = [r for r in records if "ttt/layer0/after" in r][-1]
    assert last_stats["step"] == 40
    for i in range(4):
        assert last_stats[f"ttt/layer{i}/after"] < last_stats[f"ttt/layer{i}/before"]
    saved = json.loads((folder / "training_args.json").read_text())
    assert saved["seq_length"] == 64 and saved["tokenizer_name"] == str(llama_tokenizer_dir)


@pytest.mark.parametrize("model_type", ["ttt", "transformer"])
def test_resume_gives_the_same_losses(tmp_path, model_type):
    common = ["--max_train_steps", "20", "--save_checkpoint_freq", "10", "--gradient_accumulation_steps", "2",
              "--model_type", model_type]
    full = run(tmp_path, *common, out="full")
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-10", resumed / "checkpoint-10")
    run(tmp_path, *common, "--resume_from_checkpoint", "latest", out="resumed")
    # the weights are stored once (model.safetensors); Accelerate's state holds the optimizer and RNG states only
    # (the scheduler's is in trainer_state.json, not in a pickle)
    assert sorted(p.name for p in (full / "checkpoint-10" / "training_state").iterdir()) == [
        "optimizer.bin", "random_states_0.pkl"]
    expected, got = losses(full), losses(resumed)
    assert sorted(got) == list(range(11, 21))
    assert all(got[s] == expected[s] for s in range(11, 21)), (got, expected)
    lrs = {r["step"]: r["lr"] for r in metrics(full) if "lr" in r}
    assert all(r["lr"] == lrs[r["step"]] for r in metrics(resumed) if "lr" in r)


def test_the_progress_rate_after_a_resume_leaves_out_the_first_step(tmp_path, monkeypatch):
    """A fake clock: the resumed process's first step takes an hour (start-up, compilation, the stream's
    fast-forward), every later one a second. The bar's rate is then one step per second, and its elapsed time the
    later steps' (a bar started before the first step reported hours of ETA after a resume)."""
    import tqdm.std

    from ttt_train import loop

    run(tmp_path, "--max_train_steps", "4", "--save_checkpoint_freq", "2")
    clock = types.SimpleNamespace(now=1000.0, steps=0)
    monkeypatch.setattr(tqdm.std, "time", lambda: clock.now)
    bars = []

    class Recorded(tqdm.std.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)
            self.etas = {}

        def update(self, n=1):  # the ETA the bar shows after each step: steps left / its rate
            super().update(n)
            shown = self.format_dict
            self.etas[self.n] = (self.total - self.n) / shown["rate"] if shown["rate"] else None

    def timed_flags(*args):  # once per step, before the step is counted
        clock.steps += 1
        clock.now += 3600.0 if clock.steps == 1 else 1.0
        return flags(*args)

    flags = loop.synchronised_flags
    monkeypatch.setattr(loop, "synchronised_flags", timed_flags)
    monkeypatch.setattr(loop, "tqdm", Recorded)
    run(tmp_path, "--max_train_steps", "14", "--resume_from_checkpoint", "latest")
    (bar,) = bars
    assert bar.etas == pytest.approx({n: 14.0 - n for n in range(6, 15)}), bar.etas
    assert (bar.initial, bar.n, clock.steps) == (5, 14, 10)  # resumed at 4: the bar starts after step 5
    assert bar.format_dict["elapsed"] == 9.0


def test_checkpoints_are_pruned_and_milestones_kept(tmp_path):
    folder = run(tmp_path, "--max_train_steps", "12", "--save_checkpoint_freq", "2", "--save_total_limit", "2",
                 "--save_milestone_freq", "5")
    names = sorted(p.name for p in folder.iterdir() if p.is_dir())
    assert names == ["checkpoint-10", "checkpoint-12", "final_model", "milestone-10", "milestone-5"]
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no partial saves, no lock note
    state = json.loads((folder / "checkpoint-12" / "trainer_state.json").read_text())
    assert state["step"] == 12 and len(state["data"]) == 1 and state["data"][0]["documents"] > 0
    model = TTTForCausalLM.from_pretrained(folder / "checkpoint-12")
    assert model.config.hidden_size == 256


def test_curriculum_resume_with_longer_sequences(tmp_path, capsys):
    folder = run(tmp_path, "--max_train_steps", "4", "--save_checkpoint_freq", "4")
    capsys.readouterr()
    run(tmp_path, "--max_train_steps", "6", "--seq_length", "128", "--per_device_train_batch_size", "1",
        "--resume_from_checkpoint", str(folder / "checkpoint-4"))
    out = capsys.readouterr().out
    assert "resumed from" in out and "seq_length 64 -> 128" in out and "max_train_steps 4 -> 6" in out
    assert sorted(losses(folder)) == [1, 2, 3, 4, 5, 6]
    assert json.loads((folder / "checkpoint-6" / "trainer_state.json").read_text())["step"] == 6


def started_trainer(out, *extra):
    """A trainer process on `out` that has logged at least 3 steps."""
    cmd = [sys.executable, str(ROOT / "train_ttt.py"), *FAST, "--max_train_steps", "100000",
           "--save_checkpoint_freq", "0", "--output_dir", str(out), *extra]
    return wait_for_steps(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           text=True), out)


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_says_how_to_resume_and_exits_non_zero(tmp_path, signum, status):
    """SIGTERM / SIGINT: a checkpoint, the command that resumes, and exit 128 + the signal (a scheduler or a script
    must not read a stopped run as a finished one); that command then finishes the run."""
    out = tmp_path / "run"
    proc = started_trainer(out)
    proc.send_signal(signum)
    output, _ = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == status, output
    saved = [p.name for p in out.iterdir() if p.name.startswith("checkpoint-")]
    assert len(saved) == 1
    step = int(saved[0].split("-")[1])
    assert step >= 3 and not (out / "final_model").exists()
    line = next(line for line in output.splitlines() if "resume with:" in line)
    assert f"stopped by {signal.Signals(signum).name} at step {step} of 100000: saved checkpoint-{step}" in line
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[:2] == ["python", str(ROOT / "train_ttt.py")] and command[-2:] == ["--resume_from_checkpoint",
                                                                                     "latest"]
    argv = command[2:]
    argv[argv.index("--max_train_steps") + 1] = str(step + 2)
    train_ttt.main(argv)
    assert max(losses(out)) == step + 2 and (out / "final_model").exists()


def test_called_as_a_library_the_trainer_leaves_signals_to_its_caller(tmp_path):
    """train_ttt.main(argv) inside another program (a test runner, a notebook) does not take SIGTERM over: the
    signal ends that program as it would have without the trainer, instead of becoming a saved checkpoint."""
    out = tmp_path / "run"
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); sys.argv = ['host']; import train_ttt; "
            f"train_ttt.main({[*FAST, '--max_train_steps', '100000', '--output_dir', str(out)]!r}); print('returned')")
    proc = wait_for_steps(subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True), out)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == -signal.SIGTERM, output  # ended by the signal, as the caller's default handler does
    assert "returned" not in output and not list(out.glob("checkpoint-*"))


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet", "csv", "folder", "save_to_disk"])
def test_local_data_formats(tmp_path, kind):
    docs = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (i % 5 + 1) for i in range(60)]
    rows = datasets.Dataset.from_dict({"content": docs, "id": list(range(60))})
    path = tmp_path / f"data.{kind}"
    if kind == "txt":
        path.write_text("\n\n".join(docs))
    elif kind == "jsonl":
        rows.to_json(path)
    elif kind == "parquet":
        rows.to_parquet(path)
    elif kind == "csv":
        rows.to_csv(path)
    elif kind == "folder":  # a Hub-style repository layout with its own validation split
        path.mkdir()
        rows.select(range(50)).to_json(path / "train.jsonl")
        rows.select(range(50, 60)).to_json(path / "validation.jsonl")
    else:
        datasets.DatasetDict({"train": rows}).save_to_disk(str(path))
    folder = run(tmp_path, "--dataset_name", str(path), "--max_train_steps", "3", "--save_checkpoint_freq", "0",
                 "--max_eval_samples", "2", "--seq_length", "32")
    assert sorted(losses(folder)) == [1, 2, 3]
    assert any("eval_loss" in r for r in metrics(folder))


def test_each_process_reads_its_own_shard():
    import re

    from ttt_train.data import PackedBlocks, byte_tokenizer
    docs = datasets.Dataset.from_dict({"text": [f"doc{i:03d}." for i in range(40)]})  # 8 tokens with EOS
    tok = byte_tokenizer()
    seen = []
    for rank in range(2):
        stream = PackedBlocks(docs, tok, "text", 8, 1, seed=3, rank=rank, world_size=2)
        text = tok.decode(torch.cat([next(stream) for _ in range(20)]).flatten())  # one epoch of this shard
        seen.append(set(re.findall(r"doc\d{3}\.", text)))
    assert len(seen[0]) == len(seen[1]) == 20
    assert not seen[0] & seen[1]


def test_packing_state_resumes_exactly():
    from ttt_train.data import PackedBlocks, byte_tokenizer
    docs = datasets.Dataset.from_dict({"text": [f"document number {i} " * (i % 7 + 1) for i in range(30)]})
    tok = byte_tokenizer()
    stream = PackedBlocks(docs, tok, "text", 16, 3, seed=0)
    [next(stream) for _ in range(80)]  # crosses an epoch boundary
    state = json.loads(json.dumps(stream.state_dict()))
    expected = [next(stream) for _ in range(10)]
    again = PackedBlocks(docs, tok, "text", 16, 3, seed=0, state=state)
    resumed = [next(again) for _ in range(10)]
    assert len(resumed) == len(expected) == 10
    for i, (a, b) in enumerate(zip(expected, resumed)):
        assert torch.equal(a, b), f"block {i} after resuming differs"
    assert state["epoch"] >= 1


def test_streaming_hub_style_loading(tmp_path):
    """The streaming code path used for Hub datasets, on a local Hub-layout folder (no network here)."""
    from ttt_train.data import PackedBlocks, byte_tokenizer, load_raw_dataset, split_train_validation
    (tmp_path / "data").mkdir()
    datasets.Dataset.from_dict({"text": [f"streamed doc {i}" for i in range(50)]}).to_parquet(
        tmp_path / "data" / "train-00000-of-00001.parquet")
    raw = load_raw_dataset(str(tmp_path), None, streaming=True)
    train, validation = split_train_validation(raw, 0.05, 5, seed=0)
    assert isinstance(train, datasets.IterableDataset)
    assert [r["text"] for r in validation] == [f"streamed doc {i}" for i in range(5)]
    tok = byte_tokenizer()
    stream = PackedBlocks(train, tok, "text", 8, 2, seed=0, shuffle_buffer=10)
    [next(stream) for _ in range(5)]
    state = json.loads(json.dumps(stream.state_dict()))
    expected = [next(stream) for _ in range(3)]
    resumed = PackedBlocks(train, tok, "text", 8, 2, seed=0, shuffle_buffer=10, state=state)
    got = [next(resumed) for _ in range(3)]
    assert len(got) == len(expected) == 3
    for i, (a, b) in enumerate(zip(expected, got)):
        assert torch.equal(a, b), f"streamed block {i} after resuming differs: {tok.decode(a.flatten())!r} vs " \
                                  f"{tok.decode(b.flatten())!r}"
    assert state["iterator_state"] is not None
    assert "".join(tok.decode(b.flatten()) for b in expected).count("streamed doc") >= 2


# ---------------------------------------------------------------- bad input: one line on stderr, non-zero exit

def test_missing_file(tmp_path, capsys):
    fails(capsys, "--dataset_name", str(tmp_path / "nope.txt"), "--output_dir", str(tmp_path / "o"),
          match="does not exist")


def test_no_text_column_lists_columns(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    datasets.Dataset.from_dict({"question": ["a", "b", "c"], "answer": ["x", "y", "z"]}).to_json(path)
    err = fails(capsys, "--dataset_name", str(path), "--output_dir", str(tmp_path / "o"), match="no text column")
    assert "question" in err and "answer" in err


def test_named_text_column_missing(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    datasets.Dataset.from_dict({"text": ["a", "b", "c"]}).to_json(path)
    fails(capsys, "--dataset_name", str(path), "--text_column", "body", "--output_dir", str(tmp_path / "o"),
          match="text column 'body' not found")


def test_empty_dataset(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    datasets.Dataset.from_dict({"text": ["", "", ""]}).to_json(path)
    fails(capsys, "--dataset_name", str(path), "--output_dir", str(tmp_path / "o"), match="empty")


def test_bad_tokenizer(tmp_path, capsys):
    (tmp_path / "tok").mkdir()
    fails(capsys, "--tokenizer_name", str(tmp_path / "tok"), "--output_dir", str(tmp_path / "o"),
          match="cannot load tokenizer")


@pytest.mark.parametrize("value", ["0", "-5"])
def test_bad_seq_length(tmp_path, capsys, value):
    fails(capsys, "--seq_length", value, "--output_dir", str(tmp_path / "o"), match="--seq_length must be positive")


def test_bad_model_flag(tmp_path, capsys):
    fails(capsys, "--mini_batch_size", "0", "--output_dir", str(tmp_path / "o"), match="mini_batch_size")


def test_compile_mode_needs_compile(tmp_path, capsys):
    fails(capsys, "--torch_compile_mode", "reduce-overhead", "--output_dir", str(tmp_path / "o"),
          match="--torch_compile_mode reduce-overhead needs --torch_compile")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags, backend, mode", [
    ([], "NO", "default"),
    (["--torch_compile"], "INDUCTOR", "default"),
    (["--torch_compile", "--torch_compile_mode", "reduce-overhead"], "INDUCTOR", "reduce-overhead")])
def test_compile_flags_reach_accelerate(flags, backend, mode, monkeypatch):
    from ttt_train.loop import compile_plugin

    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")  # as an `accelerate launch` config may set it
    plugin = compile_plugin(train_ttt.parse_args([*FAST, *flags]).perf)
    assert (plugin.backend.name, plugin.mode) == (backend, mode)


def test_missing_checkpoint(tmp_path, capsys):
    fails(capsys, "--resume_from_checkpoint", str(tmp_path / "checkpoint-7"), "--output_dir", str(tmp_path / "o"),
          match="does not exist")
    fails(capsys, "--resume_from_checkpoint", "latest", "--output_dir", str(tmp_path / "o"),
          match="no complete checkpoint")


def test_incomplete_or_corrupt_checkpoint_is_refused(tmp_path, capsys):
    folder = run(tmp_path, "--max_train_steps", "2", "--save_checkpoint_freq", "2")
    checkpoint = folder / "checkpoint-2"
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken / "checkpoint-2")
    (broken / "checkpoint-2" / "training_state" / "optimizer.bin").unlink()
    capsys.readouterr()
    fails(capsys, "--resume_from_checkpoint", str(broken / "checkpoint-2"), "--max_train_steps", "4",
          "--output_dir", str(broken), match="training_state/optimizer.bin is missing")
    shutil.rmtree(broken / "checkpoint-2")
    shutil.copytree(checkpoint, broken / "checkpoint-2")
    weights = broken / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    fails(capsys, "--resume_from_checkpoint", "latest", "--max_train_steps", "4", "--output_dir", str(broken),
          match="model.safetensors has 1000 bytes")


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    folder = run(tmp_path, "--max_train_steps", "2", "--save_checkpoint_freq", "2")
    before = (folder / "checkpoint-2" / "model.safetensors").read_bytes()
    capsys.readouterr()
    fails(capsys, "--max_train_steps", "2", "--output_dir", str(folder), match="already holds a run")
    assert (folder / "checkpoint-2" / "model.safetensors").read_bytes() == before


def test_conflicting_model_flag_on_resume(tmp_path, capsys):
    folder = run(tmp_path, "--max_train_steps", "2", "--save_checkpoint_freq", "2")
    capsys.readouterr()
    fails(capsys, *FAST, "--ttt_layer_type", "mlp", "--max_train_steps", "4", "--resume_from_checkpoint", "latest",
          "--output_dir", str(folder), match="--ttt_layer_type mlp conflicts")


def test_config_file_with_command_line_override(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("max_train_steps: 3\nseq_length: 32\nlearning_rate: 0.001\nsave_checkpoint_freq: 0\n")
    folder = run(tmp_path, "--config", str(config), "--max_train_steps", "2")
    saved = json.loads((folder / "training_args.json").read_text())
    assert (saved["max_train_steps"], saved["learning_rate"]) == (2, 0.001)
    assert sorted(losses(folder)) == [1, 2]


def test_config_file_unknown_key(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 3\n")
    with pytest.raises(SystemExit) as exit_info:
        train_ttt.main(["--config", str(config)])
    assert exit_info.value.code != 0 and "max_steps" in capsys.readouterr().err


def test_tensorboard_tracker_writes_events(tmp_path):
    folder = run(tmp_path, "--max_train_steps", "2", "--save_checkpoint_freq", "0", "--report_to", "tensorboard")
    assert list(folder.rglob("events.out.tfevents.*"))


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="W&B is optional and not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    folder = run(tmp_path, "--max_train_steps", "2", "--save_checkpoint_freq", "0", "--report_to", "wandb",
                 "--wandb_run_name", "smoke")
    assert list((folder / "wandb").glob("offline-run-*/run-*.wandb"))


def test_prefetched_batches_and_state_equal_the_plain_stream():
    from ttt_train.data import PackedBlocks, Prefetcher, byte_tokenizer
    docs = datasets.Dataset.from_dict({"text": [f"document number {i} " * (i % 5 + 1) for i in range(40)]})
    tok = byte_tokenizer()
    plain = PackedBlocks(docs, tok, "text", 16, 2, seed=1)
    ahead = Prefetcher(PackedBlocks(docs, tok, "text", 16, 2, seed=1), depth=4, pin_memory=False)
    try:
        for _ in range(7):
            assert torch.equal(next(plain), next(ahead))
        time.sleep(0.2)  # let the thread run ahead: the state must still be the one after batch 7
        assert ahead.state_dict() == plain.state_dict()
    finally:
        ahead.close()


# ---------------------------------------------------------------- the console, precision, trackers, statistics

def test_the_console_shows_the_runs_lines_and_one_progress_bar(tmp_path):
    """Saving, resuming and finishing print nothing but the run's own lines (stdout) and its progress bar (stderr):
    no library progress bars ("Writing model shards", "Loading weights"), notices or deprecation warnings."""
    out = tmp_path / "run"
    base = [sys.executable, str(ROOT / "train_ttt.py"), *FAST, "--output_dir", str(out), "--save_checkpoint_freq", "2"]
    stderr = ""
    for extra in (["--max_train_steps", "2"], ["--max_train_steps", "4", "--resume_from_checkpoint", "latest"]):
        result = subprocess.run([*base, *extra], capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert result.returncode == 0, result.stderr
        stderr += result.stderr
        assert result.stdout.splitlines()[0].startswith("resumed from" if "latest" in extra else "model: TTT-Linear")
        assert f"; writing to {out}" in next(line for line in result.stdout.splitlines() if line.startswith("model:"))
    lines = [line.strip() for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert lines and all(re.fullmatch(r"\d+%\|.*\| \d+/\d+ \[.*\]", line) for line in lines), lines
    assert {int(line.split("/")[1].split()[0]) for line in lines} == {2, 4}  # the run's own bar only


def test_the_start_up_line_says_where_and_how_the_run_computes(tmp_path, capsys):
    run(tmp_path, "--max_train_steps", "1")
    assert "on CPU (one process), float32 (no mixed precision)" in capsys.readouterr().out.splitlines()[0]


@pytest.mark.parametrize("environment, flags, expected", [
    ({}, [], "no"), ({"ACCELERATE_MIXED_PRECISION": "bf16"}, [], "bf16"),
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, ["--mixed_precision", "no"], "no")])
def test_the_launch_configs_precision_is_kept_unless_a_flag_overrides_it(monkeypatch, environment, flags, expected):
    """`accelerate launch --config_file accelerate_config.yaml` passes the config's mixed_precision (bf16) in the
    environment; the trainer takes it unless --mixed_precision is given (the two-process test launches so)."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert train_ttt.parse_args([*FAST, *flags]).optim.mixed_precision == expected


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (optional)")
def test_a_tracker_that_cannot_start_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_MODE="online", WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
               NETRC=str(tmp_path / "netrc"))
    result = subprocess.run([sys.executable, str(ROOT / "train_ttt.py"), *FAST, "--max_train_steps", "1",
                             "--report_to", "wandb", "--output_dir", str(tmp_path / "run")],
                            capture_output=True, text=True, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                            timeout=300)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "--report_to wandb: the tracker cannot start" in errors[0] and "wandb login" in errors[0]


def test_a_clamped_update_factor_is_reported(tmp_path, capsys):
    """c_{K-1} = max(0, 1/K + tau_{K-1}) = 0 stops the inner weights carrying anything across mini-batches: the
    statistics report it per layer, and the trainer says so once."""
    from ttt import TTTConfig
    from ttt_train.loop import clamped_layers

    torch.manual_seed(0)
    model = TTTForCausalLM(TTTConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, mini_batch_size=8))
    with torch.no_grad():
        model.model.layers[1].seq_modeling_block.learnable_token_idx[-1] = -0.2  # 1/8 - 0.2 < 0
    layers = model.ttt_statistics(torch.randint(0, 97, (1, 24)))
    assert layers[0]["update_factor"] == [pytest.approx(0.125)] and layers[1]["update_factor"] == [0.0]
    stats = {f"ttt/layer{i}/{k}": sum(v) / len(v) for i, layer in enumerate(layers) for k, v in layer.items()}
    assert clamped_layers(stats) == [1]


@pytest.mark.parametrize("bug", [RuntimeError, ValueError, KeyError])
def test_only_user_errors_become_one_line(monkeypatch, bug):
    """A bug (anything but a UserError, even a ValueError) keeps its traceback; user errors are one line."""
    import ttt_train.loop
    from ttt_train.cli import UserError

    def broken(args, handle_signals):
        raise bug("a bug")
    monkeypatch.setattr(ttt_train.loop, "train", broken)
    with pytest.raises(bug):
        train_ttt.main(FAST)

    def refused(args, handle_signals):
        raise UserError("your input")
    monkeypatch.setattr(ttt_train.loop, "train", refused)
    with pytest.raises(SystemExit):
        train_ttt.main(FAST)


def test_help_is_fast_and_names_the_models_tables():
    """--help imports neither torch, nor the model, nor transformers' models (under a second where they take
    several; the parser is transformers' HfArgumentParser, whose package imports lazily, about 0.6 s); the size and
    layer choices it names are the model's tables."""
    import ttt
    import ttt_e2e
    from ttt_train import families

    assert list(train_ttt.MODEL_SIZES) == list(ttt.TTT_STANDARD_CONFIGS)
    assert list(train_ttt.E2E_MODEL_SIZES) == list(ttt_e2e.E2E_STANDARD_CONFIGS)
    assert list(train_ttt.FAMILIES) == list(families.NAMES)
    from ttt_train import models

    assert list(train_ttt.PRESETS) == list(models.PRESETS)
    assert tuple(train_ttt.LAYER_TYPES) == tuple(ttt.TTT_LAYER_TYPES)
    script = str(ROOT / "train_ttt.py")
    probe = (f"import runpy, sys\nsys.argv = [{script!r}, '--help']\n"
             f"try:\n    runpy.run_path({script!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
             f"print({HEAVY_MODULES})")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0 and result.stdout.strip().endswith("[]"), result.stdout[-500:] + result.stderr
