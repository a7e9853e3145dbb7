"""Train a TTT language model (TTT-Linear / TTT-MLP) on a Hugging Face dataset or local text files.

    python train_ttt.py                                   # tiny model, built-in corpus, offline, about a minute
    python train_ttt.py --dataset_name ../shared/data/tinyshakespeare.txt \\
        --tokenizer_name ../shared/data/llama2_tokenizer --model_size tiny --max_train_steps 300
    accelerate launch train_ttt.py --config run.yaml --resume_from_checkpoint latest

The settings are the typed groups of ttt_train/config.py; every flag can also be a key of the YAML or JSON file given
to --config (the command line wins). Every flag also takes its dashed spelling (--max-train-steps), and a few take
the names other trainers use (listed beside the flag).
"""

import sys
from pathlib import Path

from ttt_train import config
from ttt_train.config import (  # noqa: F401  the tables other tools and the tests read from the trainer
    E2E_MODEL_SIZES,
    FAMILIES,
    LAYER_TYPES,
    MODEL_SIZES,
    PRESETS,
    RunConfig,
)


def build_parser() -> config.Parser:
    """The trainer's command line, generated from the settings groups of ttt_train/config.py."""
    return config.Parser(description=__doc__)


def parse_args(argv=None, parser=None) -> RunConfig:
    """The run's settings from argv (default: the command line) and the --config file it names; an error is one
    line and exit status 2."""
    return config.parse(sys.argv[1:] if argv is None else list(argv), parser or build_parser())


def check_paths(run: RunConfig):
    """What can be checked without torch, transformers or datasets (seconds to import, a minute on a busy machine):
    local paths that must exist, and the output directory's state against a fresh run or a resume. The trainer
    checks again (and applies) when it holds the directory's lock. Raises UserError (one line, exit 1)."""
    from ttt_train import hub, rundir  # light modules: the standard library only
    from ttt_train.cli import UserError, unwritable_folder

    checkpoints = run.checkpoints
    resume = checkpoints.resume_from_checkpoint
    named = [("dataset", run.data.dataset_name), ("tokenizer", run.data.tokenizer_name),
             ("--init_from model", run.model.init_from),
             ("--resume_from_checkpoint", None if resume == "latest" else resume)]
    for what, name in named:
        if name and not name.startswith("builtin:") and "://" not in name and hub.looks_local(name) \
                and not Path(name).expanduser().exists():
            raise UserError(f"{what} path {name} does not exist")
    if "://" in checkpoints.output_dir:
        return
    reason = unwritable_folder(checkpoints.output_dir)
    if reason:
        raise UserError(f"--output_dir {checkpoints.output_dir}: {reason}")
    rundir.RunLock(checkpoints.output_dir).check_free()
    if resume == "latest":
        rundir.resolve_checkpoint("latest", Path(checkpoints.output_dir))  # none there: the trainer's error, now
    rundir.check_run_directory(Path(checkpoints.output_dir), fresh=not resume,
                               overwrite=checkpoints.overwrite_output_dir,
                               extra=rundir.tracker_folders(run.logging), apply=False)


def main(argv=None, parser=None):
    """The trainer on `argv` (default: the command line). Only as the program (argv None) does it take over SIGTERM
    and SIGINT (save, then exit 143 / 130); called with an argv, as a library, the caller keeps its handlers."""
    run = parse_args(argv, parser)
    from ttt_train import cli  # imported after parsing: --help stays fast

    run.command = cli.command_line(argv)  # recorded in training_args.json and the model cards
    cli.run(check_paths, run)  # before the heavy imports: a wrong path or folder is reported at once
    from ttt_train.loop import train

    cli.run(train, run, argv is None)


if __name__ == "__main__":
    main()
