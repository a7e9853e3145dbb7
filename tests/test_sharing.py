"""Models that leave the project: every folder written with a model in it loads with the Auto classes in a process
that has nothing of this repository (code beside the weights, auto_map), carries a model card, and is published to
the Hub by --push_to_hub (tested against a loopback stand-in for the Hub, with the real huggingface_hub client)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard

import convert_jax_checkpoint as convert
import train_ttt
from conftest import SHARED
from helpers import FAST, FakeHub, assert_close, fails, metrics
from ttt_train import data

JAX = SHARED / "reference_jax"
IDS = [[2, 66, 111, 98, 32, 119, 101, 110, 116, 32, 116, 111, 32, 116, 104, 101]]

# Runs in a fresh interpreter whose working directory is empty and whose sys.path holds nothing of this repository:
# loads the folder with the Auto classes, runs a forward and greedy generation through the model's cache.
LOAD_ANYWHERE = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
ids = torch.tensor(json.loads(sys.argv[3]))
with torch.no_grad():
    logits = model(ids).logits
generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
leaked = sorted(name for name in sys.modules if name.split(".")[0] in ("ttt", "ttt_e2e", "ttt_train", "ttt_scan"))
torch.save({"logits": logits, "generated": generated, "module": type(model).__module__, "leaked": leaked,
            "vocabulary": len(tokenizer)}, out)
"""


def clean_env(tmp_path) -> dict:
    return {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}


def load_anywhere(folder, tmp_path, trust=True):
    """What the fresh process computed on `folder` (or its CompletedProcess when it failed)."""
    where = tmp_path / "elsewhere"
    where.mkdir(exist_ok=True)
    out = where / "result.pt"
    script = LOAD_ANYWHERE if trust else LOAD_ANYWHERE.replace(", trust_remote_code=True", "")
    result = subprocess.run([sys.executable, "-c", script, str(folder), str(out), json.dumps(IDS)], cwd=where,
                            env=clean_env(tmp_path), capture_output=True, text=True, timeout=600)
    if result.returncode:
        return result
    return torch.load(out)


def in_project(folder):
    """The logits and greedy continuation of our own loader (our classes; no code from the folder runs)."""
    model = data.load_model(str(folder))
    ids = torch.tensor(IDS)
    with torch.no_grad():
        logits = model(ids).logits
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                               pad_token_id=0, eos_token_id=None)
    return logits, generated


def train(tmp_path, name, *flags, steps=4):
    out = tmp_path / name
    train_ttt.main([*FAST, "--output_dir", str(out), "--max_train_steps", str(steps), *flags])
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A TTT run with checkpoints and a best model, an E2E run, a Transformer++ run, and a merged LoRA model."""
    root = tmp_path_factory.mktemp("sharing")
    trained = ["--learning_rate", "3e-3"]  # 30 steps: models whose greedy continuation is not one repeated token
    ttt = train(root, "ttt", "--save_checkpoint_freq", "15", "--eval_steps", "15", "--save_best", *trained, steps=30)
    return {"ttt": ttt, "e2e": train(root, "e2e", "--model_type", "e2e", *trained, steps=30),
            "transformer": train(root, "transformer", "--model_type", "transformer", *trained, steps=30),
            "lora": train_lora(root, ttt / "final_model")}


def train_lora(root, base):
    out = root / "lora"
    train_ttt.main([*FAST[2:], "--output_dir", str(out), "--init_from", str(base), "--use_lora", "--merge_lora",
                    "--max_train_steps", "2"])
    return out


FOLDERS = [("ttt", "final_model"), ("ttt", "checkpoint-15"), ("ttt", "best_model"), ("e2e", "final_model"),
           ("transformer", "final_model"), ("lora", "final_model")]


@pytest.mark.parametrize("run,folder", FOLDERS)
def test_every_saved_model_loads_anywhere_with_the_same_logits(runs, tmp_path, run, folder):
    path = runs[run] / folder
    got = load_anywhere(path, tmp_path)
    assert isinstance(got, dict), got.stderr[-3000:]
    assert got["leaked"] == [], got["leaked"]  # the folder's code ran, not this repository's
    logits, generated = in_project(path)
    assert logits.abs().max() > 0.1 and len(set(generated[0, len(IDS[0]):].tolist())) > 1
    assert_close(f"{run}/{folder} logits in a fresh process", got["logits"], logits, atol=0)
    assert torch.equal(got["generated"], generated), (got["generated"], generated)
    if run != "transformer":  # the Transformer++ is transformers' own Mistral: no code to ship
        assert got["module"].startswith("transformers_modules."), got["module"]
        config = json.loads((path / "config.json").read_text())
        assert set(config["auto_map"]) >= {"AutoConfig", "AutoModelForCausalLM"}


def test_without_trust_remote_code_the_error_is_transformers_own(runs, tmp_path):
    result = load_anywhere(runs["ttt"] / "final_model", tmp_path, trust=False)
    assert not isinstance(result, dict) and "trust_remote_code=True" in result.stderr, result


@pytest.mark.skipif(not (JAX / "ttt_linear" / "checkpoint").is_dir(), reason=f"{JAX} is absent")
def test_a_converted_official_checkpoint_loads_anywhere_and_has_a_card(tmp_path):
    out = tmp_path / "converted"
    assert convert.main(["ttt", "--checkpoint", str(JAX / "ttt_linear" / "checkpoint"), "--output_dir", str(out),
                         "--tokenizer_name", "builtin:bytes"]) == 0
    got = load_anywhere(out, tmp_path)
    assert isinstance(got, dict), got.stderr[-3000:]
    logits, _ = in_project(out)
    assert_close("converted official weights in a fresh process", got["logits"], logits, atol=0)
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and "Converted from an official checkpoint" in card.text
    assert str((JAX / "ttt_linear" / "checkpoint").resolve()) in card.text and "ttt-lm-jax" in card.text


def test_model_cards_say_what_the_model_is_and_how_it_was_trained(runs):
    folder = runs["ttt"] / "final_model"
    card = ModelCard.load(folder / "README.md")
    assert (card.data.library_name, card.data.pipeline_tag, card.data.license) == ("transformers", "text-generation",
                                                                                   "mit")
    assert "ttt" in card.data.tags and card.data.datasets is None  # builtin:synthetic is no Hub dataset
    state = json.loads((folder / "trainer_state.json").read_text())
    last_eval = [r for r in metrics(runs["ttt"]) if "eval_loss" in r][-1]
    for text in ("# TTT-Linear", "TTT-Linear with mini-batches of 16 tokens", f"training tokens: {state['tokens']:,}",
                 "steps: 30 of 30", "sequence length: 64", "learning_rate 0.003",
                 f"validation loss at step 30: {last_eval['eval_loss']:.4f}", "best validation loss",
                 "trust_remote_code=True", "--output_dir", "arXiv:2407.04620"):
        assert text in card.text, text
    e2e = ModelCard.load(runs["e2e"] / "final_model" / "README.md")
    assert "# TTT-E2E" in e2e.text and "End-to-End Test-Time Training for Long Context" in e2e.text
    transformer = ModelCard.load(runs["transformer"] / "final_model" / "README.md")
    assert "trust_remote_code" not in transformer.text  # transformers' own class


# ---------------------------------------------------------------- --push_to_hub


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    hub = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", hub.token)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token or cache of the user's
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield hub
    hub.close()


def test_push_to_hub_uploads_the_final_model_and_each_checkpoint(fake_hub, tmp_path):
    out = train(tmp_path, "run", "--save_checkpoint_freq", "2", "--push_to_hub", "--hub_model_id", "alice/tiny-ttt",
                "--hub_private_repo", "--hub_strategy", "checkpoint")
    files = fake_hub.repos["alice/tiny-ttt"]
    local = {p.name: p.read_bytes() for p in (out / "final_model").iterdir() if p.is_file()}
    assert {name: files.get(name) for name in local} == local  # the final model, byte for byte
    assert {"model.safetensors", "config.json", "README.md", "ttt.py", "tokenizer.json"} <= set(local)
    checkpoint = {name.removeprefix("last-checkpoint/") for name in files if name.startswith("last-checkpoint/")}
    assert "trainer_state.json" in checkpoint and files["last-checkpoint/model.safetensors"] == \
        (out / "checkpoint-4" / "model.safetensors").read_bytes()  # replaced at each save: the newest
    assert fake_hub.private["alice/tiny-ttt"] is True
    commits = [summary for method, path, summary in fake_hub.requests if path.endswith("/commit/main")]
    assert commits == ["checkpoint at step 2", "checkpoint at step 4", "final model, step 4"]
    assert fake_hub.requests[0][1] == "/api/whoami-v2"  # the token, checked first


@pytest.mark.parametrize("case,match", [
    ("no token", "--push_to_hub: no Hugging Face token; log in with `hf auth login` or set HF_TOKEN"),
    ("wrong token", "refused the token"),
    ("no hub", "cannot be reached"),
])
def test_push_to_hub_problems_are_one_line_before_training(fake_hub, monkeypatch, tmp_path, capsys, case, match):
    if case == "no token":
        monkeypatch.delenv("HF_TOKEN")
    elif case == "wrong token":
        monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    else:
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    out = tmp_path / "run"
    fails(capsys, *FAST, "--output_dir", str(out), "--max_train_steps", "2", "--push_to_hub", match=match)
    assert not (out / "metrics.jsonl").exists() and not (out / "final_model").exists()  # no training happened
    assert not any(path.endswith("/commit/main") for _, path, _ in fake_hub.requests)


@pytest.mark.slow
def test_a_failed_final_upload_keeps_the_run_and_says_how_to_retry(fake_hub, tmp_path, capsys):
    fake_hub.fail_commits = True
    out = tmp_path / "run"
    error = fails(capsys, *FAST, "--output_dir", str(out), "--max_train_steps", "2", "--push_to_hub",
                  match="--push_to_hub: uploading")
    assert f"retry with: hf upload alice/run {out / 'final_model'} ." in error, error
    assert data.load_model(str(out / "final_model")) is not None  # the local run is intact
    assert (out / "training_summary.json").is_file()


def test_hub_flags_need_push_to_hub(tmp_path, capsys):
    fails(capsys, *FAST, "--output_dir", str(tmp_path / "run"), "--hub_model_id", "a/b",
          match="--hub_model_id applies to --push_to_hub")


@pytest.mark.skipif(not (JAX / "ttt_linear" / "checkpoint").is_dir(), reason=f"{JAX} is absent")
def test_the_converter_pushes_too(fake_hub, tmp_path):
    out = tmp_path / "converted"
    assert convert.main(["ttt", "--checkpoint", str(JAX / "ttt_linear" / "checkpoint"), "--output_dir", str(out),
                         "--push_to_hub", "--hub_model_id", "alice/ttt-linear-official"]) == 0
    files = fake_hub.repos["alice/ttt-linear-official"]
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes() and "README.md" in files
    assert os.environ["HF_ENDPOINT"] == fake_hub.url


# ---------------------------------------------------------------- lm-evaluation-harness

LM_EVAL_TASK = """task: ttt_continuations
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: acc
"""
LM_EVAL_DOCS = [{"context": "Bob went to the", "continuation": " market"},
                {"context": "Alice has a", "continuation": " cat and a dog"},
                {"context": "The king said", "continuation": " nothing at all."}]
# lm-eval's Python API on the folder, as `lm_eval --model hf --model_args pretrained=<folder>,trust_remote_code=True`
LM_EVAL_RUN = """import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
folder, tasks, out = sys.argv[1:4]
results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},trust_remote_code=True,dtype=float32",
                                  tasks=["ttt_continuations"], task_manager=TaskManager(include_path=tasks),
                                  log_samples=True, batch_size=1, device="cpu")
samples = results["samples"]["ttt_continuations"]
json.dump([{"doc": s["doc"], "loglikelihood": s["resps"][0][0][0]} for s in samples], open(out, "w"))
"""


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                    reason="lm-eval is not installed (pip install .[eval])")
@pytest.mark.parametrize("run", ["ttt", "e2e"])
def test_lm_evaluation_harness_scores_the_model_as_evaluate_py_does(runs, tmp_path, run):
    """lm-eval (a local task: JSONL written here) reports each continuation's log-likelihood; our evaluate.py's
    next-token losses on the same tokens give the same sums."""
    from ttt_lm.evaluate import next_token_losses

    folder = runs[run] / "final_model"
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in LM_EVAL_DOCS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "task.yaml").write_text(LM_EVAL_TASK.format(data=tmp_path / "data.jsonl"))
    out = tmp_path / "lm_eval.json"
    env = {**clean_env(tmp_path), "HF_DATASETS_OFFLINE": "1", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", LM_EVAL_RUN, str(folder), str(tmp_path / "tasks"), str(out)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    reported = json.loads(out.read_text())
    model, tokenizer = data.load_model(str(folder)), data.load_tokenizer(str(folder))
    assert [r["doc"] for r in reported] == LM_EVAL_DOCS
    for entry in reported:
        doc = entry["doc"]
        context = tokenizer(doc["context"], add_special_tokens=False)["input_ids"]
        whole = tokenizer(doc["context"] + doc["continuation"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            losses = next_token_losses(model, torch.tensor([whole]))[0]  # losses[i]: predicting whole[i + 1]
        ours = -losses[len(context) - 1:len(whole) - 1].sum().double()
        assert_close(f"{run} log-likelihood of {doc['continuation']!r}", torch.tensor(entry["loglikelihood"]).double(),
                     ours, atol=1e-4 * abs(ours.item()))
