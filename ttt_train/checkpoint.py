"""Checkpoints: writing and reading `checkpoint-<step>/` (the last few kept), `milestone-<step>/` (kept),
`best_model/` and `final_model/` (the names, listing and the output directory's rules: ttt_train/rundir.py).

Each checkpoint holds the model in `save_pretrained` form and the tokenizer (so it loads with
`TTTForCausalLM.from_pretrained`), Accelerate's training state under `training_state/` (optimizer and every
process's RNG states; the weights only under FSDP, sharded, since elsewhere model.safetensors has them), and
`trainer_state.json` (step, the learning-rate scheduler's state, data position of every process, arguments,
and a manifest of every file's size and SHA-256). It is written to a hidden `.<name>.partial/` folder and renamed
into place, so an interrupted save never leaves a half-written checkpoint under a real name nor touches an
existing one.

A checkpoint is untrusted input: resuming verifies every file against the manifest, reads JSON and safetensors,
and lets Accelerate read only the optimizer and RNG files, which it loads with `torch.load(weights_only=True)`.
No file of a checkpoint is ever unpickled with code execution (Accelerate's `custom_checkpoint_*.pkl`, which it
would load with `weights_only=False`, is neither written nor read).
"""

import hashlib
import json
import math
import os
import pickle
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from accelerate.utils import DistributedType, gather_object
from accelerate.utils.other import load as accelerate_load  # torch.load(weights_only=True) + numpy's RNG types
from safetensors import SafetensorError
from safetensors.torch import load_file

from ttt_train.card import model_card
from ttt_train.distributed import main_decides
from ttt_train.rundir import (
    BEST_MODEL,
    FINAL_MODEL,
    TRAINER_MARK,
    TRAINER_STATE,
    CheckpointError,
    is_trainers,
    partial_of,
    read_best,
)

TRAINING_STATE_DIR = "training_state"
REQUIRED_FILES = ("config.json", TRAINER_STATE, f"{TRAINING_STATE_DIR}/optimizer.bin",
                  f"{TRAINING_STATE_DIR}/random_states_0.pkl")
WEIGHTS, ADAPTER_WEIGHTS = "model.safetensors", "adapter_model.safetensors"  # a checkpoint holds one (LoRA: adapters)
UNSAFE_PICKLE = re.compile(r"^custom_checkpoint_\d+\.pkl$")  # Accelerate unpickles these with weights_only=False
# ----------------------------------------------------------------------------------------------------------------
# Writing


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _manifest(folder: Path) -> dict:
    """{relative path: {"size", "sha256"}} of every file but the trainer state (which holds the manifest)."""
    return {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).as_posix() not in
            (TRAINER_STATE, TRAINER_MARK)}


def _write_json(path: Path, data):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def checkpoint_bytes(parameters: int) -> int:
    """About what one checkpoint takes: float32 weights and AdamW's two float32 moments, plus 5%."""
    return int(parameters * 12 * 1.05)


def check_disk_space(output_dir: Path, parameters: int):
    """Before any data loads: room for one checkpoint (a save writes the new one beside the previous)."""
    free, needed = shutil.disk_usage(output_dir).free, checkpoint_bytes(parameters)
    if free < needed:
        raise CheckpointError(f"output_dir {output_dir} has {free / 2**20:.0f} MiB free; one checkpoint of this "
                              f"model takes about {needed / 2**20:.0f} MiB")


def save_checkpoint(accelerator, folder: Path, model, tokenizer, trainer_state: dict, with_training_state=True):
    """Collective: every process calls it. Writes `folder` atomically; an existing `folder` is replaced only after
    the new one is complete. A write that fails (a full disk) removes what it wrote and is one CheckpointError;
    the earlier checkpoints are untouched."""
    folder = Path(folder)
    try:
        _save(accelerator, folder, model, tokenizer, trainer_state, with_training_state)
    except (OSError, RuntimeError) as error:
        # torch.save reports a failed write (ENOSPC) as a RuntimeError of its zip writer
        if isinstance(error, RuntimeError) and not re.search(r"inline_container|PytorchStreamWriter", str(error)):
            raise
        shutil.rmtree(partial_of(folder), ignore_errors=True)
        reason = error.strerror if isinstance(error, OSError) and error.strerror else "the write failed (disk full?)"
        raise CheckpointError(f"cannot write {folder}: {reason}; it was not saved, and the earlier checkpoints are "
                              f"untouched") from error


def _save(accelerator, folder: Path, model, tokenizer, trainer_state: dict, with_training_state: bool):
    partial = partial_of(folder)
    if accelerator.is_main_process:
        if partial.exists():  # left by a save of this run that failed (a user's folder is refused at start)
            if not is_trainers(partial):
                raise CheckpointError(f"{partial} is in the way of a save and was not written by this trainer; "
                                      f"move it")
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        (partial / TRAINER_MARK).touch()
    accelerator.wait_for_everyone()
    if with_training_state:
        # The weights are stored once, in the top-level model.safetensors; Accelerate keeps only the rest (FSDP
        # still writes its sharded model, which its resume reads).
        handle = accelerator.register_save_state_pre_hook(lambda models, weights, directory: weights.clear())
        try:
            accelerator.save_state(str(partial / TRAINING_STATE_DIR))
        finally:
            handle.remove()
    # torch.compile wraps the model as `_orig_mod`; the saved model must carry the plain parameter names
    state_dict = {k.replace("_orig_mod.", ""): v for k, v in accelerator.get_state_dict(model).items()}
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        unwrapped.save_pretrained(partial, state_dict=state_dict)
        if hasattr(unwrapped, "peft_config"):  # adapters only: the base model's config beside them (resume reads it)
            unwrapped.get_base_model().config.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        model_card(unwrapped, trainer_state).save(partial / "README.md")
        # the trainer state marks the folder as this trainer's from here on; the mark goes (not part of the save)
        _write_json(partial / TRAINER_STATE, {**trainer_state, "manifest": _manifest(partial)})
        (partial / TRAINER_MARK).unlink()
        if folder.exists():
            previous = folder.with_name(f".{folder.name}.previous")
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(folder, previous)
            os.replace(partial, folder)
            shutil.rmtree(previous)
        else:
            os.replace(partial, folder)
    accelerator.wait_for_everyone()


class Checkpointer:
    """Owns what a run saves and when: `checkpoint-<step>` every --save_checkpoint_freq steps, at a stop request
    and at the last step (keeping the newest --save_total_limit), `milestone-<step>` every --save_milestone_freq
    steps, `best_model` (--save_best) whenever an evaluation beats the best validation loss so far (also across
    resumes; never pruned), and `final_model` at the end. `stream` is the data stream whose position each
    checkpoint records; `tokens` counts the training tokens so far."""

    def __init__(self, settings, max_steps: int, accelerator, directory, model, tokenizer, scheduler, stream,
                 run_args: dict, elapsed, tokens=lambda: None, publisher=None):
        self.settings, self.max_steps = settings, max_steps  # ttt_train.config.CheckpointArguments; the last step
        # ttt_train.run_directory.RunDirectory: where saves go (and, for a bucket, are uploaded) and rotate
        self.directory, self.output_dir = directory, directory.path
        self.accelerator, self.model, self.tokenizer = accelerator, model, tokenizer
        self.scheduler, self.stream, self.run_args, self.elapsed = scheduler, stream, run_args, elapsed
        self.tokens = tokens
        self.publisher = publisher  # --push_to_hub (main process only): ttt_train.publish.Publisher
        # every process must take the same save decisions (a save is collective): the main process reads, all get it
        self.best = main_decides(accelerator, lambda: read_best(self.output_dir))

    def after_step(self, step: int, stop_requested: bool, eval_loss: float | None = None):
        settings = self.settings
        if settings.save_milestone_freq and step % settings.save_milestone_freq == 0:
            self.save(f"milestone-{step}", step)
        if (settings.save_checkpoint_freq and step % settings.save_checkpoint_freq == 0) or stop_requested \
                or step == self.max_steps:
            self.save(f"checkpoint-{step}", step)
            if self.publisher:
                self.publisher.checkpoint_saved(self.output_dir / f"checkpoint-{step}", step, self.accelerator.print)
            if self.accelerator.is_main_process:
                self.directory.rotate(settings.save_total_limit)
        if settings.save_best and eval_loss is not None and math.isfinite(eval_loss) \
                and (self.best is None or eval_loss < self.best[1]):
            self.save(BEST_MODEL, step, with_training_state=False, extra={"eval_loss": eval_loss})
            self.best = (step, eval_loss)
            self.accelerator.print(f"{BEST_MODEL}: step {step}, eval_loss {eval_loss:.4f}")

    def weights_finite(self) -> bool:
        """Whether every parameter is finite on every process (each checks its own shards under FSDP)."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters()]
        bad = torch.stack([(~torch.isfinite(p.detach())).any() for p in local]).any().float()
        return self.accelerator.reduce(bad, "sum").item() == 0

    def save_final(self, step: int, merge_lora: bool = False, eval_loss: float | None = None):
        if merge_lora:  # the adapters folded into the base weights: a plain model (the run ends here)
            self.model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False).merge_and_unload()
        self.save(FINAL_MODEL, step, with_training_state=False, extra={"eval_loss": eval_loss})

    def save(self, folder: str, step: int, with_training_state: bool = True, extra: dict | None = None):
        state = {"step": step, "elapsed": self.elapsed(), "tokens": self.tokens(), "args": self.run_args,
                 "world_size": self.accelerator.num_processes, "best": self.best, **(extra or {})}
        if with_training_state:  # what resuming needs; a final model carries no training text (packing leftover)
            state.update(scheduler=self.scheduler.state_dict(), data=gather_object([self.stream.state_dict()]))
        if not self.weights_finite():  # the divergence guard's last line
            raise CheckpointError(f"step {step}: the weights are not finite; {folder} was not saved")
        save_checkpoint(self.accelerator, self.output_dir / folder, self.model, self.tokenizer, state,
                        with_training_state)
        if self.accelerator.is_main_process:
            self.directory.saved(folder)


# ----------------------------------------------------------------------------------------------------------------
# Reading


def validate_checkpoint(folder: Path) -> dict:
    """The checkpoint's trainer state, after checking every file is present with its recorded size and SHA-256
    (checkpoints written before checksums were recorded: its size), and that no file is there that Accelerate
    would unpickle unsafely."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    for name in REQUIRED_FILES:
        if not (folder / name).is_file():
            raise CheckpointError(f"checkpoint {folder} is incomplete: {name} is missing")
    if not (folder / WEIGHTS).is_file() and not (folder / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"checkpoint {folder} is incomplete: {WEIGHTS} is missing")
    try:
        state = json.loads((folder / TRAINER_STATE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(
            f"checkpoint {folder} is corrupt: {TRAINER_STATE} is not valid JSON ({error})") from error
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "args" not in state:
        raise CheckpointError(f"checkpoint {folder} is corrupt: {TRAINER_STATE} lacks the step or the arguments")
    check_manifest(folder, state.get("manifest", {}), "checkpoint")
    for path in (folder / TRAINING_STATE_DIR).iterdir():
        if UNSAFE_PICKLE.match(path.name) and "scheduler" in state:
            raise CheckpointError(f"checkpoint {folder}: {TRAINING_STATE_DIR}/{path.name} was not written by this "
                                  f"trainer; refusing it (it would run code when loaded)")
    return state


def check_manifest(folder: Path, manifest: dict, what: str, include=lambda name: True):
    """Every file of the manifest that `include` selects is in `folder` with its recorded size and SHA-256
    (manifests written before checksums were recorded: its size); else one CheckpointError naming the file."""
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{what} {folder} is corrupt: the manifest of {TRAINER_STATE} is not a mapping")
    for name, recorded in manifest.items():
        if not include(name):
            continue
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{what} {folder} is corrupt: its manifest names {name}, outside the folder")
        if not path.is_file():
            raise CheckpointError(f"{what} {folder} is incomplete: {name} is missing")
        try:
            size, digest = (recorded, None) if isinstance(recorded, int) else (int(recorded["size"]),
                                                                               str(recorded["sha256"]))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{what} {folder} is corrupt: the manifest entry of {name} is malformed") from None
        if path.stat().st_size != size:
            raise CheckpointError(f"{what} {folder} is corrupt: {name} has {path.stat().st_size} bytes, "
                                  f"{size} were written")
        if digest is not None and sha256(path) != digest:
            raise CheckpointError(f"{what} {folder} is corrupt: {name} does not match the SHA-256 recorded "
                                  f"when it was written")


def verify_saved_folder(folder, what: str = "model", include=lambda name: True):
    """A model folder that this trainer wrote (checkpoint, best_model, final_model: a trainer_state.json with a
    manifest) is checked against its manifest before anything reads it; a folder without one (a converted model,
    another tool's) is left as it is. Anything that is not a local folder (a Hub id) has nothing to check."""
    folder = Path(folder)
    if not (folder / TRAINER_STATE).is_file():
        return
    try:
        state = json.loads((folder / TRAINER_STATE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
        raise CheckpointError(f"{what} {folder} is corrupt: {TRAINER_STATE} is not valid JSON ({error})") from error
    if isinstance(state, dict) and "manifest" in state:
        check_manifest(folder, state["manifest"], what, include)


def _safe_view(training_state: Path) -> Path:
    """A temporary folder of links to the files of `training_state` that Accelerate loads safely: all but its
    custom_checkpoint_*.pkl (older checkpoints of this trainer hold the scheduler there; its state is rebuilt)."""
    view = Path(tempfile.mkdtemp(prefix="ttt-resume-"))
    for path in training_state.iterdir():
        if not UNSAFE_PICKLE.match(path.name):
            (view / path.name).symlink_to(path.resolve())
    return view


def load_training_state(accelerator, model, scheduler, folder: Path, state: dict):
    """The model's weights (from the top-level model.safetensors, except under FSDP, whose sharded state Accelerate
    loads), the optimizer and RNG states, and the scheduler's state (from trainer_state.json)."""
    folder = Path(folder)
    view = _safe_view(folder / TRAINING_STATE_DIR)
    handle = accelerator.register_load_state_pre_hook(lambda models, directory: models.clear())
    try:
        # Accelerate ignores RNG files it cannot load; a resume that is not exact must not pass silently
        for path in sorted(view.glob("random_states_*.pkl")):
            accelerate_load(path)
        accelerator.load_state(str(view))
    except Exception as error:  # torch.load's refusals, truncated archives: all mean an unusable file
        raise CheckpointError(f"checkpoint {folder}: cannot load {TRAINING_STATE_DIR}/: {load_failure(error)}"
                              ) from error
    finally:
        handle.remove()
        shutil.rmtree(view, ignore_errors=True)
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    if (folder / ADAPTER_WEIGHTS).is_file():  # LoRA: the adapters (the base weights come from --init_from)
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(unwrapped, load_file(folder / ADAPTER_WEIGHTS, device="cpu"))
        if getattr(result, "unexpected_keys", None):
            raise CheckpointError(f"{folder / ADAPTER_WEIGHTS} does not match the adapters: unexpected "
                                  f"{result.unexpected_keys[:3]}")
    elif accelerator.distributed_type != DistributedType.FSDP:
        load_weights(unwrapped, folder / WEIGHTS)
    if "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    else:  # a checkpoint of an earlier version: the schedule is a function of the step
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
            for _ in range(state["step"]):
                scheduler.step()


def load_failure(error: Exception) -> str:
    """Why a training-state file did not load, in one line. torch's refusal of a pickle that is not plain tensors
    goes on to advise loading it unsafely; that advice is never repeated: the file is refused, as it could run code."""
    text = str(error).strip()
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in text.lower() or "Weights only" in text:
        return ("a file holds a pickle of something other than tensors, which could run code when loaded; it is "
                "refused (this trainer never loads such a file)")
    return text.splitlines()[0] if text else type(error).__name__


def load_weights(model, path: Path):
    """Every parameter and buffer of `model` from a safetensors file written by save_pretrained, which stores
    tied parameters once (e.g. lm_head.weight as model.embed_tokens.weight)."""
    try:
        weights = load_file(path, device="cpu")
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error})") from error
    missing, unexpected = model.load_state_dict(weights, strict=False)
    loaded = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name not in missing}
    untied = [name for name in missing if id(model.get_parameter(name)) not in loaded]
    if untied or unexpected:
        raise CheckpointError(f"{path} does not match the model: missing {untied[:3]}, unexpected {unexpected[:3]}")
