import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import ttt
import ttt_scan
from helpers import (
    REFERENCE,
    assert_close,
    assert_gradients_close,
    chunked_prefill_logits,
    load_reference,
    logits_and_gradients,
    loop_then,
    needs_reference,
)
from helpers import REFERENCE_CASES as CASES
from ttt import (
    TTT_STANDARD_CONFIGS,
    TTTCache,
    TTTConfig,
    TTTForCausalLM,
    TTTModel,
)
from ttt_math import gelu_tanh_grad, gelu_tanh_second_derivative
from ttt_scan import linear_scan_op, mlp_scan_op
from ttt_train.models import enable_activation_checkpointing

VARIANTS = [
    dict(ttt_layer_type="linear"),
    dict(ttt_layer_type="mlp"),
    dict(ttt_layer_type="linear", pre_conv=True, share_qk=True, use_gate=True),
    dict(ttt_layer_type="mlp", pre_conv=True, share_qk=True, use_gate=True),
]


def small_model(**overrides):
    torch.manual_seed(0)
    config = TTTConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, mini_batch_size=8, **overrides)
    return TTTForCausalLM(config)


@needs_reference
@pytest.mark.parametrize("case", CASES)
def test_reference_logits(case):
    model, io = load_reference(case)
    with torch.no_grad():
        logits = model(io["input_ids"]).logits
    assert logits.dtype == torch.float32
    assert (logits - io["logits"]).abs().max() < 1e-4


@needs_reference
@pytest.mark.parametrize("case", CASES)
def test_reference_decode_through_cache(case):
    model, io = load_reference(case)
    ids = io["input_ids"]
    cache = TTTCache(model.config.num_hidden_layers)
    with torch.no_grad():
        steps = [model(ids[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(ids.shape[1])]
    assert (torch.cat(steps, 1) - io["decode_logits"]).abs().max() < 1e-4


@needs_reference
def test_official_checkpoint_folder_loads_with_from_pretrained(tmp_path):
    """An official checkpoint folder (config.json + weights under the official names) loads through Auto classes."""
    case = "mlp_mamba_len33"
    folder = REFERENCE / case
    config = {**json.loads((folder / "config.json").read_text()), "model_type": "ttt"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = load_file(folder / "reference_state_dict.safetensors")
    state.pop("lm_head.weight")  # tied: an HF checkpoint stores the shared tensor once
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    io = load_file(folder / "io.safetensors")
    with torch.no_grad():
        assert (model(io["input_ids"]).logits - io["logits"]).abs().max() < 1e-4


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
def test_decode_equals_prefill(variant):
    model = small_model(**variant).eval()
    ids = torch.randint(0, 97, (2, 29))  # 29: three mini-batches of 8 and a remainder of 5
    with torch.no_grad():
        full = model(ids).logits
        cache = TTTCache(2)
        steps = [model(ids[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(29)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5
    assert cache.get_seq_length() == 29


@pytest.mark.parametrize("variant", VARIANTS[:2], ids=["linear", "mlp"])
def test_chunked_prefill_at_any_offset(variant):
    model = small_model(**variant).eval()
    ids = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        full = model(ids).logits
        cache = TTTCache(2)
        chunks = [model(ids[:, a:b], cache=cache, use_cache=True).logits
                  for a, b in [(0, 3), (3, 14), (14, 15), (15, 33), (33, 40)]]
    assert (torch.cat(chunks, 1) - full).abs().max() < 1e-5


def test_prefix_logits_do_not_depend_on_later_tokens():
    model = small_model(ttt_layer_type="mlp").eval()
    ids = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        assert (model(ids[:, :19]).logits - model(ids).logits[:, :19]).abs().max() < 1e-5


def test_cache_memory_is_constant_in_context_length():
    model = small_model(pre_conv=True, share_qk=True).eval()
    sizes = []
    for length in (17, 100):
        cache = TTTCache(2)
        with torch.no_grad():
            model(torch.randint(0, 97, (1, length)), cache=cache, use_cache=True)
        sizes.append(sum(t.numel() for t in cache.tensors()))
    assert sizes[0] == sizes[1] > 0


def test_generate_greedy_matches_argmax_loop_and_sampling_runs():
    model = small_model(ttt_layer_type="mlp", pre_conv=True).eval()
    prompt = torch.randint(0, 97, (1, 11))
    out = model.generate(prompt, max_new_tokens=13, do_sample=False, pad_token_id=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(13):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
    torch.manual_seed(1)
    sampled = model.generate(prompt, max_new_tokens=13, do_sample=True, top_k=20, temperature=0.9, pad_token_id=0)
    assert sampled.shape == (1, 24) and torch.equal(sampled[:, :11], prompt)


def test_save_and_load_round_trip(tmp_path):
    model = small_model(ttt_layer_type="mlp", use_gate=True).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = TTTForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 97, (2, 21))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_auto_classes(tmp_path):
    small_model().save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is TTTConfig
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is TTTForCausalLM
    assert type(AutoModel.from_pretrained(tmp_path)) is TTTModel


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
def test_gradient_reaches_every_parameter(variant):
    model = small_model(tie_word_embeddings=False, **variant)
    with torch.no_grad():  # tau is clamped at 0 by max(0, .); move it off the kink so its gradient is defined
        for layer in model.model.layers:
            layer.seq_modeling_block.learnable_token_idx.normal_(0, 0.01)
    ids = torch.randint(0, 97, (2, 21))
    model(ids, labels=ids).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_scan_checkpointing_keeps_gradients():
    ids = torch.randint(0, 97, (2, 43))
    grads = []
    for group in (0, 2):
        model = small_model(ttt_layer_type="mlp", scan_checkpoint_group_size=group).train()
        model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_standard_sizes():
    expected = {"125m": (768, 2048, 12, 12), "350m": (1024, 2736, 24, 16),
                "760m": (1536, 4096, 24, 16), "1b": (2048, 5504, 24, 32)}
    for size, dims in expected.items():
        c = TTTConfig.from_size(size)
        assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads) == dims
    with torch.device("meta"):
        model = TTTForCausalLM(TTTConfig.from_size("125m"))
    model.tie_weights()  # transformers 5.0 leaves a model built on the meta device untied until it is loaded
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 110.3) < 0.1  # the official count, tied
    tiny = TTTForCausalLM(TTTConfig.from_size("tiny", vocab_size=1000))
    body = sum(p.numel() for n, p in tiny.named_parameters() if "embed_tokens" not in n)
    assert 1e6 <= body <= 5e6
    assert set(TTT_STANDARD_CONFIGS) == {"tiny", "125m", "350m", "760m", "1b"}


@pytest.mark.parametrize("field, value, words", [
    ("hidden_size", 30, ["hidden_size", "num_attention_heads"]),
    ("ttt_layer_type", "conv", ["ttt_layer_type", "linear", "mlp"]),
    ("mini_batch_size", 0, ["mini_batch_size", ">= 1"]),
    ("num_attention_heads", 0, ["num_attention_heads"]),
    ("scan_checkpoint_group_size", -1, ["scan_checkpoint_group_size"]),
])
def test_config_errors_name_the_field(field, value, words):
    with pytest.raises(ValueError) as error:
        TTTConfig(**{"hidden_size": 32, "num_attention_heads": 4, field: value})
    assert all(word in str(error.value) for word in words)


def test_padding_is_refused():
    model = small_model()
    ids = torch.randint(0, 97, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="padding"):
        model(ids, attention_mask=mask)


def test_bfloat16_model_decodes_like_its_prefill():
    model = small_model(ttt_layer_type="mlp", pre_conv=True, share_qk=True).to(torch.bfloat16).eval()
    ids = torch.randint(0, 97, (2, 21))
    with torch.no_grad():
        full = model(ids).logits
        cache = TTTCache(2)
        steps = torch.cat([model(ids[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(21)], 1)
    assert {t.dtype for t in cache.tensors()} == {torch.bfloat16}
    assert (steps - full).abs().max() < 0.05 * full.abs().max()


def test_generate_decodes_through_the_cache(tmp_path, monkeypatch):
    """One token per step after the prompt, also for a checkpoint without generation_config.json (official ones)."""
    small_model().save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").unlink()
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    lengths = []
    forward = TTTModel.forward

    def recording_forward(self, input_ids=None, **kwargs):
        lengths.append(input_ids.shape[1])
        return forward(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(TTTModel, "forward", recording_forward)
    prompt = torch.randint(0, 97, (1, 19))
    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                   pad_token_id=0)
    assert lengths == [19, 1, 1, 1]


@pytest.mark.parametrize("length", [37, 48, 100])
@pytest.mark.parametrize("variant", VARIANTS, ids=["linear", "mlp", "linear-mamba", "mlp-mamba"])
def test_recomputing_scan_equals_the_loop_scan(monkeypatch, length, variant):
    model = small_model(**variant)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.seq_modeling_block.learnable_token_idx.normal_(0, 0.01)
    ids = torch.randint(0, 97, (2, length))
    (slow_logits, slow_grads), (fast_logits, fast_grads) = loop_then(model, lambda: logits_and_gradients(model, ids))
    assert_close("logits", fast_logits, slow_logits, atol=1e-5)
    # float32 sums over many mini-batches in another order: within 1e-5 of each gradient's largest entry, plus 1e-7
    assert_gradients_close(fast_grads, slow_grads, rtol=1e-5, atol=1e-7)


@needs_reference
@pytest.mark.parametrize("case", ["linear_len37", "mlp_mamba_len33"])
def test_float64_is_kept_through_the_recomputing_scans(monkeypatch, case):
    """A float64 model scans in float64 (its scans cast to float32 and back once): the recomputing scans give the
    loop scan's logits and gradients to float64 rounding, and the cache holds float64 states."""
    model, io = load_reference(case)
    model.double()
    ids = io["input_ids"]
    (slow_logits, slow_grads), (fast_logits, fast_grads) = loop_then(model, lambda: logits_and_gradients(model, ids))
    assert_close("float64 logits", fast_logits, slow_logits, atol=1e-11)
    assert_gradients_close(fast_grads, slow_grads, rtol=1e-9, atol=1e-13)
    cache = TTTCache(model.config.num_hidden_layers)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    assert {t.dtype for t in cache.tensors()} == {torch.float64}


def scan_inputs(B, H, n, K, f, hidden):
    """float64 inputs of a recomputing scan: q, k, target, eta (causal), eta_qk, e, the inner weights (hidden
    widths `hidden`, [] for TTT-Linear), gamma, beta."""
    make = lambda *shape, scale=1.0: (torch.randn(*shape, dtype=torch.float64) * scale).requires_grad_()
    eta = (torch.rand(B, H, n, K, K, dtype=torch.float64) * 0.2).tril().requires_grad_()
    widths = [f, *hidden, f]
    weights = [w for a, b in zip(widths, widths[1:]) for w in (make(B, H, a, b, scale=0.3), make(B, H, 1, b))]
    return (make(B, H, n, K, f), make(B, H, n, K, f), make(B, H, n, K, f), eta, make(B, H, n, K, K, scale=0.2),
            (torch.rand(B, H, n, K, 1, dtype=torch.float64) * 0.1).requires_grad_(), *weights,
            (torch.rand(H, 1, f, dtype=torch.float64) + 0.5).requires_grad_(), make(H, 1, f))


# 5 mini-batches: the backward runs over spans of 2, 2 and 1 mini-batches, or one span of 5
@pytest.mark.parametrize("span", [2, 16])
def test_fast_linear_scan_gradcheck(monkeypatch, span):
    torch.manual_seed(0)
    monkeypatch.setattr(ttt_scan, "MAX_SPAN", span)
    q, k, target, _, eta_qk, e, W1, b1, gamma, beta = scan_inputs(1, 2, 5, 4, 3, hidden=[])
    scan = lambda *inputs: linear_scan_op(*inputs, keep_starts=True, triton=False)[:3]
    assert torch.autograd.gradcheck(scan, (q, k, target, eta_qk, e, W1, b1, gamma, beta), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("span", [2, 16])
def test_fast_mlp_scan_gradcheck(monkeypatch, span):
    torch.manual_seed(0)
    monkeypatch.setattr(ttt_scan, "MAX_SPAN", span)
    scan = lambda *inputs: mlp_scan_op(*inputs, keep_starts=True, triton=False)[:5]
    assert torch.autograd.gradcheck(scan, scan_inputs(1, 2, 5, 4, 3, hidden=[12]), eps=1e-6, atol=1e-5)


def test_second_derivatives_through_the_scans_raise_instead_of_vanishing():
    torch.manual_seed(0)
    q, k, target, eta, eta_qk, e, *rest = scan_inputs(1, 2, 3, 4, 5, hidden=[20])
    out = mlp_scan_op(q, k, target, eta, eta_qk, e, *rest, keep_starts=True, triton=False)[0]
    d_q, = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        d_q.sum().backward()


def test_gelu_tanh_derivatives():
    x = torch.linspace(-6, 6, 241, dtype=torch.float64, requires_grad=True)
    first, = torch.autograd.grad(torch.nn.functional.gelu(x, approximate="tanh").sum(), x, create_graph=True)
    second, = torch.autograd.grad(first.sum(), x)
    assert torch.allclose(gelu_tanh_grad(x), first, atol=1e-7)
    assert torch.allclose(gelu_tanh_second_derivative(x), second, atol=1e-7)


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_torch_compile_takes_the_whole_model_with_each_scan_as_one_operator(layer_type):
    model = small_model(ttt_layer_type=layer_type)
    ids = torch.randint(0, 97, (2, 8 * 6 + 3))  # 6 full mini-batches: a traced loop would unroll 6 steps
    eager_logits, eager_grads = logits_and_gradients(model, ids)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    with torch.profiler.profile() as profile:
        logits, grads = logits_and_gradients(compiled, ids)
    scans = [e.name for e in profile.events() if e.name.startswith(f"ttt::{layer_type}_scan")]
    assert sorted(set(scans)) == [f"ttt::{layer_type}_scan", f"ttt::{layer_type}_scan_backward"]
    assert_close("compiled logits", logits, eager_logits, atol=1e-5)
    assert_gradients_close({n.removeprefix("_orig_mod."): g for n, g in grads.items()}, eager_grads, rtol=1e-5,
                           atol=1e-7)


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_gradient_checkpointing_keeps_the_gradients_of_the_recomputing_scans(layer_type):
    model = small_model(ttt_layer_type=layer_type)
    ids = torch.randint(0, 97, (2, 8 * 5 + 3))
    logits, grads = logits_and_gradients(model, ids)
    enable_activation_checkpointing(model)
    assert all(block.gradient_checkpointing for block in model.model.layers)
    checkpointed_logits, checkpointed_grads = logits_and_gradients(model, ids)
    assert_close("logits", checkpointed_logits, logits, atol=1e-6)
    assert_gradients_close(checkpointed_grads, grads, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_recomputing_scan_through_the_cache_matches_the_loop_scan(monkeypatch, layer_type):
    model = small_model(ttt_layer_type=layer_type, pre_conv=True, share_qk=True).eval()
    ids = torch.randint(0, 97, (2, 45))
    logits = loop_then(model, lambda: chunked_prefill_logits(model, ids, [(0, 5), (5, 30), (30, 31), (31, 45)]))
    assert (logits[0] - logits[1]).abs().max() < 1e-5


def test_recomputing_scan_under_bf16_autocast_matches_the_loop_scan(monkeypatch):
    # the recomputing scan runs in float32 inside bf16 autocast (an earlier scan failed there on bf16 activations)
    model = small_model(ttt_layer_type="mlp")
    ids = torch.randint(0, 97, (2, 40))
    grads = []
    for scan in ("loop", "recomputing"):
        model.config.scan_implementation = scan
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert (grads[0] - grads[1]).norm() < 1e-2 * grads[0].norm()  # bf16 rounding, summed in another order


def test_ttt_py_alone_runs_the_loop_scan(monkeypatch, caplog):
    """ttt.py copied without ttt_scan.py: "auto" runs the loop (the same logits), saying so once; an explicit
    scan that needs ttt_scan.py is an error."""
    model = small_model(ttt_layer_type="mlp").eval()
    ids = torch.randint(0, 97, (1, 37))
    with torch.no_grad():
        expected = model(ids).logits
        monkeypatch.setattr(ttt, "HAS_SCANS", False)
        with caplog.at_level("WARNING", logger="ttt"):
            assert_close("logits without ttt_scan.py", model(ids).logits, expected, atol=1e-5)
        assert ["ttt_scan.py is not beside ttt.py" in r.getMessage() for r in caplog.records] == [True]
        model.config.scan_implementation = "recomputing"
        with pytest.raises(RuntimeError, match="needs ttt_scan.py"):
            model(ids)


def test_scan_implementation_is_checked():
    with pytest.raises(ValueError, match="scan_implementation must be one of"):
        TTTConfig(scan_implementation="fast")
