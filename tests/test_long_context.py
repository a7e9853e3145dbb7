"""Long context at linear cost: blockwise sliding-window attention equal to the dense computation, losses and
evaluation without whole-sequence logits, the chunk-boundary state in the compute dtype and of its own size,
prefill reading each chunk once, and memory that grows linearly with the length."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import ttt
import ttt_e2e
from helpers import assert_close, noisy
from ttt import TTTConfig, TTTForCausalLM
from ttt_e2e import E2EConfig, E2EForCausalLM
from ttt_lm import evaluate
from ttt_train.memory import PeakMemory


def dense_reference(q, k, v, window):
    """The whole [Tq, Tk] mask and score matrix (what the model computed before blockwise attention)."""
    offset = k.shape[2] - q.shape[2]
    mask = ttt_e2e.window_mask(torch.arange(offset, k.shape[2]), torch.arange(k.shape[2]), window)
    return ttt_e2e.dense_attention(q, k, v, mask, fused=False)


# (queries, past keys, window, block): several blocks; windows that divide T and that do not; T shorter than the
# window; a past (decoding, a continued prefill); full causal attention; blocks smaller than the window
SHAPES = [(64, 0, 16, None), (50, 0, 12, None), (10, 0, 32, None), (9, 20, 16, None), (40, 0, None, None),
          (33, 7, None, 8), (48, 0, 16, 5), (1, 31, 16, None)]


@pytest.mark.parametrize("length,past,window,block", SHAPES)
@pytest.mark.parametrize("fused", [True, False])
def test_blockwise_attention_equals_dense_forward_and_gradient(length, past, window, block, fused):
    generator = torch.Generator().manual_seed(length + past)
    q = torch.randn(2, 3, length, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    k, v = (torch.randn(2, 3, length + past, 8, dtype=torch.float64, generator=generator, requires_grad=True)
            for _ in range(2))
    weights = torch.randn(2, 3, length, 8, dtype=torch.float64, generator=generator)
    out = ttt_e2e.sliding_window_attention(q, k, v, window, fused=fused, block_size=block)
    expected = dense_reference(q, k, v, window)
    assert_close("attention output", out, expected, atol=1e-13)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    for name, grad, reference in zip("qkv", grads, expected_grads, strict=True):
        assert reference.abs().max() > 0, name
        assert_close(f"d/d{name}", grad, reference, atol=1e-12)


@pytest.mark.parametrize("length,past,window,block", SHAPES[:4] + SHAPES[6:])
def test_blockwise_attention_second_order_equals_dense(length, past, window, block):
    """The explicit form differentiates twice (the inner loop's meta-gradient): the gradient of a function of the
    first gradient equals the dense computation's."""
    generator = torch.Generator().manual_seed(7 + length)
    q = torch.randn(1, 2, length, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    k, v = (torch.randn(1, 2, length + past, 8, dtype=torch.float64, generator=generator, requires_grad=True)
            for _ in range(2))
    weights = torch.randn(1, 2, length, 8, dtype=torch.float64, generator=generator)

    def second_order(attention):
        first = torch.autograd.grad((attention(q, k, v) * weights).sum(), (q, k, v), create_graph=True)
        return torch.autograd.grad(sum(g.pow(2).sum() for g in first), (q, k, v))

    actual = second_order(lambda *a: ttt_e2e.sliding_window_attention(*a, window, fused=False, block_size=block))
    expected = second_order(lambda *a: dense_reference(*a, window))
    for name, grad, reference in zip("qkv", actual, expected, strict=True):
        assert reference.abs().max() > 0, name
        assert_close(f"second order d/d{name}", grad, reference, atol=1e-11)


def e2e(variant="e2e", dtype=torch.float64, seed=0, **overrides):
    """A small E2E model with random, non-degenerate weights; windows and chunks small enough for several blocks."""
    torch.manual_seed(seed)
    sizes = dict(vocab_size=97, hidden_size=32, num_attention_heads=2, intermediate_size=48, num_hidden_layers=4,
                 bos_token_id=1, eos_token_id=2, rope_theta=10000.0)
    if variant != "fa":
        sizes |= dict(sliding_window=16, mini_batch_size=8)
    return noisy(E2EForCausalLM(E2EConfig.from_size("tiny", variant, **(sizes | overrides))), dtype)


def ids_of(batch, length, vocab=97, seed=3):
    ids = torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    if length > 9:
        ids[0, 9] = 1  # a BOS target: masked in the E2E loss
    return ids


@pytest.mark.parametrize("variant", ["e2e", "pretrain", "fa"])
def test_e2e_loss_without_logits_equals_the_reference_from_whole_sequence_logits(variant):
    """The loss from each chunk as it is read (no [B, T, V] logits returned) equals the official mean of chunk
    means from the whole sequence's logits, and so do its gradients; the logits come only when asked."""
    model = e2e(variant).train()
    ids = ids_of(2, 40)  # five chunks of 8
    out = model(ids, labels=ids)
    assert out.logits is None, "with labels, the logits are returned only when asked"
    grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
    full = model(ids, return_logits=True, labels=ids)
    chunks = ttt_e2e.chunk_losses(full.logits, ttt.next_token_targets(ids), model.config.mini_batch_size, 1)
    reference = chunks.mean()
    assert_close("loss", out.loss, reference, atol=1e-12)
    assert_close("loss with logits asked for", full.loss, reference, atol=1e-12)
    expected = torch.autograd.grad(reference, list(model.parameters()), allow_unused=True)
    names = [name for name, _ in model.named_parameters()]
    for name, grad, reference_grad in zip(names, grads, expected, strict=True):
        if reference_grad is not None:
            assert_close(f"gradient of {name}", grad, reference_grad, atol=1e-11)


def test_a_chunk_without_targets_is_not_averaged_in():
    """T + 1 tokens (the official layout: T inputs and the last target): the last chunk holds only the final
    token, which predicts nothing; the loss is the mean of the T / b chunks that have targets."""
    model = e2e().eval()
    ids = ids_of(2, 33)
    with torch.no_grad():
        out = model(ids, labels=ids, return_logits=True)
        chunks = ttt_e2e.chunk_losses(out.logits, ttt.next_token_targets(ids), 8, 1)
    assert chunks.shape[1] == 5 and bool((chunks[:, 4] == 0).all())
    assert_close("loss over the chunks with targets", out.loss, chunks[:, :4].mean(), atol=1e-12)


def test_labels_may_only_mask_the_inputs_in_meta_mode():
    model = e2e()
    ids = ids_of(1, 16)
    masked = ids.clone()
    masked[0, :4] = -100
    model(ids, labels=masked)
    other = ids.clone()
    other[0, 5] = 7 if ids[0, 5] != 7 else 8
    with pytest.raises(ValueError, match="labels must equal input_ids"):
        model(ids, labels=other)


def test_ttt_loss_without_logits_equals_transformers_loss():
    torch.manual_seed(0)
    model = TTTForCausalLM(TTTConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, mini_batch_size=4, max_position_embeddings=64))
    model = model.double()
    ids = ids_of(2, 20)
    labels = ids.clone()
    labels[1, :6] = -100
    out = model(ids, labels=labels)
    assert out.logits is None
    logits = model(ids).logits.double()
    reference = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100)
    assert_close("loss", out.loss, reference, atol=1e-12)
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    expected = torch.autograd.grad(reference, list(model.parameters()))
    for (name, _), grad, reference_grad in zip(model.named_parameters(), grads, expected, strict=True):
        assert_close(f"gradient of {name}", grad, reference_grad, atol=1e-11)
    assert model(ids, labels=labels, logits_to_keep=1).logits.shape == (2, 1, 97)


def test_chunk_boundary_windows_are_in_the_compute_dtype_and_own_their_rows():
    """The suffix key/value windows handed from chunk to chunk: W rows in a storage of their own (not a view of
    a W + b buffer) and in the keys' dtype (bf16 under autocast, as the trainer runs; not promoted to float32 by
    the float32 zero-initialised window)."""
    model = e2e(dtype=torch.float32)
    config = model.config
    h = torch.randn(1, 8, config.hidden_size)
    state = model.inner_loop.initial_state(1, h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for start in (0, 8, 16):
            step = model.inner_loop.chunk_step(start, True, 1.0, False, False, h, ids_of(1, 8, seed=start), state)
            state = step.state
    windows = [t for window in state.windows for t in window]
    assert len(windows) == 2 * config.suffix_len
    for window in windows:
        assert window.dtype == torch.bfloat16
        assert window.shape[1] == config.sliding_window
        assert window.untyped_storage().nbytes() == window.numel() * window.element_size()


@pytest.mark.parametrize("length", [33, 32, 5])
def test_prefill_runs_each_chunk_once_and_keeps_only_the_last_logits(length):
    """A prompt read through the cache: the suffix blocks run once per chunk (chunk step and logits together),
    the logits equal the full forward's, and logits_to_keep=1 (what generate() asks) gives the last only."""
    model = e2e().eval()
    ids = ids_of(2, length)
    suffix = model.suffix_blocks[0]
    calls = []
    # every run of the block ends with its MLP (the chunk step and the cache call after_attention, not forward)
    hook = suffix.mlp.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            cached = model(ids, use_cache=True)
    finally:
        hook.remove()
    chunks = -(-length // 8)
    assert len(calls) == chunks, f"suffix block ran {len(calls)} times for {chunks} chunks"
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, use_cache=True, logits_to_keep=1).logits
    assert_close("prefill logits", cached.logits, full, atol=1e-12)
    assert_close("last logits", last, full[:, -1:], atol=1e-12)
    with torch.no_grad():  # decoding on from the prefilled cache still matches the full forward
        cache = model(ids[:, :-1], use_cache=True).cache if hasattr(cached, "cache") else \
            model(ids[:, :-1], use_cache=True).past_key_values
        step = model(ids[:, -1:], use_cache=True, cache=cache).logits
    assert_close("next token after a prefill", step, full[:, -1:], atol=1e-12)


def test_a_training_chunk_runs_once_in_the_forward_and_once_in_the_backward():
    """The chunk's recomputation happens in the backward only: a checkpoint that the inner gradient unpacks
    during the forward would run each updated chunk twice there and keep that copy's activations."""
    model = e2e().train()
    ids = ids_of(2, 64)  # 8 chunks
    calls = []
    hook = model.suffix_blocks[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))  # once per block run
    loss = model(ids, labels=ids).loss
    forward, calls[:] = len(calls), []
    loss.backward()
    hook.remove()
    assert (forward, len(calls)) == (8, 8), f"suffix block ran {forward} times in the forward, {len(calls)} in the " \
                                            f"backward, for 8 chunks"


def test_prefix_is_recomputed_in_meta_training_unless_turned_off():
    ids = ids_of(1, 24)
    gradients = {}
    for recompute, expected in ((True, 2), (False, 1)):
        model = e2e(recompute_prefix=recompute).train()
        calls = []
        # a pre-hook: a recomputation stops as soon as it has what the backward needs, before forward hooks
        hook = model.model.layers[0].register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        model(ids, labels=ids).loss.backward()
        hook.remove()
        assert len(calls) == expected, f"recompute_prefix={recompute}: prefix block ran {len(calls)} times"
        gradients[recompute] = {name: p.grad for name, p in model.named_parameters()}
    for name, grad in gradients[False].items():
        assert_close(f"gradient of {name} with the prefix recomputed", gradients[True][name], grad, atol=1e-12)


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=64)).double().eval()


@pytest.mark.parametrize("make", [lambda: e2e().eval(), lambda: e2e("pretrain").eval(), lambda: e2e("fa").eval(),
                                  lambda: TTTForCausalLM(TTTConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                                                   num_hidden_layers=2, num_attention_heads=2,
                                                                   mini_batch_size=4)).double().eval(),
                                  llama], ids=["e2e", "pretrain", "fa", "ttt", "llama"])
def test_evaluation_by_position_needs_no_logits(make):
    model = make()
    ids = ids_of(2, 36, seed=5)
    with torch.no_grad():
        losses = evaluate.next_token_losses(model, ids)
        logits = model(ids).logits.double()
    expected = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    assert_close("next-token losses", losses[:, :-1], expected, atol=1e-10)
    assert bool((losses[:, -1] == 0).all())


def measure(model, length, train: bool) -> PeakMemory:
    ids = ids_of(1, length, seed=length)
    model.train(train)
    with PeakMemory() as memory:
        if train:
            model(ids, labels=ids).loss.backward()
        else:
            with torch.no_grad():
                model(ids, labels=ids)
    model.zero_grad(set_to_none=True)
    return memory


@pytest.mark.parametrize("variant", ["e2e", "pretrain"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_memory_grows_linearly_with_the_length(variant, train):
    """Peak bytes of tensors alive at once (counted operator by operator), at T = 32 W and 2T: at most 2.3x.
    A [T, T] mask or score matrix makes it grow faster (measured before blockwise attention: 3.7x evaluating,
    2.5x / 2.8x training; now 1.8x - 2.0x)."""
    model = e2e(variant, dtype=torch.float32)
    length = 32 * model.config.sliding_window
    small, large = measure(model, length, train), measure(model, 2 * length, train)
    assert large.peak_bytes <= 2.3 * small.peak_bytes, \
        f"{large.peak_bytes / small.peak_bytes:.2f}x the peak memory for 2x the length " \
        f"({small.peak_bytes} -> {large.peak_bytes} bytes)"
    # all bytes allocated: linear work allocates linearly (gradients of T / block slices, each added into a zero
    # tensor of the whole sequence, allocate quadratically and freed at once, leave the peak alone)
    assert large.total_bytes <= 2.3 * small.total_bytes, \
        f"{large.total_bytes / small.total_bytes:.2f}x the bytes allocated for 2x the length"


def test_the_long_context_bench_measures_every_family(tmp_path):
    """bench/long_context.py's measurement, in this process on tiny lengths: every family, every part, a table."""
    import argparse
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "long_context.py"
    spec = importlib.util.spec_from_file_location("long_context", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = []
    for family in bench.FAMILIES:
        for part in bench.PARTS:
            for length in (64, 128) if family == "e2e" else (64,):
                args = argparse.Namespace(run=family, size="tiny", length=length, part=part, batch_size=1, threads=0,
                                          vocab_size=300, decode_tokens=2)
                rows.append(bench.measure(args))
    for row in rows:
        assert row["peak_memory_mb"] > 0 and row["ms_per_token"] > 0, row
    table = bench.markdown(json.loads(json.dumps(rows)))
    assert all(f"| {family} | {part} |" in table for family in bench.FAMILIES for part in bench.PARTS)
    assert "| e2e | train |" in table and "per doubling" in table and "memory " in table
    bench.plot(rows, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_peak_memory_counts_allocations_not_views_and_frees():
    before = torch.randn(1000)  # made before the block: its views allocate nothing
    with PeakMemory() as memory:
        view = before[10:].detach()
        first = torch.ones(2000)  # 8000 bytes
        del first
        second = torch.ones(1000) + 1  # 4000 + 4000 bytes, the first freed
    assert memory.peak_bytes == 8000, memory.peak_bytes
    assert view.shape == (990,) and second.shape == (1000,)
