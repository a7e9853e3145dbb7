"""The Triton scans of TTT-Linear and TTT-MLP (ttt_kernels.py) against the PyTorch paths: on a GPU where there is
one, else on the CPU through Triton's interpreter (conftest.py selects it)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ttt_scan
from helpers import (
    assert_close,
    assert_gradients_close,
    chunked_prefill_logits,
    logits_and_gradients,
    loop_then,
)
from ttt import TTTConfig, TTTForCausalLM
from ttt_scan import linear_scan_op, mlp_scan_op

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="Triton is not installed (optional; .ci/run installs it)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def kernels(monkeypatch):
    """ttt_kernels, with the model dispatching to it on CPU tensors and recording its forward scans in
    `kernels.calls` ("linear" or "mlp" each)."""
    import triton

    kernels = ttt_scan.ttt_kernels
    if triton.knobs.runtime.interpret:
        monkeypatch.setattr(kernels, "supports", kernels.block_shapes_fit)
    elif DEVICE == "cpu":
        pytest.skip("without a GPU the kernels need TRITON_INTERPRET=1 before Triton is imported (conftest.py)")
    calls = []
    for inner in ("linear", "mlp"):
        forward = getattr(kernels, f"{inner}_scan_forward")
        monkeypatch.setattr(kernels, f"{inner}_scan_forward",
                            lambda *args, inner=inner, forward=forward: calls.append(inner) or forward(*args))
    monkeypatch.setattr(kernels, "calls", calls, raising=False)
    return kernels


def scan_inputs(B, H, n, K, f, hidden=None):
    """The linear scan's inputs, or with a hidden width the MLP scan's (with eta, and W1, b1, W2, b2)."""
    make = lambda *shape, scale=1.0: (torch.randn(*shape, device=DEVICE) * scale).requires_grad_()
    widths = [f, f] if hidden is None else [f, hidden, f]
    weights = [w for a, b in zip(widths, widths[1:])
               for w in (make(B, H, a, b, scale=0.02), make(B, H, 1, b, scale=0.02))]
    eta = [] if hidden is None else [(torch.rand(B, H, n, K, K, device=DEVICE) * 0.05).tril().requires_grad_()]
    return (make(B, H, n, K, f), make(B, H, n, K, f), make(B, H, n, K, f), *eta, make(B, H, n, K, K, scale=0.05),
            (torch.rand(B, H, n, K, 1, device=DEVICE) * 0.02).requires_grad_(), *weights,
            (1 + 0.1 * torch.randn(H, 1, f, device=DEVICE)).requires_grad_(), make(H, 1, f, scale=0.1))


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def assert_scans_agree(scan, inputs, names, use_final_weights):
    """scan(inputs, triton) with and without the kernels: the same outputs and gradients (float32 sums in another
    order), whether or not the final weights are used (their gradients None when not)."""
    reference = scan(inputs, False)
    outputs = scan(inputs, True)
    assert len(outputs) == len(reference) > 0
    for i, (got, expected) in enumerate(zip(outputs, reference)):
        assert relative_error(got, expected) < 1e-5, f"output {i}"
    weights = [torch.randn_like(t) for t in reference]
    used = slice(None) if use_final_weights else slice(0, 1)

    def loss(results):
        return sum((r * w).sum() for r, w in zip(results[used], weights[used]))

    expected = torch.autograd.grad(loss(reference), inputs)
    got = torch.autograd.grad(loss(outputs), inputs)
    assert len(got) == len(expected) == len(names)
    for name, g, e in zip(names, got, expected):
        assert relative_error(g, e) < 1e-5, name


@pytest.mark.parametrize("shape", [(2, 3, 4, 16, 64), (1, 2, 5, 16, 32)])
@pytest.mark.parametrize("use_final_weights", [True, False])
def test_triton_scan_equals_the_pytorch_scan(kernels, shape, use_final_weights):
    torch.manual_seed(0)
    assert_scans_agree(lambda inputs, triton: linear_scan_op(*inputs, keep_starts=True, triton=triton)[:3],
                       scan_inputs(*shape), ("q", "k", "target", "eta_qk", "e", "W0", "b0", "gamma", "beta"),
                       use_final_weights)
    assert kernels.calls == ["linear"]


# 5 mini-batches; with spans of 2 the backward walks back through the kernel's one span of 5 as 2, 2 and 1
@pytest.mark.parametrize("shape, span", [((2, 3, 3, 16, 16), 16), ((1, 2, 5, 16, 32), 2), ((1, 1, 2, 16, 64), 16)])
@pytest.mark.parametrize("use_final_weights", [True, False])
def test_triton_mlp_scan_equals_the_pytorch_scan(kernels, monkeypatch, shape, span, use_final_weights):
    torch.manual_seed(0)
    monkeypatch.setattr(ttt_scan, "MAX_SPAN", span)
    assert_scans_agree(lambda inputs, triton: mlp_scan_op(*inputs, keep_starts=True, triton=triton)[:5],
                       scan_inputs(*shape, hidden=4 * shape[-1]),
                       ("q", "k", "target", "eta", "eta_qk", "e", "W1", "b1", "W2", "b2", "gamma", "beta"),
                       use_final_weights)
    assert kernels.calls == ["mlp"]


def test_triton_scan_runs_only_where_its_block_shapes_fit(kernels):
    assert kernels.block_shapes_fit(torch.zeros(1, 2, 3, 16, 64))
    assert kernels.block_shapes_fit(torch.zeros(1, 2, 3, 16, 128))
    assert not kernels.block_shapes_fit(torch.zeros(1, 2, 3, 16, 96))  # the 760m size's head dim
    assert not kernels.block_shapes_fit(torch.zeros(1, 2, 3, 8, 64))
    assert kernels.block_shapes_fit(torch.zeros(1, 2, 3, 16, 64), "mlp")
    assert not kernels.block_shapes_fit(torch.zeros(1, 2, 3, 16, 128), "mlp")  # 8 f^2 weights: too many
    assert not kernels.block_shapes_fit(torch.zeros(1, 2, 3, 32, 64), "mlp")


def test_triton_mlp_scan_runs_only_on_gpus_it_suits(kernels):
    h100, a100, rtx_4090 = ((9, 0), 232448), ((8, 0), 166912), ((8, 9), 101376)  # capability, shared memory
    assert kernels.mlp_fits(64, *h100) and kernels.mlp_fits(16, *h100)
    assert not kernels.mlp_fits(64, *a100)
    assert not kernels.mlp_fits(32, *rtx_4090)
    assert kernels.mlp_fits(32, (12, 0), 101376) and not kernels.mlp_fits(64, (12, 0), 101376)  # an RTX 5090


def small_model(**overrides):
    torch.manual_seed(0)
    config = TTTConfig(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, mini_batch_size=16, **overrides)
    model = TTTForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.seq_modeling_block.learnable_token_idx.normal_(0, 0.01)
    return model.to(DEVICE)


@pytest.mark.parametrize("inner, length", [("linear", 37), ("linear", 48), ("linear", 100), ("mlp", 37), ("mlp", 48)])
@pytest.mark.parametrize("overrides", [{}, dict(pre_conv=True, share_qk=True, use_gate=True)], ids=["plain", "mamba"])
def test_model_with_the_triton_scan_equals_the_loop_scan(kernels, monkeypatch, inner, length, overrides):
    model = small_model(ttt_layer_type=inner, **overrides)
    ids = torch.randint(0, 97, (2, length), device=DEVICE)
    (slow_logits, slow_grads), (fast_logits, fast_grads) = loop_then(model, lambda: logits_and_gradients(model, ids))
    assert kernels.calls == [inner] * 2  # one scan per layer, in the fast pass only
    assert_close("logits", fast_logits, slow_logits, atol=1e-5)
    # float32 sums in another order; tau's gradient (learnable_token_idx), a sum over every mini-batch with
    # cancellation, differs by about 1.5e-5 of its largest entry here, the PyTorch recomputing scan's too
    assert_gradients_close(fast_grads, slow_grads, rtol=5e-5, atol=1e-7)


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_triton_scan_through_the_cache_matches_the_loop_scan(kernels, monkeypatch, inner):
    model = small_model(ttt_layer_type=inner, pre_conv=True, share_qk=True).eval()
    ids = torch.randint(0, 97, (2, 70), device=DEVICE)
    logits = loop_then(model, lambda: chunked_prefill_logits(model, ids, [(0, 5), (5, 50), (50, 51), (51, 70)]))
    assert kernels.calls == [inner] * 2  # the 5..50 chunk holds full mini-batches
    assert (logits[0] - logits[1]).abs().max() < 1e-5


@pytest.mark.parametrize("scan", ["auto", "triton", "recomputing", "loop"])
def test_the_scan_is_chosen_by_the_config(kernels, scan):
    ids = torch.randint(0, 97, (1, 40), device=DEVICE)
    for inner in ("linear", "mlp"):
        small_model(ttt_layer_type=inner, scan_implementation=scan)(ids, labels=ids).loss.backward()
    expected = ["linear"] * 2 + ["mlp"] * 2 if scan in ("auto", "triton") else []  # a scan per layer
    assert kernels.calls == expected


def test_triton_where_it_cannot_run_is_an_error_and_auto_falls_back(kernels, caplog):
    """Head dim 24 has no kernel: "triton" refuses with the reason; "auto" runs the recomputing scan, saying why
    once on a GPU (on a CPU the recomputing scan is the fastest path: nothing to say)."""
    def model(scan):
        torch.manual_seed(0)
        return TTTForCausalLM(TTTConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, scan_implementation=scan)).to(DEVICE)
    ids = torch.randint(0, 97, (1, 40), device=DEVICE)
    with pytest.raises(ValueError, match="scan_implementation='triton' cannot run here: (no kernel for "
                                         "mini_batch_size 16 and head dim 24|the tensors are not on a CUDA GPU)"):
        model("triton")(ids)
    with caplog.at_level("WARNING", logger="ttt"):
        for _ in range(2):
            model("auto")(ids)
    assert kernels.calls == []
    said = [r for r in caplog.records if "the Triton kernels cannot run" in r.getMessage()]
    assert len(said) == (1 if DEVICE == "cuda" else 0)


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_torch_compile_takes_the_triton_scans_as_operators(kernels, inner):
    model = small_model(ttt_layer_type=inner)
    ids = torch.randint(0, 97, (2, 16 * 3 + 5), device=DEVICE)
    eager_logits, eager_grads = logits_and_gradients(model, ids)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    logits, grads = logits_and_gradients(compiled, ids)
    assert kernels.calls == [inner] * 4  # a scan per layer, eager then compiled
    assert_close("compiled logits", logits, eager_logits, atol=1e-5)
    assert_gradients_close({n.removeprefix("_orig_mod."): g for n, g in grads.items()}, eager_grads, rtol=1e-5,
                           atol=1e-7)


def kernel_resources(*args, interpret=False):
    """bench/kernel_resources.py run with args: (exit code, {kernel name: [its rows' cells]}, stderr)."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env.update({"TRITON_INTERPRET": "1"} if interpret else {})
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, str(root / "bench" / "kernel_resources.py"), *args], capture_output=True,
                          text=True, env=env)
    rows = {}
    for line in done.stdout.splitlines():
        if line.startswith("| _"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows.setdefault(cells[0], []).append(cells[1:])
    return done.returncode, rows, done.stderr


def test_the_mlp_dispatch_assumes_the_shared_memory_its_kernels_compile_to():
    import triton

    if triton.__version__ != "3.9.0":  # what .ci/run installs; other versions may compile to other sizes
        pytest.skip(f"ttt_kernels.MLP_SHARED_MEMORY was measured with Triton 3.9.0, this is {triton.__version__}")
    code, rows, stderr = kernel_resources("--head_dim", "16", "64")
    assert code == 0, stderr
    assert set(rows) == {"_scan_forward", "_scan_backward_carry", "_scan_backward_inputs", "_mlp_scan_forward",
                         "_mlp_walk_back"}
    for f, index in ((16, 0), (64, 1)):  # rows per kernel: f=16, then f=64
        needs = [int(rows[name][index][-1].replace(",", "")) for name in ("_mlp_scan_forward", "_mlp_walk_back")]
        assert ttt_scan.ttt_kernels.MLP_SHARED_MEMORY[f] == max(needs)


def test_kernel_resources_refuses_to_run_under_the_interpreter():
    code, rows, stderr = kernel_resources(interpret=True)
    assert code == 2 and not rows and "TRITON_INTERPRET" in stderr.splitlines()[-1]
