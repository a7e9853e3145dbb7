"""The trainer's typed settings (ttt_train/config.py): one dataclass per component, the command line and YAML/JSON
files generated onto the same fields, and a run that never writes what it settles back into them."""

import dataclasses
import json

import pytest

import train_ttt
from helpers import FAST, fails
from ttt_train import config
from ttt_train.loop import train


def test_every_flag_is_a_field_of_one_group_and_every_field_a_flag():
    parser = train_ttt.build_parser()
    fields = {}
    for name, group in config.GROUPS.items():
        for field in dataclasses.fields(group):
            assert field.name not in fields, f"{field.name} is in both {fields.get(field.name)} and {name}"
            fields[field.name] = name
    dests = {action.dest for action in parser._actions if action.option_strings} - {"help", "config"}
    assert dests == set(fields)
    # each group is one section of --help, titled by the group
    titles = {group.title for group in parser._action_groups}
    assert all(group._argument_group_name in titles for group in config.GROUPS.values())


def test_the_components_take_their_own_group():
    run = train_ttt.parse_args(["--save_checkpoint_freq", "7", "--learning_rate", "1e-3", "--report_to",
                                "tensorboard", "--wandb_project", "proj"])
    assert isinstance(run.checkpoints, config.CheckpointArguments) and run.checkpoints.save_checkpoint_freq == 7
    assert isinstance(run.optim, config.OptimizerArguments) and run.optim.learning_rate == 1e-3
    from ttt_train import rundir

    assert rundir.tracker_folders(run.logging) == ("proj",)
    # a group checks its own fields, without the parser
    with pytest.raises(config.ConfigError, match="--learning_rate must be positive, got -1"):
        config.OptimizerArguments(learning_rate=-1.0).check()
    with pytest.raises(config.ConfigError, match="--lora_rank applies to --use_lora"):
        config.LoraArguments(lora_rank=4).check()
    with pytest.raises(config.ConfigError, match="--save_total_limit must be positive"):
        config.CheckpointArguments(save_total_limit=0).check()


def test_a_json_config_maps_onto_the_same_fields_and_the_command_line_wins(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"learning_rate": 0.001, "max_train_steps": 9, "use_lora": True, "init_from": "m",
                                "torch_compile": False, "target_params": "10M", "model_size": None}))
    with pytest.raises(SystemExit):  # null is no integer/string: named, one line
        train_ttt.parse_args(["--config", str(path)])
    assert "--config" in capsys.readouterr().err
    path.write_text(json.dumps({"learning_rate": 0.001, "max_train_steps": 9, "use_lora": True, "init_from": "m",
                                "tf32": True, "mixed_precision": "bf16"}))
    run = train_ttt.parse_args(["--config", str(path), "--max_train_steps", "4"])
    assert (run.optim.learning_rate, run.optim.max_train_steps, run.lora.use_lora, run.model.init_from) == (
        0.001, 4, True, "m")
    assert (run.perf.tf32, run.optim.mixed_precision, run.config) == (True, "bf16", str(path))
    # a flag that applies only with a switch the file turns on: checked with the file's values, not without them
    run = train_ttt.parse_args(["--config", str(path), "--lora_rank", "4"])
    assert (run.lora.use_lora, run.lora.lora_rank) == (True, 4)
    path.write_text("{not json")
    fails(capsys, "--config", str(path), match=f"cannot read --config {path}")


def test_a_run_does_not_write_what_it_settles_back_into_the_settings(tmp_path, capsys):
    """--num_train_epochs settles the step count and a fresh run its tokenizer: training_args.json records them,
    the RunConfig the run was given stays what was asked."""
    out = tmp_path / "run"
    run = train_ttt.parse_args([*FAST, "--epochs", "1", "--max_train_examples", "40", "--output_dir", str(out)])
    asked = json.dumps(run.flat(), sort_keys=True)
    train(run)
    assert json.dumps(run.flat(), sort_keys=True) == asked
    assert run.optim.max_train_steps is None and run.data.tokenizer_name is None
    recorded = json.loads((out / "training_args.json").read_text())
    assert recorded["max_train_steps"] > 0 and recorded["num_train_epochs"] == 1.0
    assert recorded["tokenizer_name"] == "builtin:bytes"
    assert set(recorded) == set(run.flat())  # one record of every setting, by its flag's name


def test_adding_a_flag_is_one_field(capsys):
    """--adam_beta1/--adam_beta2/--adam_epsilon (the Hugging Face Trainer's names) were added as three fields of
    OptimizerArguments (and the line that builds AdamW reads them): parsed, checked, in --help, in a YAML file."""
    import torch

    from ttt_train.loop import build_optimizer

    run = train_ttt.parse_args(["--adam-beta2", "0.99", "--adam_epsilon", "1e-6"])
    model = torch.nn.Linear(2, 2)
    [group, _] = build_optimizer(model, run.optim, (), torch.device("cpu")).param_groups
    assert (group["betas"], group["eps"]) == ((0.9, 0.99), 1e-6)
    fails(capsys, "--adam_beta2", "1.0", match="--adam_beta2 must be in [0, 1), got 1.0")
    assert "--adam_beta1 ADAM_BETA1" in train_ttt.build_parser().format_help()
