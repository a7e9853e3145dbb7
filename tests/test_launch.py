"""Launchers, train_gpu_optimized.py, and the trainer under two processes (gloo on the CPU)."""

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import ROOT
from train_ttt import build_parser

RECIPES = {"125m": (3e-3, 4800), "350m": (1.5e-3, 13500), "760m": (1.25e-3, 29000), "1b": (1e-3, 50000)}


def launcher_command(script, *args, stdin=None, **env):
    result = subprocess.run([str(ROOT / "scripts" / script), *args], input=stdin, capture_output=True, text=True,
                            env={**os.environ, **env}, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout.strip().splitlines()[-1])


def trainer_args(command):
    """The trainer's resolved arguments of a printed command, and the launcher part before the script."""
    script = next(i for i, part in enumerate(command) if part.endswith("train_gpu_optimized.py"))
    return command[:script], build_parser().parse_args(command[script + 1:])


@pytest.mark.parametrize("size", list(RECIPES))
@pytest.mark.parametrize("gpus", [1, 8])
def test_recipe_dry_run(size, gpus):
    launcher, args = trainer_args(launcher_command(f"train_{size}_c4.sh", "--dry-run", NUM_GPUS=str(gpus)))
    lr, steps = RECIPES[size]
    assert (args.learning_rate, args.max_train_steps) == (lr, steps)
    assert (args.dataset_name, args.dataset_config, args.seq_length) == ("allenai/c4", "en", 2048)
    assert (args.weight_decay, args.lr_end, args.warmup_ratio, args.lr_scheduler_type) == (0.1, 1e-5, 0.1, "cosine")
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * gpus == 256
    assert args.model_size == size and args.ttt_layer_type == "linear"
    if gpus == 1:
        assert launcher[-1] == sys.executable or launcher[-1].endswith("python3") or "python" in launcher[-1]
    else:
        assert launcher[:2] == ["accelerate", "launch"]
        assert launcher[launcher.index("--num_processes") + 1] == "8"
        config = launcher[launcher.index("--config_file") + 1]
        assert config.endswith("accelerate_fsdp_config.yaml" if size in ("760m", "1b") else "accelerate_config.yaml")


def test_recipe_passes_extra_arguments_and_mlp_settings():
    _, args = trainer_args(launcher_command("train_125m_c4.sh", "--dry-run", "--num_gpus", "4", "--layer", "mlp",
                                            "--max_train_steps", "100", "--output_dir", "elsewhere"))
    assert (args.ttt_layer_type, args.ttt_base_lr, args.max_train_steps, args.output_dir) == ("mlp", 0.1, 100,
                                                                                             "elsewhere")
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * 4 == 256


@pytest.mark.parametrize("model_type", ["transformer", "mamba2", "gated_deltanet"])
def test_the_c4_recipes_train_the_baselines_at_the_same_size_and_schedule(model_type):
    """The paper's comparison: the same recipe (data, tokens, schedule) for the baseline, without the TTT layers'
    backbone flags (which the trainer would refuse for it), checked by the trainer's own flag validation."""
    _, args = trainer_args(launcher_command("train_350m_c4.sh", "--dry-run", "--model_type", model_type))
    assert (args.model_type, args.model_size, args.learning_rate, args.max_train_steps) == (
        model_type, "350m", 1.5e-3, 13500)
    assert not (args.pre_conv or args.share_qk or args.use_gate) and args.ttt_layer_type is None
    assert args.output_dir == f"outputs/{model_type}-350m-c4"
    answers = f"125m\n{model_type}\n\n1\n\n"
    _, answered = trainer_args(launcher_command("launch_training.sh", "--dry-run", stdin=answers))
    assert answered.model_type == model_type and answered.ttt_layer_type is None
    result = subprocess.run([str(ROOT / "scripts" / "train_e2e.sh"), "125m", "--model_type", model_type, "--dry-run"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--variant fa" in result.stderr


# TTT-E2E (SPEC.md 2.6): size -> pretraining (steps, global batch, peak lr), extension (steps, global batch)
E2E_RECIPES = {"125m": ((4800, 64, 3e-3), (120, 32)), "350m": ((13500, 64, 1.5e-3), (337, 32)),
               "760m": ((29000, 64, 1.25e-3), (725, 32)), "1b": ((50000, 64, 1e-3), (1250, 32)),
               "3b": ((52000, 128, 8e-4), (1300, 64))}


@pytest.mark.parametrize("size", list(E2E_RECIPES))
def test_e2e_recipes_dry_run(size):
    (steps, batch, lr), (ext_steps, ext_batch) = E2E_RECIPES[size]
    launcher, args = trainer_args(launcher_command("train_e2e.sh", size, "--dry-run", NUM_GPUS="8"))
    assert (args.model_type, args.model_size, args.seq_length) == ("e2e", size, 8192)
    assert (args.max_train_steps, args.learning_rate, args.ilr_init, args.ilr_warmup_steps) == (steps, lr, 0.1,
                                                                                               steps // 10)
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * 8 == batch
    assert (args.weight_decay, args.lr_end, args.warmup_ratio, args.max_grad_norm) == (0.1, 1e-5, 0.1, 1.0)
    assert launcher[:2] == ["accelerate", "launch"]
    _, fa = trainer_args(launcher_command("train_e2e.sh", size, "--variant", "fa", "--dry-run", NUM_GPUS="1"))
    assert (fa.model_type, fa.max_train_steps, fa.learning_rate, fa.ilr_init) == ("e2e_fa", steps, lr, None)
    _, ext = trainer_args(launcher_command("train_e2e.sh", size, "--stage", "extend", "--init_from", "pre/final_model",
                                           "--dataset_name", "books", "--dry-run", NUM_GPUS="8"))
    assert (ext.seq_length, ext.max_train_steps, ext.learning_rate, ext.init_from, ext.model_size) == (
        32768, ext_steps, 4e-4, "pre/final_model", None)
    assert (ext.ilr_init, ext.ilr_warmup_steps) == (1.0, 0)
    assert ext.per_device_train_batch_size * ext.gradient_accumulation_steps * 8 == ext_batch
    assert ext.rope_theta is None  # E2E keeps its theta: its attention spans at most window + chunk
    _, fa_ext = trainer_args(launcher_command("train_e2e.sh", size, "--stage", "extend", "--variant", "fa",
                                              "--init_from", "pre/final_model", "--dataset_name", "books", "--dry-run",
                                              NUM_GPUS="8"))
    assert (fa_ext.model_type, fa_ext.seq_length, fa_ext.rope_theta, fa_ext.ilr_init) == ("e2e_fa", 32768, 2e6, None)


def test_e2e_extension_needs_the_pretrained_model_and_data():
    result = subprocess.run([str(ROOT / "scripts" / "train_e2e.sh"), "125m", "--stage", "extend", "--dry-run"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode != 0 and "needs --init_from and --dataset_name" in result.stderr


def test_recipe_refuses_a_process_count_that_does_not_split_the_batch():
    result = subprocess.run([str(ROOT / "scripts" / "train_125m_c4.sh"), "--dry-run", "--num_gpus", "3"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode != 0 and "does not split over 3" in result.stderr


def test_interactive_launcher_reads_answers_from_stdin():
    command = launcher_command("launch_training.sh", "--dry-run", stdin="760m\nmlp\nmy/dataset\n2\ny\n")
    launcher, args = trainer_args(command)
    assert (args.model_size, args.ttt_layer_type, args.dataset_name) == ("760m", "mlp", "my/dataset")
    assert args.resume_from_checkpoint == "latest" and args.learning_rate == 1.25e-3
    assert launcher[launcher.index("--num_processes") + 1] == "2"
    _, defaults = trainer_args(launcher_command("launch_training.sh", "--dry-run", stdin="\n\n\n1\n\n"))
    assert (defaults.model_size, defaults.dataset_name, defaults.resume_from_checkpoint) == ("125m", "allenai/c4",
                                                                                             None)


def test_interactive_launcher_rejects_a_bad_answer():
    result = subprocess.run([str(ROOT / "scripts" / "launch_training.sh"), "--dry-run"], input="2b\n",
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode != 0 and "'2b' is not one of" in result.stderr


def test_gpu_trainer_says_it_runs_on_the_cpu(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train_gpu_optimized.py"), "--max_train_steps", "2",
                             "--seq_length", "32", "--per_device_train_batch_size", "2", "--logging_steps", "1",
                             "--output_dir", str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "no CUDA GPU found; running on the CPU" in result.stderr
    assert (tmp_path / "run" / "final_model" / "model.safetensors").exists()


def test_launcher_paths_are_relative_to_where_it_is_run(tmp_path):
    """A launcher run from another folder reads `corpus.txt` and writes `out/` there, as any command would."""
    (tmp_path / "corpus.txt").write_text("\n\n".join(f"document {i} " + "text " * 30 for i in range(40)))
    result = subprocess.run(
        [str(ROOT / "scripts" / "train_125m_c4.sh"), "--num_gpus", "0", "--dataset_name", "corpus.txt",
         "--dataset_config", "", "--tokenizer_name", "builtin:bytes", "--model_size", "tiny", "--seq_length", "32",
         "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_train_steps", "2",
         "--eval_steps", "0", "--max_eval_samples", "2", "--report_to", "none", "--output_dir", "out"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "final_model" / "model.safetensors").exists()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def lrs(folder):
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in lines if "lr" in r}


@pytest.mark.slow
def test_two_processes_save_resume_and_match_the_single_process_schedule(tmp_path):
    flags = ["--seq_length", "32", "--per_device_train_batch_size", "2", "--logging_steps", "1",
             "--save_checkpoint_freq", "3", "--eval_steps", "0", "--max_eval_samples", "4", "--max_train_steps", "6"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def train(launcher, out, *extra):
        result = subprocess.run([*launcher, str(ROOT / "train_ttt.py"), *flags, "--output_dir", str(out), *extra],
                                capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    def two():  # a fresh rendezvous port per launch: the previous one may still be in TIME_WAIT
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "accelerate_config.yaml"), "--num_processes", "2", "--main_process_port", str(free_port())]

    started = train(two(), tmp_path / "ddp")
    assert "on 2 process(es)" in started and "bf16 mixed precision" in started  # the config's precision
    state = json.loads((tmp_path / "ddp" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(state["data"]) == 2
    assert state["data"][0]["leftover"] != state["data"][1]["leftover"]  # each rank packed its own documents
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "ddp" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    assert "resumed from" in train(two(), tmp_path / "resumed", "--resume_from_checkpoint", "latest")
    train([sys.executable], tmp_path / "single")
    single, multi, resumed = (lrs(tmp_path / name) for name in ("single", "ddp", "resumed"))
    assert sorted(multi) == sorted(single) == list(range(1, 7)) and sorted(resumed) == [4, 5, 6]
    assert all(multi[s] == single[s] for s in single) and all(resumed[s] == single[s] for s in resumed)
    assert (tmp_path / "resumed" / "final_model" / "model.safetensors").exists()


def test_a_gpu_recipe_without_a_gpu_and_without_a_terminal_is_refused(tmp_path):
    """On a host without CUDA (this one), a recipe is not started on the CPU unless asked (--num_gpus 0); the
    interactive launcher without a terminal refuses instead of taking every default."""
    env = {k: v for k, v in os.environ.items() if k != "NUM_GPUS"}
    result = subprocess.run([str(ROOT / "scripts" / "train_125m_c4.sh")], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert result.returncode == 2 and len(errors) == 1 and "no CUDA GPU found: the 125m recipe" in errors[0], \
        result.stderr
    assert "--dry-run prints its command" in errors[0] and not (tmp_path / "outputs").exists()
    result = subprocess.run([str(ROOT / "scripts" / "launch_training.sh")], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 2 and "needs a terminal" in result.stderr and "train_125m_c4.sh" in result.stderr
    dry = subprocess.run([str(ROOT / "scripts" / "train_125m_c4.sh"), "--dry-run"], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=120)
    assert dry.returncode == 0 and "printing the recipe's command on its 8 GPUs" in dry.stderr
    here = shlex.split(dry.stderr.split("it would run: ")[1].splitlines()[0])  # what would run here: plain python
    assert here[1] == str(ROOT / "train_gpu_optimized.py") and "--per_device_train_batch_size" in here
    printed = shlex.split(dry.stdout.strip().splitlines()[-1])  # the README's promise: the accelerate command
    assert printed[:2] == ["accelerate", "launch"] and printed[printed.index("--num_processes") + 1] == "8"
    assert printed[printed.index("--gradient_accumulation_steps") + 1] == "2"  # 256 = 8 GPUs x 16 x 2


def test_a_launch_that_cannot_work_is_one_line_before_any_process_starts(tmp_path):
    """More GPUs asked than the host has, or a trainer flag that fails its checks (a missing path): one error line
    from the launcher, no trainer process (each would fail alike after its start-up, and accelerate would add its
    traceback)."""
    env = {**os.environ, "NUM_GPUS": "4"}
    result = subprocess.run([str(ROOT / "scripts" / "train_125m_c4.sh"), "--output_dir", "out"],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert result.returncode == 2 and len(errors) == 1 and "4 GPU(s) asked" in errors[0], result.stderr
    assert "no CUDA GPU: --num_gpus 0 runs the recipe on the CPU" in errors[0] and result.stdout == ""
    result = subprocess.run([str(ROOT / "scripts" / "train_125m_c4.sh"), "--num_gpus", "0", "--dataset_name",
                             "nope.txt", "--output_dir", "out"], capture_output=True, text=True, cwd=tmp_path,
                            timeout=120)
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert result.returncode == 1 and len(errors) == 1 and "dataset path nope.txt does not exist" in errors[0]
    assert "train_gpu_optimized.py: no CUDA GPU found" not in result.stderr and result.stdout == ""
    assert not (tmp_path / "out").exists()
