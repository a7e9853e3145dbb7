"""Checkpoints: `checkpoint-<step>/` (the last few kept), `milestone-<step>/` (kept), `final_model/`.

Each checkpoint holds the model in `save_pretrained` form and the tokenizer (so it loads with
`TTTForCausalLM.from_pretrained`), Accelerate's training state under `training_state/` (optimizer, scheduler,
every process's RNG states; the weights only under FSDP, sharded, since elsewhere model.safetensors has them), and `trainer_state.json` (step, data position of every process, arguments,
and a manifest of file sizes). It is written to a hidden `.<name>.partial/` folder and renamed into place, so an
interrupted save never leaves a half-written checkpoint under a real name nor touches an existing one.
"""

import json
import os
import re
import shutil
from pathlib import Path

from accelerate.utils import DistributedType
from safetensors.torch import load_file

TRAINER_STATE = "trainer_state.json"
TRAINING_STATE_DIR = "training_state"
REQUIRED_FILES = ("config.json", "model.safetensors", TRAINER_STATE, f"{TRAINING_STATE_DIR}/optimizer.bin",
                  f"{TRAINING_STATE_DIR}/random_states_0.pkl")
CHECKPOINT_NAME = re.compile(r"^(checkpoint|milestone)-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or corrupt: the message names the file."""


def _manifest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != TRAINER_STATE}


def _write_json(path: Path, data):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def save_checkpoint(accelerator, folder: Path, model, tokenizer, trainer_state: dict, with_training_state=True):
    """Collective: every process calls it. Writes `folder` atomically; an existing `folder` is replaced only after
    the new one is complete."""
    folder = Path(folder)
    partial = folder.with_name(f".{folder.name}.partial")
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)  # left by a save that was killed; never a real checkpoint
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
        accelerator.unwrap_model(model, keep_torch_compile=False).save_pretrained(partial, state_dict=state_dict)
        tokenizer.save_pretrained(partial)
        _write_json(partial / TRAINER_STATE, {**trainer_state, "manifest": _manifest(partial)})
        if folder.exists():
            previous = folder.with_name(f".{folder.name}.previous")
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(folder, previous)
            os.replace(partial, folder)
            shutil.rmtree(previous)
        else:
            os.replace(partial, folder)
    accelerator.wait_for_everyone()


def validate_checkpoint(folder: Path) -> dict:
    """The checkpoint's trainer state, after checking every file is present with its recorded size."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    for name in REQUIRED_FILES:
        if not (folder / name).is_file():
            raise CheckpointError(f"checkpoint {folder} is incomplete: {name} is missing")
    try:
        state = json.loads((folder / TRAINER_STATE).read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"checkpoint {folder} is corrupt: {TRAINER_STATE} is not valid JSON ({error})")
    for name, size in state.get("manifest", {}).items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} is incomplete: {name} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(f"checkpoint {folder} is corrupt: {name} has {path.stat().st_size} bytes, "
                                  f"{size} were written")
    return state


def list_checkpoints(output_dir: Path, kinds=("checkpoint", "milestone")) -> list:
    """(step, path) of the complete checkpoints in `output_dir`, oldest first."""
    found = []
    for path in Path(output_dir).iterdir() if Path(output_dir).is_dir() else []:
        match = CHECKPOINT_NAME.match(path.name)
        if match and match.group(1) in kinds and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(2)), match.group(1) == "checkpoint", path))
    return [(step, path) for step, _, path in sorted(found)]


def resolve_checkpoint(spec: str, output_dir: Path) -> Path:
    """`latest` is the highest step among `output_dir`'s checkpoints and milestones; anything else is a path."""
    if spec != "latest":
        return Path(spec)
    found = list_checkpoints(output_dir)
    if not found:
        raise CheckpointError(f"--resume_from_checkpoint latest: no complete checkpoint-*/ or milestone-*/ "
                              f"folder in {output_dir}")
    return found[-1][1]


def load_training_state(accelerator, model, folder: Path):
    """The model's weights (from the top-level model.safetensors, except under FSDP, whose sharded state Accelerate
    loads), the optimizer, scheduler and RNG states."""
    folder = Path(folder)
    handle = accelerator.register_load_state_pre_hook(lambda models, directory: models.clear())
    try:
        accelerator.load_state(str(folder / TRAINING_STATE_DIR))
    finally:
        handle.remove()
    if accelerator.distributed_type != DistributedType.FSDP:
        load_weights(accelerator.unwrap_model(model, keep_torch_compile=False), folder / "model.safetensors")


def load_weights(model, path: Path):
    """Every parameter and buffer of `model` from a safetensors file written by save_pretrained, which stores
    tied parameters once (e.g. lm_head.weight as model.embed_tokens.weight)."""
    missing, unexpected = model.load_state_dict(load_file(path, device="cpu"), strict=False)
    loaded = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name not in missing}
    untied = [name for name in missing if id(model.get_parameter(name)) not in loaded]
    if untied or unexpected:
        raise CheckpointError(f"{path} does not match the model: missing {untied[:3]}, unexpected {unexpected[:3]}")


def prune_checkpoints(output_dir: Path, keep: int):
    """Deletes all but the newest `keep` checkpoint-* folders (milestones are never deleted)."""
    for _, path in list_checkpoints(output_dir, kinds=("checkpoint",))[:-keep or None]:
        shutil.rmtree(path)
