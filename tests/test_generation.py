"""generate() through the TTTCache against a full forward over the generated sequence, on the official model's
weights (the reference fixtures), whose outputs are far from degenerate, for both inner models and backbones."""

import pytest
import torch
from transformers import DynamicCache

import ttt
from helpers import assert_close, load_reference, needs_reference
from ttt import TTTCache
from ttt_lm import generate
from ttt_train import data

# linear/MLP inner models, Transformer and Mamba backbones; the prompt (21 tokens, mini-batch 16) ends inside a
# mini-batch, so decoding crosses mini-batch ends at the prompt's 32nd and 48th tokens.
CASES = ["linear_len37", "mlp_len37", "linear_mamba_len40", "mlp_mamba_len33"]
PROMPT, NEW = 21, 30


def check_against_full_forward(model, output, prompt_length):
    """Every generated position's logits equal those of one forward over the whole generated sequence; and those
    differ from what each token alone would predict, so a decoder that lost its context would fail here."""
    sequences, steps = output.sequences, torch.stack(output.logits, 1)
    assert steps.shape[1] == sequences.shape[1] - prompt_length == NEW
    with torch.no_grad():
        full = model(sequences).logits[:, prompt_length - 1:-1]
        alone = model(sequences[:, prompt_length - 1:-1].reshape(-1, 1)).logits.view_as(full)
    assert_close("generated logits", steps, full, atol=2e-5)
    assert ((full - alone).abs().amax(-1) > 0.01).all(), "the context does not change the logits: a weak test"


@needs_reference
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_generate_matches_a_full_forward_at_every_position(case, sampled):
    model, io = load_reference(case)
    prompt = io["input_ids"][:, :PROMPT]  # batch 2
    torch.manual_seed(0)
    sampling = dict(do_sample=True, temperature=1.3, top_k=0) if sampled else dict(do_sample=False)
    output = model.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, output_logits=True,
                            return_dict_in_generate=True, pad_token_id=0, **sampling)
    check_against_full_forward(model, output, PROMPT)


@needs_reference
def test_a_user_made_cache_decodes_and_continues():
    """A TTTCache passed to generate() is filled by it; continuing with the whole sequence feeds only the tokens
    the cache has not read, so the continuation's logits are those of a full forward too."""
    model, io = load_reference("mlp_mamba_len33")
    prompt = io["input_ids"][:, :PROMPT]
    cache = TTTCache(model.config.num_hidden_layers)
    first = model.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0,
                           return_dict_in_generate=True, output_logits=True, **{ttt.CACHE_FIELD: cache})
    assert cache.get_seq_length() == PROMPT + NEW - 1  # the last token is generated, not yet read
    check_against_full_forward(model, first, PROMPT)
    second = model.generate(first.sequences, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                            pad_token_id=0, return_dict_in_generate=True, output_logits=True,
                            **{ttt.CACHE_FIELD: cache})
    check_against_full_forward(model, second, PROMPT + NEW)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_forward_takes_the_cache_under_either_name_and_returns_it(name):
    torch.manual_seed(0)
    model = ttt.TTTForCausalLM(ttt.TTTConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2, mini_batch_size=4)).eval()
    ids = torch.randint(0, 50, (1, 9))
    cache = TTTCache(1)
    with torch.no_grad():
        out = model(ids[:, :5], use_cache=True, **{name: cache})
        assert getattr(out, ttt.CACHE_FIELD) is cache and cache.get_seq_length() == 5
        step = model(ids[:, 5:], use_cache=True, **{name: cache}).logits
        assert_close("logits after the cache", step, model(ids).logits[:, 5:], atol=1e-5)


def test_unknown_arguments_and_foreign_caches_are_refused():
    model = ttt.TTTForCausalLM(ttt.TTTConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2, mini_batch_size=4))
    ids = torch.randint(0, 50, (1, 6))
    with pytest.raises(TypeError, match="position_ids"):
        model(ids, position_ids=torch.arange(6)[None])
    with pytest.raises(TypeError, match="DynamicCache"):
        model(ids, cache=DynamicCache(), use_cache=True)
    with pytest.raises(TypeError, match="once"):
        model(ids, cache=TTTCache(1), past_key_values=TTTCache(1), use_cache=True)


@needs_reference
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_generate_py_matches_a_full_forward(tmp_path, sampled):
    """generate.py on a saved model (the official MLP weights, Mamba backbone; byte tokenizer)."""
    model, _ = load_reference("mlp_mamba_len33")
    model.save_pretrained(tmp_path)
    data.byte_tokenizer().save_pretrained(tmp_path)
    argv = ["--model_name_or_path", str(tmp_path), "--prompt", "To be, or not to be: that is", "--seed", "3",
            "--max_new_tokens", str(NEW)] + (["--temperature", "1.2", "--top_k", "0"] if sampled else ["--greedy"])
    output = generate.generate(generate.build_parser().parse_args(argv), stream=False)
    prompt = generate.prompt_ids(data.byte_tokenizer(), "To be, or not to be: that is")
    assert torch.equal(output.sequences[:, :prompt.shape[1]], prompt)
    check_against_full_forward(model, output, prompt.shape[1])
