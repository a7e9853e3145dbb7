"""The Triton TTT-Linear scan (ttt_kernels.py) against the PyTorch paths: on a GPU where there is one, else on the
CPU through Triton's interpreter (conftest.py selects it)."""

import importlib.util

import pytest
import torch

import ttt
from test_model import chunked_prefill_logits, logits_and_gradients, straightforward_then_recomputing
from ttt import TTTConfig, TTTForCausalLM, TTTLinear, linear_scan_op

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="Triton is not installed (optional; .ci/run installs it)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def kernels(monkeypatch):
    """ttt_kernels, with the model dispatching to it on CPU tensors and counting its scans in `kernels.calls`."""
    import triton

    kernels = ttt.ttt_kernels
    if triton.knobs.runtime.interpret:
        monkeypatch.setattr(kernels, "supports", kernels.block_shapes_fit)
    elif DEVICE == "cpu":
        pytest.skip("without a GPU the kernels need TRITON_INTERPRET=1 before Triton is imported (conftest.py)")
    calls = []
    forward = kernels.linear_scan_forward
    monkeypatch.setattr(kernels, "linear_scan_forward", lambda *args: calls.append(1) or forward(*args))
    monkeypatch.setattr(kernels, "calls", calls, raising=False)
    return kernels


def scan_inputs(B, H, n, K, f):
    make = lambda *shape, scale=1.0: (torch.randn(*shape, device=DEVICE) * scale).requires_grad_()  # noqa: E731
    return (make(B, H, n, K, f), make(B, H, n, K, f), make(B, H, n, K, f), make(B, H, n, K, K, scale=0.05),
            (torch.rand(B, H, n, K, 1, device=DEVICE) * 0.02).requires_grad_(), make(B, H, f, f, scale=0.02),
            make(B, H, 1, f, scale=0.02), (1 + 0.1 * torch.randn(H, 1, f, device=DEVICE)).requires_grad_(),
            make(H, 1, f, scale=0.1))


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("shape", [(2, 3, 4, 16, 64), (1, 2, 5, 16, 32)])
@pytest.mark.parametrize("use_final_weights", [True, False])
def test_triton_scan_equals_the_pytorch_scan(kernels, shape, use_final_weights):
    torch.manual_seed(0)
    inputs = scan_inputs(*shape)
    reference = linear_scan_op(*inputs, keep_starts=True, triton=False)[:3]
    outputs = linear_scan_op(*inputs, keep_starts=True, triton=True)[:3]
    assert kernels.calls
    for got, expected in zip(outputs, reference):
        assert relative_error(got, expected) < 1e-5
    weights = [torch.randn_like(t) for t in reference]
    used = slice(None) if use_final_weights else slice(0, 1)  # the final W, b unused: their gradients are None

    def loss(results):
        return sum((r * w).sum() for r, w in zip(results[used], weights[used]))

    expected = torch.autograd.grad(loss(reference), inputs)
    got = torch.autograd.grad(loss(outputs), inputs)
    for name, g, e in zip(("q", "k", "target", "eta_qk", "e", "W0", "b0", "gamma", "beta"), got, expected):
        assert relative_error(g, e) < 1e-5, name


def test_triton_scan_runs_only_where_its_block_shapes_fit(kernels):
    assert kernels.block_shapes_fit(torch.zeros(1, 2, 3, 16, 64))
    assert not kernels.block_shapes_fit(torch.zeros(1, 2, 3, 16, 96))  # the 760m size's head dim
    assert not kernels.block_shapes_fit(torch.zeros(1, 2, 3, 8, 64))


def linear_model(**overrides):
    torch.manual_seed(0)
    config = TTTConfig(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, mini_batch_size=16, **overrides)
    model = TTTForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.seq_modeling_block.learnable_token_idx.normal_(0, 0.01)
    return model.to(DEVICE)


@pytest.mark.parametrize("length", [37, 48, 100])
@pytest.mark.parametrize("overrides", [{}, dict(pre_conv=True, share_qk=True, use_gate=True)], ids=["plain", "mamba"])
def test_model_with_the_triton_scan_equals_the_straightforward_loop(kernels, monkeypatch, length, overrides):
    model = linear_model(**overrides)
    ids = torch.randint(0, 97, (2, length), device=DEVICE)
    (slow_logits, slow_grads), (fast_logits, fast_grads) = straightforward_then_recomputing(
        monkeypatch, lambda: logits_and_gradients(model, ids))
    assert len(kernels.calls) == 2  # one scan per layer, in the fast pass only
    assert (slow_logits - fast_logits).abs().max() < 1e-5
    # float32 sums in another order; tau's gradient (learnable_token_idx), a sum over every mini-batch with
    # cancellation, differs by about 1.5e-5 of its largest entry here, the PyTorch recomputing scan's too
    assert all((a - b).abs().max() <= 5e-5 * a.abs().max() + 1e-7 for a, b in zip(slow_grads, fast_grads))


def test_triton_scan_through_the_cache_matches_the_straightforward_loop(kernels, monkeypatch):
    model = linear_model(pre_conv=True, share_qk=True).eval()
    ids = torch.randint(0, 97, (2, 70), device=DEVICE)
    logits = straightforward_then_recomputing(
        monkeypatch, lambda: chunked_prefill_logits(model, ids, [(0, 5), (5, 50), (50, 51), (51, 70)]))
    assert kernels.calls  # the 5..50 chunk holds full mini-batches
    assert (logits[0] - logits[1]).abs().max() < 1e-5


def test_triton_scan_can_be_turned_off(kernels, monkeypatch):
    monkeypatch.setattr(TTTLinear, "triton_scan", False)
    model = linear_model()
    ids = torch.randint(0, 97, (1, 40), device=DEVICE)
    model(ids, labels=ids).loss.backward()
    assert not kernels.calls
