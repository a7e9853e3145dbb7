"""Long-context evaluation and length extension: passkey prompts of exact lengths and depths, scored right for a
model that copies the needle and at chance for one that ignores it, greedy answers through each model's cache equal
to full forwards, inside / outside the attention window, log-spaced buckets, the evaluation CLI, and --init_from
changing RoPE theta (applied, resumable) and refusing what a model cannot change."""

import json
import re
import shutil
import types

import pytest
import torch

import train_ttt
from helpers import FAST, fails, losses, noisy
from ttt import TTTConfig, TTTForCausalLM
from ttt_e2e import E2EConfig, E2EForCausalLM
from ttt_lm import evaluate
from ttt_train import data, passkey


@pytest.fixture(scope="module")
def tokenizer():
    return data.load_tokenizer("builtin:bytes")


@pytest.fixture(scope="module")
def task(tokenizer):
    return passkey.PasskeyTask(tokenizer, passkey.text_ids(tokenizer, passkey.FILLER + " "), digits=5, seed=3)


class Scripted:
    """A stand-in model whose generate() answers from the prompt's text: `reply(prompt text) -> answer text`."""

    def __init__(self, tokenizer, reply, window=None):
        self.tokenizer, self.reply = tokenizer, reply
        self.config = types.SimpleNamespace(sliding_window=window)
        self.device = torch.device("cpu")

    def generate(self, ids, max_new_tokens, **_):
        text = self.reply(self.tokenizer.decode(ids[0]))
        new = passkey.text_ids(self.tokenizer, text)[:max_new_tokens]
        return torch.cat([ids, torch.tensor([new])], dim=1)


@pytest.mark.parametrize("length", [99, 100, 257, 1000])  # 99: the shortest (no filler)
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_prompts_have_the_asked_length_and_the_needle_at_the_asked_depth(task, tokenizer, length, depth):
    prompt = task.prompt(length, depth, trial=2)
    ids = prompt.ids[0].tolist()
    needle = task.needle(prompt.key)
    filler = length - 1 - len(needle) - len(task.question)
    assert len(ids) == length and ids[0] == tokenizer.eos_token_id
    assert prompt.needle_start == 1 + round(depth * filler) and prompt.needle_length == len(needle)
    assert ids[prompt.needle_start:prompt.needle_start + len(needle)] == needle
    assert ids[-len(task.question):] == task.question
    assert tokenizer.decode(ids).count(prompt.key) == 2  # the key is in the needle only (twice), not in the filler
    if depth == 1.0:
        assert prompt.needle_start + len(needle) == length - len(task.question)


def test_a_model_that_copies_the_needle_scores_all_and_one_that_ignores_it_scores_chance(tokenizer):
    copier = Scripted(tokenizer, lambda text: " " + re.search(r"pass key is (\d+)", text).group(1) + ".")
    lengths, depths = [120, 200], [0.0, 0.5, 1.0]
    one_digit = passkey.PasskeyTask(tokenizer, passkey.text_ids(tokenizer, passkey.FILLER + " "), digits=1, seed=0)
    for task in (one_digit, passkey.PasskeyTask(tokenizer, one_digit.filler_ids, digits=5, seed=0)):
        result = passkey.evaluate(copier, task, lengths, depths, trials=4)
        assert [c["accuracy"] for c in result["cells"]] == [1.0] * 6
        assert [(c["length"], c["depth"]) for c in result["cells"]] == [(n, d) for n in lengths for d in depths]
    ignorer = Scripted(tokenizer, lambda text: " 7.")  # the same answer whatever the prompt: right 1 time in 10
    result = passkey.evaluate(ignorer, one_digit, lengths, depths, trials=20)
    sevens = sum(one_digit.key(n, d, t) == "7" for n in lengths for d in depths for t in range(20))
    assert sum(c["correct"] for c in result["cells"]) == sevens and 0 < sevens < 24  # chance: 12 of 120 expected
    assert result["accuracy_inside"] is None and result["accuracy_outside"] is None  # no window


def test_an_answer_is_right_only_with_exactly_the_key():
    assert passkey.is_right(" 58213. The", "58213") and passkey.is_right("58213", "58213")
    assert not passkey.is_right(" 582134", "58213") and not passkey.is_right(" 5821", "58213")
    assert not passkey.is_right(" the key 58213", "58213")


def test_inside_the_window_means_the_last_token_attends_to_the_needle(task, tokenizer):
    """At depth 1 the needle's first token is `tail` tokens from the end: inside a window of exactly `tail` keys
    (the last token attends to itself and the tail - 1 before it), outside one of tail - 1."""
    tail = len(task.needle("00000")) + len(task.question)
    for window, inside in ((tail, True), (tail - 1, False)):
        copier = Scripted(tokenizer, lambda text: " " + re.search(r"pass key is (\d+)", text).group(1), window)
        result = passkey.evaluate(copier, task, [300], [0.0, 1.0], trials=2)
        start, end = result["cells"]
        assert (start["distance"], start["inside_window"]) == (299, False)  # the needle right after the EOS
        assert (end["distance"], end["inside_window"]) == (tail, inside)
        assert result["accuracy_inside"] == (1.0 if inside else None) and result["accuracy_outside"] == 1.0


def greedy_by_full_forwards(model, ids, steps):
    for _ in range(steps):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("family", ["ttt", "e2e"])
def test_greedy_answers_through_the_cache_equal_full_forwards(task, tokenizer, family):
    torch.manual_seed(3)  # (seed 0 gives an E2E model whose greedy answer here is one repeated token)
    if family == "ttt":
        model = TTTForCausalLM(TTTConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, mini_batch_size=8,
                                         tie_word_embeddings=False))
    else:
        model = E2EForCausalLM(E2EConfig.from_size("tiny", vocab_size=len(tokenizer), hidden_size=32,
                                                   intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                                   sliding_window=16, mini_batch_size=8, suffix_len=1,
                                                   tie_word_embeddings=False))
    model = noisy(model).eval()
    with torch.no_grad():  # embeddings and an untied output layer of unit scale: answers that are not one token
        generator = torch.Generator().manual_seed(1)
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            layer.weight.normal_(0, 1.0, generator=generator)
    prompt = task.prompt(125, 0.5, trial=0)  # not a multiple of the chunk: the answer crosses chunk boundaries
    answer = passkey.answer(model, prompt, 12, tokenizer.eos_token_id)
    with torch.no_grad():
        expected = greedy_by_full_forwards(model, prompt.ids, 12)[0, 125:]
    assert len(set(answer.tolist())) > 2, "degenerate model: the comparison would show nothing"
    assert answer.tolist() == expected.tolist()


def test_log_spaced_buckets_are_powers_of_two_and_mean_the_positions_in_them():
    totals = torch.arange(1, 11, dtype=torch.float64) * 2  # 10 target positions, 2 blocks: loss at p is p
    buckets = evaluate.by_position(totals, num_blocks=2)
    assert [(b["start"], b["end"]) for b in buckets] == [(1, 2), (2, 4), (4, 8), (8, 11)]
    assert [b["loss"] for b in buckets] == [1.0, 2.5, 5.5, 9.0]
    assert [(b["start"], b["end"]) for b in evaluate.by_position(totals, 2, 4)] == [(1, 5), (5, 9), (9, 11)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny TTT-Linear run and a tiny E2E run (window 128) of 2 steps."""
    folder = tmp_path_factory.mktemp("trained")
    train_ttt.main([*FAST, "--output_dir", str(folder / "ttt"), "--max_train_steps", "2"])
    train_ttt.main([*FAST, "--model_type", "e2e", "--output_dir", str(folder / "e2e"), "--max_train_steps", "2"])
    return folder


def test_the_cli_writes_perplexity_by_position_and_the_passkey_table_and_heatmap(trained, tmp_path):
    out = tmp_path / "eval"
    models = [str(trained / "ttt" / "final_model"), str(trained / "e2e" / "final_model")]
    evaluate.main(["--model_name_or_path", *models, "--tasks", "perplexity", "passkey", "--dataset_name",
                   "builtin:synthetic", "--seq_length", "256", "--max_eval_tokens", "512", "--buckets", "log",
                   "--passkey_lengths", "150", "300", "--passkey_depths", "0", "1", "--passkey_trials", "2",
                   "--output_dir", str(out)])
    table = json.loads((out / "eval.json").read_text())
    assert [b["start"] for b in table[0]["by_position_log"]] == [1, 2, 4, 8, 16, 32, 64, 128]
    results = json.loads((out / "passkey.json").read_text())
    assert [r["passkey"]["window"] for r in results] == [None, 128]
    cells = results[1]["passkey"]["cells"]
    assert [(c["length"], c["depth"], c["inside_window"]) for c in cells] == [
        (150, 0.0, False), (150, 1.0, True), (300, 0.0, False), (300, 1.0, True)]
    assert all(len(c["answers"]) == 2 for c in cells)
    assert (out / "passkey.png").stat().st_size > 10_000 and (out / "ppl_by_position.png").stat().st_size > 10_000


@pytest.mark.parametrize("flags,match", [
    (["--tasks", "passkey"], "--tasks passkey needs --passkey_lengths (or --seq_length)"),
    (["--tasks", "passkey", "--passkey_lengths", "100", "--passkey_depths", "1.5"], "--passkey_depths must lie in"),
    (["--tasks", "perplexity", "--seq_length", "64"], "--dataset_name is required for --tasks perplexity"),
    (["--tasks", "passkey", "--passkey_lengths", "100", "--passkey_filler", "data"],
     "--dataset_name is required for --passkey_filler data"),
])
def test_bad_evaluation_flags_are_one_line(tmp_path, capsys, flags, match):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model_name_or_path", str(tmp_path), *flags, "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and match in capsys.readouterr().err


def test_a_passkey_length_too_short_for_the_needle_is_one_line(trained, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model_name_or_path", str(trained / "ttt" / "final_model"), "--tasks", "passkey",
                       "--passkey_lengths", "40", "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 1 and "--passkey_lengths 40 is too short" in capsys.readouterr().err


# ---------------------------------------------------------------- length extension (--init_from)

def test_extension_raises_rope_theta_of_full_attention_and_resumes_exactly(trained, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    train_ttt.main([*FAST, "--model_type", "transformer", "--output_dir", str(base), "--max_train_steps", "2"])
    extend = [*FAST[2:], "--init_from", str(base / "final_model"), "--seq_length", "128", "--rope_theta", "1e6",
              "--max_train_steps", "4", "--save_checkpoint_freq", "2"]
    capsys.readouterr()
    train_ttt.main([*extend, "--output_dir", str(tmp_path / "full")])
    assert "rope_theta 10000.0 -> 1000000.0" in capsys.readouterr().out
    extended = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "final_model")
    assert extended.config.rope_parameters["rope_theta"] == 1e6
    # theta is applied: the same weights with the old theta give other logits
    ids = torch.randint(3, 200, (1, 100), generator=torch.Generator().manual_seed(0))
    old = type(extended.config)(**{**extended.config.to_diff_dict(),
                                   "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}})
    before = AutoModelForCausalLM.from_config(old)
    before.load_state_dict(extended.state_dict())
    with torch.no_grad():
        gap = (extended(ids).logits - before.eval()(ids).logits).abs().max().item()
    assert gap > 1e-3, gap
    # stopped after step 2 and resumed with the same command plus one flag: the uninterrupted run's losses
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", part / "checkpoint-2")
    train_ttt.main([*extend, "--output_dir", str(part), "--resume_from_checkpoint", "latest"])
    expected, got = losses(tmp_path / "full"), losses(part)
    assert sorted(got) == [3, 4] and all(got[s] == expected[s] for s in got), (got, expected)


def test_extension_changes_the_e2e_window_and_refuses_what_a_model_cannot_change(trained, tmp_path, capsys):
    e2e = str(trained / "e2e" / "final_model")
    common = [*FAST[2:], "--seq_length", "128", "--max_train_steps", "1"]
    train_ttt.main([*common, "--init_from", e2e, "--sliding_window", "64", "--output_dir", str(tmp_path / "w")])
    assert E2EConfig.from_pretrained(tmp_path / "w" / "final_model").sliding_window == 64
    ttt_model = str(trained / "ttt" / "final_model")
    fails(capsys, *common, "--init_from", ttt_model, "--rope_theta", "1e6", "--output_dir", str(tmp_path / "a"),
          match="TTT layers restart RoPE every mini-batch")
    fails(capsys, *common, "--init_from", ttt_model, "--mini_batch_size", "8", "--output_dir", str(tmp_path / "b"),
          match="--mini_batch_size 8 conflicts with --init_from")
    fails(capsys, *common, "--init_from", e2e, "--num_hidden_layers", "2", "--output_dir", str(tmp_path / "c"),
          match="--num_hidden_layers 2 conflicts with --init_from")


def test_the_data_filler_is_the_documents_joined_by_eos_as_in_training(tokenizer):
    docs = [{"text": f"document {i} " + "words " * 20} for i in range(50)]
    args = types.SimpleNamespace(passkey_filler="data", passkey_lengths=[300], passkey_digits=5, seed=0)
    task = evaluate.passkey_task(args, tokenizer, docs, "text")
    first = passkey.text_ids(tokenizer, docs[0]["text"])
    assert task.filler_ids[:len(first) + 1] == first + [tokenizer.eos_token_id]
    assert 300 <= len(task.filler_ids) < 300 + len(first) + 1  # enough documents for the longest prompt, no more
    prompt = tokenizer.decode(task.prompt(300, 0.5, trial=0).ids[0])
    assert "document" in prompt and passkey.FILLER[:20] not in prompt
