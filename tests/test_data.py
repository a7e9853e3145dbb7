"""Reading data and names: documents in text files, empty files, `evaluate.py --split all`, local paths against
Hub ids, and a fast failure when the Hub cannot be reached."""

import os
import subprocess
import sys
import time

import pytest

import train_ttt
from conftest import ROOT
from helpers import HEAVY_MODULES, counting_server
from ttt_lm import evaluate
from ttt_train import data, hub

# Three documents as raw WikiText writes them: paragraphs separated by lines that hold a single space, a tab-only
# line, and an ordinary empty line.
RAW = " = Title = \n \n First paragraph , one line .\n \n Second paragraph ,\n still the second .\n\t\n\nThird .\n"
DOCUMENTS = [" = Title = ", " First paragraph , one line .", " Second paragraph ,\n still the second .", "Third ."]


@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "streamed"])
@pytest.mark.parametrize("layout", ["file", "folder"])
def test_whitespace_only_lines_separate_documents(tmp_path, streaming, layout):
    (tmp_path / "corpus").mkdir()
    path = tmp_path / "corpus" / "train.txt"
    path.write_text("\ufeff" + RAW)  # with a byte-order mark, as some editors save UTF-8
    raw = data.load_raw_dataset(str(path if layout == "file" else path.parent), None, streaming)
    assert [row["text"] for row in raw["train"]] == DOCUMENTS


@pytest.mark.parametrize("content", ["", " \n\t\n  \n"], ids=["empty", "whitespace"])
def test_an_empty_data_file_is_one_clear_error(tmp_path, capsys, content):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        train_ttt.main(["--dataset_name", str(path), "--output_dir", str(tmp_path / "o")])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(f": error: data file {path} is empty"
                                             + (" (it holds only whitespace)" if content else "")), err
    assert not (tmp_path / "o").exists()


def test_evaluate_split_all_reads_every_document(tmp_path):
    """A single local file is one split named train; `--split all` evaluates all of it (the default `validation`
    is the trainer's held-out part, 5% of the documents)."""
    path = tmp_path / "test.txt"
    path.write_text("\n \n".join(f" paragraph {i} " + "word " * 40 for i in range(40)))
    train_ttt.main(["--seq_length", "32", "--per_device_train_batch_size", "2", "--max_train_steps", "1",
                    "--eval_steps", "0", "--output_dir", str(tmp_path / "run")])
    model = tmp_path / "run" / "final_model"
    tokens = len(data.tokenize_documents(data.load_tokenizer(str(model)), [r["text"] for r in
                                         data.load_raw_dataset(str(path), None, False)["train"]]))
    results = {}
    for split in ("all", "validation"):
        [results[split]] = evaluate.evaluate(evaluate.parse_args(
            ["--model_name_or_path", str(model), "--dataset_name", str(path), "--split", split, "--seq_length", "32",
             "--output_dir", str(tmp_path / split)]))
    assert results["all"]["tokens"] == (tokens // 32) * 31  # every full block of the whole file
    assert results["validation"]["tokens"] < results["all"]["tokens"] / 10


@pytest.mark.parametrize("name, local", [
    ("allenai/c4", False), ("wikitext", False), ("outputs/nope", True), ("a/b/c", True), ("./x", True),
    ("~/corpus", True), ("corpus.jsonl", True), ("data/mycorpus", False)])
def test_what_looks_local(tmp_path, monkeypatch, name, local):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()  # `outputs/nope` is local because `outputs/` exists here; `data/` does not
    assert hub.looks_local(name) == local


def test_a_missing_local_path_is_reported_at_once(tmp_path, monkeypatch, capsys, connections):
    """A name that can only be a local path is reported as missing without any network look-up."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(SystemExit):
        train_ttt.main(["--dataset_name", "data/mycorpus", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        train_ttt.main(["--tokenizer_name", "outputs/run/final_model", "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "dataset path data/mycorpus does not exist" in err
    assert "tokenizer path outputs/run/final_model does not exist" in err
    assert connections == []


@pytest.mark.parametrize("flags, message", [
    (["--dataset_name", "./nope.txt"], "dataset path ./nope.txt does not exist"),
    (["--tokenizer_name", "./no-tokenizer"], "tokenizer path ./no-tokenizer does not exist"),
    (["--init_from", "./no-model"], "--init_from model path ./no-model does not exist"),
    (["--output_dir", "run", "--resume_from_checkpoint", "latest"], "no complete checkpoint-*/ or milestone-*/"),
    (["--output_dir", "taken"], "holds files this trainer did not write (notes.md)"),
    (["--output_dir", "file/run"], "is a file, so no folder can be made under it"),
], ids=["dataset", "tokenizer", "init_from", "latest", "foreign-files", "under-a-file"])
def test_bad_paths_are_reported_before_the_heavy_imports(tmp_path, flags, message):
    """A path or output folder that cannot work is one error line before torch, transformers, datasets or
    accelerate are imported (seconds on a quiet machine, a minute on a busy one)."""
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.md").write_text("mine")
    (tmp_path / "file").write_text("a file")
    script = str(ROOT / "train_ttt.py")
    probe = (f"import runpy, sys\nsys.path.insert(0, {str(ROOT)!r})\nsys.argv = [{script!r}, *{flags!r}]\n"
             f"try:\n    runpy.run_path({script!r}, run_name='__main__')\nexcept SystemExit as e:\n"
             f"    print('exit', e.code)\n"
             f"print({HEAVY_MODULES})")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.stdout.strip().splitlines()[-2:] == ["exit 1", "[]"], result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0], result.stderr


@pytest.mark.parametrize("script", ["train", "evaluate", "generate"])
def test_an_unreachable_hub_fails_fast_naming_hf_hub_offline(tmp_path, monkeypatch, capsys, connections, script):
    """No network: one connection attempt (here to a closed local port) and no retry or back-off (no sleep), then
    one line naming HF_HUB_OFFLINE."""
    from ttt_lm import generate

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    sleeps = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    hub.hub_unreachable_reason.cache_clear()
    argv = {"train": (train_ttt.main, ["--dataset_name", "someone/corpus", "--output_dir", str(tmp_path / "o")]),
            "evaluate": (evaluate.main, ["--model_name_or_path", "someone/model", "--dataset_name",
                                         "builtin:synthetic", "--seq_length", "32", "--output_dir", str(tmp_path)]),
            "generate": (generate.main, ["--model_name_or_path", "someone/model"])}
    main, args = argv[script]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code != 0
    assert connections == [("127.0.0.1", 9)] and sleeps == []
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if "error" in line]  # evaluate/generate: argparse's usage lines before it
    assert len(errors) == 1 and errors[0] == err[-1] and "HF_HUB_OFFLINE=1" in err[-1], err
    assert "someone/" in err[-1] and "unreachable" in err[-1] and "instead (README" in err[-1]
    hub.hub_unreachable_reason.cache_clear()


def test_offline_hub_lookups_go_to_the_cache_at_once(tmp_path):
    """HF_HUB_OFFLINE=1 (read by the Hub libraries when they are imported: a process of its own) makes a Hub id
    that is not in the local cache fail as one line without a single request: the Hub endpoint is a loopback server
    that counts the connections it gets."""
    with counting_server() as (url, accepted):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": url}
        result = subprocess.run([sys.executable, str(ROOT / "train_ttt.py"), "--dataset_name", "someone/corpus",
                                 "--output_dir", str(tmp_path / "o")], env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"{ROOT / 'train_ttt.py'}: error: dataset 'someone/corpus' is not in the local Hub cache "
        f"({tmp_path / 'hf' / 'hub'}) and HF_HUB_OFFLINE=1 forbids downloading it: download it once where there is "
        f"a network (the cache is reused), or give a local file or folder (--dataset_name my_corpus.txt), or "
        f"builtin:synthetic instead (README: 'Data without a network')"), result.stderr
    assert accepted == []


@pytest.mark.parametrize("script, argv, what", [
    ("generate.py", ["--model_name_or_path", "someone/model"], "tokenizer 'someone/model'"),
    ("generate.py", ["--model_name_or_path", "someone/model", "--tokenizer_name", "builtin:bytes"],
     "model 'someone/model'"),
])
def test_offline_models_and_tokenizers_missing_from_the_cache_say_what_to_do(tmp_path, script, argv, what):
    with counting_server() as (url, accepted):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": url}
        result = subprocess.run([sys.executable, str(ROOT / script), *argv], env=env, capture_output=True, text=True)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and accepted == []
    assert f"{what} is not in the local Hub cache ({tmp_path / 'hf' / 'hub'})" in last and "instead" in last, last
