"""Checkpoints and runs a user can trust: no code from a checkpoint, one owner per output directory, branches
on resume, the divergence guard, integrity, kills at any moment, and one clear line for bad input. Kills and
concurrency use real processes."""

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import train_ttt
import ttt
from conftest import ROOT
from helpers import FAST, fails, losses, metrics, run, wait_until
from ttt_train import checkpoint as ckpt
from ttt_train import rundir

TRAINER = [sys.executable, str(ROOT / "train_ttt.py"), *FAST]


class Payload:
    """Unpickling it creates the file MARKER: the proof that a checkpoint ran code."""

    def __reduce__(self):
        return (Path.touch, (Path(os.environ["TTT_TEST_MARKER"]),))


def checkpoint_files(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def saved_run(trained_run):
    """The session's shared TTT-Linear run of 4 steps with checkpoint-2 and checkpoint-4 (conftest.trained_run),
    copied by each test that changes it."""
    return trained_run("ttt")


def copy_of(saved_run, tmp_path) -> Path:
    folder = tmp_path / "run"
    shutil.copytree(saved_run, folder)
    shutil.rmtree(folder / "final_model")
    shutil.rmtree(folder / "checkpoint-4")
    return folder


def resume(folder, *extra, steps=4):
    return [*FAST, "--output_dir", str(folder), "--max_train_steps", str(steps), "--resume_from_checkpoint",
            "latest", *extra]


# ---------------------------------------------------------------- 1. no code from a checkpoint

@pytest.mark.parametrize("replace_manifest_entry", [False, True], ids=["as-written", "manifest-forged"])
def test_a_pickle_planted_in_any_checkpoint_file_never_runs(saved_run, tmp_path, monkeypatch, capsys,
                                                            replace_manifest_entry):
    """Each file of a checkpoint in turn (and Accelerate's custom_checkpoint_0.pkl, which it would unpickle with
    weights_only=False) is replaced by a pickle that creates a marker file when loaded. Resuming refuses it
    (checksums; or, with the manifest forged to match, the loaders' own refusals) or ignores it; the payload
    never runs. As-written: every case is refused with one error line."""
    marker = tmp_path / "pwned"
    monkeypatch.setenv("TTT_TEST_MARKER", str(marker))
    names = checkpoint_files(saved_run / "checkpoint-2") + ["training_state/custom_checkpoint_0.pkl"]
    outcomes = {}
    for name in names:
        folder = copy_of(saved_run, tmp_path / name.replace("/", "_"))
        target = folder / "checkpoint-2" / name
        target.write_bytes(pickle.dumps(Payload()))
        if replace_manifest_entry and name != rundir.TRAINER_STATE:
            state_path = folder / "checkpoint-2" / rundir.TRAINER_STATE
            state = json.loads(state_path.read_text())
            state["manifest"][name] = {"size": target.stat().st_size, "sha256": ckpt.sha256(target)}
            state_path.write_text(json.dumps(state))
        capsys.readouterr()
        try:
            train_ttt.main(resume(folder))
            outcome = "resumed"
        except SystemExit as exit_info:
            assert exit_info.code == 1
            errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
            assert len(errors) == 1 and "checkpoint" in errors[0], (name, errors)
            assert "weights_only" not in errors[0] and "will likely succeed" not in errors[0], errors  # no unsafe tip
            outcome = "refused"
        assert not marker.exists(), f"a pickle in {name} ran code"
        outcomes[name] = outcome
    assert len(outcomes) == len(names) >= 9
    if not replace_manifest_entry:
        assert set(outcomes.values()) == {"refused"}, outcomes
    else:  # the loaders refuse what they read; the trainer reads neither generation_config.json, nor the model
        # card, nor the model's code shipped for other processes (ttt.py and the files it imports: never run here)
        unread = {"generation_config.json", "README.md"} | {n for n in names if n.endswith(".py")}
        assert {n for n, o in outcomes.items() if o == "resumed"} == unread, outcomes


# A module that records its own execution: shipped in a folder beside an auto_map that names it.
FOREIGN_CODE = """import os, pathlib
pathlib.Path(os.environ["TTT_TEST_MARKER"]).write_text("ran")
from transformers import PretrainedConfig, PreTrainedTokenizerFast
class ForeignConfig(PretrainedConfig):
    model_type = "foreign_model"
class ForeignTokenizer(PreTrainedTokenizerFast):
    pass
"""


def folder_with_code(folder: Path, kind: str) -> Path:
    """A model folder (config.json) or a tokenizer folder (tokenizer_config.json) whose auto_map points at
    foreign.py, a file of its own."""
    folder.mkdir(parents=True)
    (folder / "foreign.py").write_text(FOREIGN_CODE)
    if kind == "model":
        (folder / "config.json").write_text(json.dumps({
            "model_type": "foreign_model", "architectures": ["ForeignModel"],
            "auto_map": {"AutoConfig": "foreign.ForeignConfig", "AutoModelForCausalLM": "foreign.ForeignModel"}}))
    else:
        from ttt_train.data import byte_tokenizer

        byte_tokenizer().save_pretrained(folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config.update(tokenizer_class="ForeignTokenizer",
                      auto_map={"AutoTokenizer": [None, "foreign.ForeignTokenizer"]})
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def on_a_terminal(argv, env) -> tuple:
    """(exit status, output) of argv run on a pseudo-terminal that answers `y` to every question (as a user who
    types y at transformers' "Do you wish to run the custom code? [y/N]")."""
    import pty  # noqa: F401  (POSIX only, as the rest of these process tests)

    controller, terminal = os.openpty()
    proc = subprocess.Popen(argv, stdin=terminal, stdout=terminal, stderr=terminal, env=env, cwd=ROOT,
                            start_new_session=True)
    os.close(terminal)
    output = b""
    os.write(controller, b"y\ny\ny\ny\n")
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)
    return proc.wait(timeout=120), output.decode(errors="replace")


@pytest.mark.parametrize("tool, kind", [("generate", "model"), ("evaluate", "model"), ("init_from", "model"),
                                        ("train", "tokenizer"), ("generate", "tokenizer")])
def test_code_in_a_model_or_tokenizer_folder_never_runs(tmp_path, tool, kind):
    """Every loader passes trust_remote_code=False: a folder that ships code is one error line, even on a terminal
    whose user answers y to transformers' question."""
    folder = folder_with_code(tmp_path / "folder", kind)
    marker = tmp_path / "ran"
    script = {"generate": "generate.py", "evaluate": "evaluate.py"}.get(tool, "train_ttt.py")
    if kind == "model":
        argv = {"generate": ["--model_name_or_path", str(folder), "--tokenizer_name", "builtin:bytes"],
                "evaluate": ["--model_name_or_path", str(folder), "--tokenizer_name", "builtin:bytes",
                             "--dataset_name", "builtin:synthetic", "--seq_length", "32", "--output_dir",
                             str(tmp_path / "eval")],
                "init_from": [*FAST[2:], "--init_from", str(folder), "--tokenizer_name", "builtin:bytes",
                              "--output_dir", str(tmp_path / "out")]}[tool]
    else:
        argv = {"train": [*FAST, "--tokenizer_name", str(folder), "--output_dir", str(tmp_path / "out")],
                "generate": ["--model_name_or_path", str(tmp_path / "nope"), "--tokenizer_name", str(folder)]}[tool]
    if tool == "generate" and kind == "tokenizer":  # a real model, so that the tokenizer is what gets refused
        ttt.TTTForCausalLM(ttt.TTTConfig(**ttt.TTT_STANDARD_CONFIGS["tiny"], vocab_size=259)).save_pretrained(
            tmp_path / "nope")
    status, output = on_a_terminal([sys.executable, str(ROOT / script), *argv],
                                   {**os.environ, "TTT_TEST_MARKER": str(marker)})
    assert not marker.exists(), output
    assert status == 1, output
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "ships Python code of its own" in errors[0] and "[y/N]" not in output, output


def test_a_folder_of_our_own_model_type_loads_our_classes_and_ignores_its_auto_map(tmp_path, monkeypatch):
    """A TTT model folder whose auto_map names code beside it (as a portable model folder does) loads the
    project's TTTForCausalLM; the folder's copy is never imported."""
    from ttt_train import data

    folder = tmp_path / "model"
    model = ttt.TTTForCausalLM(ttt.TTTConfig(**ttt.TTT_STANDARD_CONFIGS["tiny"], vocab_size=259))
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "foreign.ForeignConfig", "AutoModelForCausalLM": "foreign.ForeignModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "foreign.py").write_text(FOREIGN_CODE)
    monkeypatch.setenv("TTT_TEST_MARKER", str(tmp_path / "ran"))
    loaded = data.load_model(str(folder))
    assert type(loaded) is ttt.TTTForCausalLM and not (tmp_path / "ran").exists()
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


# ---------------------------------------------------------------- 2. one owner per output directory, branches

def test_two_trainers_on_one_output_dir(tmp_path):
    """The second process is refused at once with one line naming the first; the first finishes untouched."""
    out = tmp_path / "run"
    first = subprocess.Popen([*TRAINER, "--output_dir", str(out), "--max_train_steps", "100000",
                              "--save_checkpoint_freq", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    wait_until((out / "metrics.jsonl").exists, first, "metrics.jsonl")
    second = subprocess.run([*TRAINER, "--output_dir", str(out), "--max_train_steps", "3", "--resume_from_checkpoint",
                             "latest"], capture_output=True, text=True, timeout=120)
    first.send_signal(signal.SIGTERM)
    output, _ = first.communicate(timeout=120)
    assert first.returncode == 143, output
    assert second.returncode == 1
    errors = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and f"output_dir {out} is in use by a running trainer (pid {first.pid}" in errors[0]
    steps = [r["step"] for r in metrics(out) if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # one writer


def test_the_lock_is_the_folders_not_its_note(tmp_path):
    """A holder in another process keeps the folder even when its note is gone (deleted by a user, or by a release
    racing a start): a lock on the note file itself would be lost with it. Released, the folder is free and the
    note gone."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ttt_train import rundir; "
                               f"rundir.RunLock({str(out)!r}).acquire(); print('held', flush=True); time.sleep(600)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (out / rundir.LOCK_FILE).unlink()
        with pytest.raises(rundir.CheckpointError, match="is in use by a running trainer"):
            rundir.RunLock(out).acquire()
        with pytest.raises(rundir.CheckpointError, match="is in use by a running trainer"):
            rundir.RunLock(out).check_free()
    finally:
        holder.kill()
        holder.wait()
    lock = rundir.RunLock(out)
    assert lock.acquire() is None  # its note was deleted: nothing to report
    assert (out / rundir.LOCK_FILE).read_text().startswith(f"pid {os.getpid()} ")
    lock.release()
    assert not (out / rundir.LOCK_FILE).exists()
    rundir.RunLock(out).check_free()


def test_a_lock_left_by_a_killed_trainer_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    proc = subprocess.Popen([*TRAINER, "--output_dir", str(out), "--max_train_steps", "100000",
                             "--save_checkpoint_freq", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: rundir.list_checkpoints(out), proc, "a checkpoint")
    proc.kill()
    proc.wait()
    assert (out / rundir.LOCK_FILE).read_text().startswith(f"pid {proc.pid} ")
    step = rundir.list_checkpoints(out)[-1][0]
    capsys.readouterr()
    train_ttt.main(resume(out, steps=step + 2))
    assert f"took over the lock of a trainer that ended without releasing it (pid {proc.pid}" in capsys.readouterr().out
    assert (out / "final_model").exists() and not (out / rundir.LOCK_FILE).exists()  # released in order: no note


def test_resuming_an_older_checkpoint_starts_a_branch(tmp_path, capsys):
    """Resume from checkpoint-2 while the abandoned continuation's checkpoint-4/-6 exist, keeping 1 checkpoint:
    those move to abandoned/, and the new branch's checkpoints and `latest` are the ones kept."""
    out = run(tmp_path, "--max_train_steps", "6", "--save_checkpoint_freq", "2", "--save_total_limit", "5")
    shutil.rmtree(out / "final_model")
    abandoned_loss = losses(out)[5]
    train_ttt.main([*FAST, "--output_dir", str(out), "--max_train_steps", "5", "--save_checkpoint_freq", "2",
                    "--save_total_limit", "1", "--learning_rate", "1e-3", "--resume_from_checkpoint",
                    str(out / "checkpoint-2")])
    assert "moved to" in capsys.readouterr().out
    [moved] = (out / rundir.ABANDONED_DIR).iterdir()
    assert sorted(p.name for p in moved.iterdir()) == ["checkpoint-4", "checkpoint-6", "metrics.jsonl"]
    assert losses(moved)[5] == abandoned_loss  # the abandoned continuation's record is kept there
    assert [p.name for _, p in rundir.list_checkpoints(out)] == ["checkpoint-5"]  # limit 1: the branch's newest
    assert json.loads((out / "checkpoint-5" / rundir.TRAINER_STATE).read_text())["args"]["learning_rate"] == 1e-3
    assert losses(out)[5] != abandoned_loss  # metrics.jsonl holds the branch's step 5, once
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------- 3. divergence

@pytest.fixture
def nan_at_step(monkeypatch):
    """The loss of the n-th forward in training mode becomes NaN (its gradients too)."""
    def arm(*bad_calls):
        calls = {"n": 0}
        forward = ttt.TTTForCausalLM.forward

        def poisoned(self, *args, **kwargs):
            out = forward(self, *args, **kwargs)
            if self.training:
                calls["n"] += 1
                if calls["n"] in bad_calls:
                    out.loss = out.loss * float("nan")
            return out

        monkeypatch.setattr(ttt.TTTForCausalLM, "forward", poisoned)
    return arm


def test_divergence_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path, capsys, nan_at_step):
    nan_at_step(5)
    err = fails(capsys, *FAST, "--output_dir", str(tmp_path / "run"), "--max_train_steps", "8",
                "--save_checkpoint_freq", "2", "--save_total_limit", "1", match="training diverged at step 5")
    assert "checkpoint-4" in err
    out = tmp_path / "run"
    assert [p.name for _, p in rundir.list_checkpoints(out)] == ["checkpoint-4"] and not (out / "final_model").exists()
    assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoint-4" / "model.safetensors").values())


def test_skip_mode_skips_a_non_finite_step(tmp_path, nan_at_step):
    nan_at_step(3)
    out = run(tmp_path, "--max_train_steps", "5", "--on_nonfinite", "skip")
    skipped = [r for r in metrics(out) if "skipped" in r]
    assert [r["step"] for r in skipped] == [3] and "not finite" in skipped[0]["skipped"]
    assert all(torch.isfinite(t).all() for t in load_file(out / "final_model" / "model.safetensors").values())


@pytest.mark.parametrize("flag, value", [("--learning_rate", "inf"), ("--ttt_base_lr", "nan"),
                                          ("--max_grad_norm", "nan"), ("--lr_end", "nan"), ("--weight_decay", "-inf")])
def test_non_finite_flags_are_refused(tmp_path, capsys, flag, value):
    fails(capsys, *FAST, flag, value, "--output_dir", str(tmp_path / "o"), match=f"{flag}")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- 5. integrity

@pytest.mark.parametrize("name", ["model.safetensors", "training_state/optimizer.bin",
                                  "training_state/random_states_0.pkl", "tokenizer.json"])
def test_a_flipped_byte_is_named(saved_run, tmp_path, capsys, name):
    folder = copy_of(saved_run, tmp_path)
    path = folder / "checkpoint-2" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size
    path.write_bytes(bytes(data))
    fails(capsys, *resume(folder), match=f"{name} does not match the SHA-256")


def test_a_corrupt_trainer_state_is_one_line(saved_run, tmp_path, capsys):
    folder = copy_of(saved_run, tmp_path)
    path = folder / "checkpoint-2" / rundir.TRAINER_STATE
    path.write_bytes(path.read_bytes()[:100])
    fails(capsys, *resume(folder), match=f"{rundir.TRAINER_STATE} is not valid JSON")


@pytest.mark.parametrize("tool", ["evaluate", "generate", "init_from"])
def test_a_final_model_altered_after_training_is_refused_wherever_it_is_read(saved_run, tmp_path, capsys, tool):
    """final_model's trainer_state.json holds the SHA-256 of each of its files: evaluate.py, generate.py and
    --init_from check them before loading (a folder without that manifest, e.g. a converted model, loads as is)."""
    from ttt_lm import evaluate, generate

    model = tmp_path / "final_model"
    shutil.copytree(saved_run / "final_model", model)
    weights = bytearray((model / "model.safetensors").read_bytes())
    weights[-3] ^= 0x01  # one bit of one weight: still a readable safetensors file
    (model / "model.safetensors").write_bytes(bytes(weights))
    main, argv = {
        "evaluate": (evaluate.main, ["--model_name_or_path", str(model), "--dataset_name", "builtin:synthetic",
                                     "--seq_length", "32", "--output_dir", str(tmp_path / "eval")]),
        "generate": (generate.main, ["--model_name_or_path", str(model), "--max_new_tokens", "2"]),
        "init_from": (train_ttt.main, [*FAST[2:], "--init_from", str(model), "--output_dir", str(tmp_path / "o"),
                                       "--max_train_steps", "1"])}[tool]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and f"{model} is corrupt: model.safetensors does not match the SHA-256" in err[0], err
    assert not (tmp_path / "eval" / "eval.json").exists()


# ---------------------------------------------------------------- 6. kills at any moment

@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_completes(tmp_path):
    """Three SIGKILLs at random moments (during steps, saves, the final model), then `latest` finishes the run,
    with one metrics line per step and no temporary folders left."""
    out, steps = tmp_path / "run", 14
    command = [*TRAINER, "--output_dir", str(out), "--max_train_steps", str(steps), "--save_checkpoint_freq", "1",
               "--save_total_limit", "2"]
    rng = random.Random(0)
    newest = lambda: rundir.list_checkpoints(out)[-1][0] if rundir.list_checkpoints(out) else 0
    for _ in range(3):
        resume_flag = ["--resume_from_checkpoint", "latest"] if newest() else []
        before = newest()
        proc = subprocess.Popen([*command, *resume_flag], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # once it has saved a step of its own (a step takes a few tenths of a second, and a save follows each), a
        # kill at a random moment lands in a step, a save or a rename
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline and newest() <= before:
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 1.5))
        proc.kill()
        proc.wait()
    if (out / "final_model").exists():  # it finished before a kill: remove the final model to have it rewritten
        shutil.rmtree(out / "final_model")
    resume_flag = ["--resume_from_checkpoint", "latest"] if rundir.list_checkpoints(out) else []
    result = subprocess.run([*command, *resume_flag], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "final_model" / "model.safetensors").exists()
    assert not [p.name for p in out.iterdir() if p.name.endswith((".partial", ".previous"))]
    assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, steps + 1))


def test_a_kill_while_the_final_model_is_written_is_finished_by_resume(saved_run, tmp_path, capsys):
    """checkpoint-4 is the last step; final_model was being written (a .partial folder) when the process died."""
    folder = tmp_path / "run"
    shutil.copytree(saved_run, folder)
    os.replace(folder / "final_model", folder / ".final_model.partial")
    capsys.readouterr()
    train_ttt.main(resume(folder))
    out = capsys.readouterr().out
    assert "removed .final_model.partial" in out and "wrote" in out
    assert (folder / "final_model" / "model.safetensors").exists()
    assert not (folder / ".final_model.partial").exists()
    fails(capsys, *resume(folder), match="raise --max_train_steps")  # now complete: nothing left to do


def test_a_checkpoint_moved_aside_mid_rename_is_restored(saved_run, tmp_path, capsys):
    """Killed between moving checkpoint-4 aside and renaming its replacement in: it is put back."""
    folder = tmp_path / "run"
    shutil.copytree(saved_run, folder)
    os.replace(folder / "checkpoint-4", folder / ".checkpoint-4.previous")
    shutil.rmtree(folder / "final_model")
    train_ttt.main(resume(folder, steps=6))
    assert "restored checkpoint-4" in capsys.readouterr().out
    assert sorted(losses(folder)) == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------- 7. resume mismatches

def test_resume_refuses_another_model_size(saved_run, tmp_path, capsys):
    folder = copy_of(saved_run, tmp_path)
    argv = [a if a != "tiny" else "125m" for a in resume(folder)]
    fails(capsys, *argv, match="--model_size 125m conflicts with checkpoint")


def test_resume_refuses_another_tokenizer_of_the_same_size(saved_run, tmp_path, capsys):
    from ttt_train.data import byte_tokenizer

    tokenizer = byte_tokenizer()
    vocab = tokenizer.get_vocab()
    swapped = tmp_path / "swapped"
    tokenizer.save_pretrained(swapped)
    spec = json.loads((swapped / "tokenizer.json").read_text())
    a, b = "a", "b"  # two tokens trade ids: the same size, another tokenizer
    spec["model"]["vocab"][a], spec["model"]["vocab"][b] = vocab[b], vocab[a]
    (swapped / "tokenizer.json").write_text(json.dumps(spec))
    folder = copy_of(saved_run, tmp_path)
    fails(capsys, *resume(folder, "--tokenizer_name", str(swapped)), match="vocabularies differ")


# ---------------------------------------------------------------- 8. bad values

@pytest.mark.parametrize("values, words", [
    ({"seq_length": True}, "seq_length must be an integer"), ({"learning_rate": "fast"}, "learning_rate must be a"),
    ({"output_dir": 5}, "output_dir must be a string"), ({"dataset_name": None}, "dataset_name must be a string"),
    ({"pre_conv": "yes"}, "pre_conv must be true or false"), ({"max_train_steps": 2.5}, "must be an integer")])
def test_yaml_values_of_the_wrong_type_are_refused(tmp_path, capsys, values, words):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(values))
    fails(capsys, "--config", str(config), "--output_dir", str(tmp_path / "o"), match=words)


def test_a_binary_yaml_file_is_one_line(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_bytes(b"\xff\xfe\x00binary")
    fails(capsys, "--config", str(config), match="cannot read --config")


def test_warm_up_longer_than_the_run_is_refused(tmp_path, capsys):
    fails(capsys, *FAST, "--max_train_steps", "5", "--lr_warmup_steps", "10", "--output_dir", str(tmp_path / "o"),
          match="--lr_warmup_steps (10) exceeds --max_train_steps (5)")


@pytest.mark.parametrize("field, value", [("mini_batch_size", True), ("ttt_base_lr", float("nan")),
                                           ("rms_norm_eps", -1.0), ("rope_theta", 0.0), ("num_hidden_layers", 2.0)])
def test_config_fields_are_checked(field, value):
    with pytest.raises(ValueError, match=field):
        ttt.TTTConfig(**{field: value})


def test_empty_input_and_out_of_vocabulary_ids_are_clear_errors():
    model = ttt.TTTForCausalLM(ttt.TTTConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2, mini_batch_size=4))
    with pytest.raises(ValueError, match="length >= 1"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="token id 50, outside the vocabulary"):
        model(torch.tensor([[1, 50]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 3]]))


# ---------------------------------------------------------------- 9. output hygiene

def test_a_fresh_run_refuses_a_directory_with_old_metrics(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    fails(capsys, *FAST, "--output_dir", str(tmp_path / "o"), match="holds metrics.jsonl of a run that saved no")
    assert (tmp_path / "o" / "metrics.jsonl").read_text() == '{"step": 1, "loss": 3.0}\n'


def test_a_checkpoint_folder_without_trainer_state_is_never_overwritten(tmp_path, capsys):
    (tmp_path / "o" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "o" / "checkpoint-2" / "notes.txt").write_text("mine")
    fails(capsys, *FAST, "--output_dir", str(tmp_path / "o"), match="checkpoint-2 without trainer_state.json")
    assert (tmp_path / "o" / "checkpoint-2" / "notes.txt").read_text() == "mine"


def users_files(folder: Path) -> dict:
    """Files a user keeps in a run directory under names that look like the trainer's side-names, and their text."""
    files = {".data.partial/corpus.txt": "my corpus", ".settings.previous/settings": "mine", "notes.md": "my notes",
             "tokenizer/README": "my tokenizer"}
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return files


def test_resume_touches_only_the_trainers_own_names(saved_run, tmp_path):
    """Start-up clean-up removes a partial save only with the trainer's mark inside, restores only a .X.previous
    that is a complete save; a user's folders with look-alike names stay as they were."""
    folder = copy_of(saved_run, tmp_path)
    files = users_files(folder)  # tokenizer/ too: this run did not train one
    ours = folder / ".checkpoint-3.partial"  # what a kill mid-save leaves: the mark, part of the files
    ours.mkdir()
    (ours / rundir.TRAINER_MARK).touch()
    (ours / "model.safetensors").write_bytes(b"half")
    # a kill between a save's mkdir and its mark leaves an empty folder (found by the random kill -9 test)
    empty = folder / ".milestone-3.partial"
    empty.mkdir()
    train_ttt.main(resume(folder))
    assert {name: (folder / name).read_text() for name in files} == files
    assert not ours.exists() and not empty.exists() and (folder / "final_model").is_dir()


def test_a_fresh_run_refuses_foreign_files_and_overwrite_leaves_them(tmp_path, capsys):
    folder = tmp_path / "o"
    folder.mkdir()
    (folder / "notes.md").write_text("my notes")
    fails(capsys, *FAST, "--output_dir", str(folder), match="holds files this trainer did not write (notes.md)")
    train_ttt.main([*FAST, "--output_dir", str(folder), "--max_train_steps", "2", "--overwrite_output_dir"])
    assert (folder / "notes.md").read_text() == "my notes" and (folder / "final_model").is_dir()


def test_overwrite_replaces_an_attempts_files_but_never_a_users_tokenizer(tmp_path, capsys):
    folder = tmp_path / "o"
    folder.mkdir()
    (folder / "training_args.json").write_text('{"old": true}')
    fails(capsys, *FAST, "--output_dir", str(folder), match="holds training_args.json of a run that saved no")
    assert (folder / "training_args.json").read_text() == '{"old": true}'
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.txt").write_text("mine")
    fails(capsys, *FAST, "--output_dir", str(folder), "--train_tokenizer", "--vocab_size", "300",
          "--overwrite_output_dir", match="tokenizer/ was not written by this trainer")
    assert (folder / "tokenizer" / "vocab.txt").read_text() == "mine"
    assert (folder / "training_args.json").read_text() == '{"old": true}'
    shutil.rmtree(folder / "tokenizer")
    capsys.readouterr()
    train_ttt.main([*FAST, "--output_dir", str(folder), "--max_train_steps", "2", "--overwrite_output_dir"])
    assert "removed training_args.json" in capsys.readouterr().out
    assert json.loads((folder / "training_args.json").read_text())["max_train_steps"] == 2


@pytest.mark.parametrize("link", ["checkpoint-1", ".checkpoint-6.partial", "final_model"])
def test_a_link_in_the_run_directory_is_refused_and_its_target_untouched(saved_run, tmp_path, capsys, link):
    folder = copy_of(saved_run, tmp_path)
    target = tmp_path / "elsewhere"
    shutil.copytree(saved_run / "checkpoint-2", target)
    before = checkpoint_files(target)
    (folder / link).symlink_to(target, target_is_directory=True)
    fails(capsys, *resume(folder, "--save_total_limit", "1"), match=f"{link} is a symbolic link")
    assert checkpoint_files(target) == before


def test_evaluate_refuses_to_replace_an_earlier_evaluation(saved_run, tmp_path, capsys):
    from ttt_lm import evaluate

    out = tmp_path / "eval"
    out.mkdir()
    (out / "eval.json").write_text("[]")
    argv = ["--model_name_or_path", str(saved_run / "final_model"), "--dataset_name", "builtin:synthetic",
            "--seq_length", "32", "--max_eval_tokens", "64", "--output_dir", str(out)]
    with pytest.raises(SystemExit):
        evaluate.main(argv)
    assert "already holds eval.json of an earlier evaluation" in capsys.readouterr().err
    assert (out / "eval.json").read_text() == "[]"
    evaluate.main([*argv, "--overwrite_output_dir"])
    assert json.loads((out / "eval.json").read_text())[0]["tokens"] > 0


def test_resume_keeps_one_metrics_line_per_step(saved_run, tmp_path):
    folder = copy_of(saved_run, tmp_path)  # metrics.jsonl has steps 3 and 4 after checkpoint-2
    with (folder / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # a line cut short by a kill
    train_ttt.main(resume(folder, steps=5))
    steps = [r["step"] for r in metrics(folder) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5]
    assert [r["step"] for r in metrics(folder) if "eval_loss" in r] == [5]


def test_the_final_model_carries_no_training_text(saved_run):
    state = json.loads((saved_run / "final_model" / rundir.TRAINER_STATE).read_text())
    assert "data" not in state and "scheduler" not in state and state["step"] == 4


# ---------------------------------------------------------------- 10. common mistakes: one line each

@pytest.mark.parametrize("name, content, words", [
    ("binary.txt", b"\x00\x01\xff\xfe binary \x00", "is not UTF-8 text"),
    ("latin1.txt", "caf\xe9 au lait\n\nmore\n".encode("latin-1"), "is not UTF-8 text"),
    ("cut.jsonl", b'{"text": "a"}\n{"text": \n', "cannot read data"),
    ("cut.json", b'[{"text": "a"}, ', "cannot read data"),
    ("numbers.jsonl", b'{"text": 5}\n{"text": 7}\n', "holds int64 values, not text")])
@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "streamed"])
def test_unreadable_data_files(tmp_path, capsys, name, content, words, streaming):
    path = tmp_path / name
    path.write_bytes(content)
    fails(capsys, *FAST, "--dataset_name", str(path), *(["--streaming"] if streaming else []),
          "--output_dir", str(tmp_path / "o"), match=words)


def test_a_small_stream_held_out_entirely_says_why(tmp_path, capsys):
    path = tmp_path / "small.txt"
    path.write_text("\n\n".join(f"document {i}" for i in range(20)))
    fails(capsys, *FAST, "--dataset_name", str(path), "--streaming", "--output_dir", str(tmp_path / "o"),
          match="lower --streaming_eval_docs")


@pytest.mark.parametrize("flags, match", [
    (["--output_dir", "{tmp}/file/run"], "is a file, so no folder can be made under it"),
    (["--train_tokenizer", "--vocab_size", "1000000000"], "--vocab_size 1000000000 exceeds 1048576"),
    (["--target_params", "1e15"], "--target_params 1000000000000000 cannot be trained here"),
    (["--max_steps", "3", "--max_train_steps", "4"], "--max_steps 3 and --max_train_steps 4 set the same setting"),
    (["--bf16", "--mixed_precision", "no"], "--bf16 bf16 and --mixed_precision no set the same setting"),
    (["--output_dir", "s3://"], "s3:// names no bucket"),
], ids=["under-a-file", "vocab-size", "target-params", "two-spellings", "bf16-and-no", "bucketless"])
def test_impossible_requests_are_one_line_before_any_work(tmp_path, capsys, flags, match):
    (tmp_path / "file").write_text("not a folder")
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    out = [] if "--output_dir" in flags else ["--output_dir", str(tmp_path / "run")]
    fails(capsys, *FAST[2:], *out, *flags, match=match)
    assert not (tmp_path / "run").exists()


def test_yaml_numbers_as_users_write_them_and_duplicate_keys(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 1e-3\nlr_end: 1e-5\n")  # YAML 1.1 (PyYAML) reads these as strings
    optim = train_ttt.parse_args(["--config", str(config)]).optim
    assert optim.learning_rate == 1e-3 and optim.lr_end == 1e-5
    config.write_text("learning_rate: 1e-3\nmax_train_steps: 3\nmax_train_steps: 4\n")
    fails(capsys, "--config", str(config), "--output_dir", str(tmp_path / "run"),
          match="key 'max_train_steps' is given twice, '3' (line 2) and '4' (line 3)")


def test_a_huge_loss_has_an_infinite_perplexity_not_a_crash():
    from ttt_lm import evaluate

    buckets = evaluate.by_position(torch.full((4,), 800.0, dtype=torch.float64), num_blocks=1, bucket_size=2)
    assert [b["perplexity"] for b in buckets] == [float("inf")] * 2


def test_the_converter_checks_its_output_before_converting(tmp_path, capsys):
    import convert_jax_checkpoint

    (tmp_path / "file").write_text("not a folder")
    params = tmp_path / "params.safetensors"  # never read: the output is checked first
    assert convert_jax_checkpoint.main(["e2e", "--params", str(params), "--official_config", str(params),
                                        "--output_dir", str(tmp_path / "file" / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file, so no folder can be made under it; nothing was converted" in err[0], err


def test_an_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "o").write_text("x")
    fails(capsys, *FAST, "--output_dir", str(tmp_path / "o"), match="is a file, not a folder")


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of the given size (root only; skipped where mounting is not allowed)."""
    mounted = []

    def make(megabytes):
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(point)],
                                capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip()}")
        mounted.append(point)
        return point
    yield make
    for point in mounted:
        subprocess.run(["umount", "--lazy", str(point)], capture_output=True)  # lazily: a leaked handle may hold it


def test_a_disk_without_room_for_one_checkpoint_is_refused_before_any_work(small_disk, capsys):
    disk = small_disk(8)  # a tiny-model checkpoint takes about 33 MiB
    fails(capsys, *FAST, "--output_dir", str(disk / "run"), match="one checkpoint of this model takes about")


def test_a_disk_that_fills_during_a_save(small_disk):
    """Room for one checkpoint, not two: the second save fails with one line; checkpoint-1 stays whole."""
    disk = small_disk(50)
    result = subprocess.run([*TRAINER, "--output_dir", str(disk / "run"), "--max_train_steps", "4",
                             "--save_checkpoint_freq", "1"], capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.replace("\r", "\n").splitlines() if "error" in line]
    assert result.returncode == 1 and len(errors) == 1 and "cannot write" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert [p.name for _, p in rundir.list_checkpoints(disk / "run")] == ["checkpoint-1"]
    ckpt.validate_checkpoint(disk / "run" / "checkpoint-1")
    assert not list((disk / "run").glob(".*.partial"))


def test_evaluate_and_generate_refuse_bad_models_at_once(saved_run, tmp_path, capsys):
    from ttt_lm import evaluate, generate

    corrupt = tmp_path / "corrupt"
    shutil.copytree(saved_run / "final_model", corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage")
    (corrupt / rundir.TRAINER_STATE).unlink()  # no manifest (another tool's folder): the loader's own refusal
    not_finite = tmp_path / "nan"
    model = ttt.TTTForCausalLM.from_pretrained(saved_run / "final_model")
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(not_finite)
    shutil.copy(saved_run / "final_model" / "tokenizer.json", not_finite)
    shutil.copy(saved_run / "final_model" / "tokenizer_config.json", not_finite)
    cases = [
        (evaluate.main, ["--model_name_or_path", str(corrupt), "--dataset_name", "builtin:synthetic",
                         "--seq_length", "32", "--output_dir", str(tmp_path / "e")], "cannot load model"),
        (generate.main, ["--model_name_or_path", str(corrupt)], "cannot load model"),
        (generate.main, ["--model_name_or_path", str(not_finite)], "non-finite weights"),
        (evaluate.main, ["--model_name_or_path", str(saved_run / "final_model"), "--dataset_name",
                         "builtin:synthetic", "--seq_length", "32", "--output_dir", str(tmp_path / "x" / "f")],
         "cannot write to --output_dir")]
    (tmp_path / "x").write_text("a file where a folder should be")
    for main, argv, words in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        captured = capsys.readouterr()
        errors = [line for line in captured.err.splitlines() if "error" in line]
        assert exit_info.value.code != 0 and len(errors) == 1 and words in errors[0], (argv, captured.err)
        assert captured.out == "", "nothing is printed before the error"


def test_generate_refuses_a_tokenizer_larger_than_the_model(saved_run, capsys, llama_tokenizer_dir):
    from ttt_lm import generate

    with pytest.raises(SystemExit):
        generate.main(["--model_name_or_path", str(saved_run / "final_model"), "--tokenizer_name",
                       str(llama_tokenizer_dir), "--prompt", "hello world"])
    captured = capsys.readouterr()
    assert captured.out == "" and "has 32000 tokens, more than model" in captured.err
