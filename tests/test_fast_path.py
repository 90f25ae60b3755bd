"""The MoE dispatch paths (loramix/nn/dispatch/) against the per-expert reference and a per-pair formula; the benchmark.

The model-level parity tests run on ``LORAMIX_TEST_DEVICE`` (default ``cpu``; CI's): on a GPU machine,
``LORAMIX_TEST_DEVICE=cuda pytest tests/test_fast_path.py`` checks the same parity there."""

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import loramix
from loramix import MixLoraConfig
from loramix.tools.bench import peak_step_bytes
from loramix.cli import main
from loramix.errors import LoramixError
from loramix.nn.dispatch.auto import AUTO_TABLE, auto_path, lora_widths
from loramix.nn.dispatch.grouped import PairMix, PairMixSpec, sort_pairs
from loramix.nn.dispatch.grouped_mm import offset_pairs

from conftest import randomize_adapter, run_dispatch, tiny_model
from conftest import batch as cpu_batch

DEVICE = torch.device(os.environ.get("LORAMIX_TEST_DEVICE", "cpu"))


def mixlora(model_type="llama", *, seed=0, dtype=torch.float32, base=None, **cfg):
    """A tiny ``model_type`` (``base``: config overrides) with a randomised MixLoRA adapter (``cfg``), on DEVICE."""
    defaults = dict(r=4, lora_alpha=8, lora_dropout=0.0, num_experts=4, top_k=2)
    model = loramix.get_mixlora_model(tiny_model(model_type, seed=seed, dtype=dtype, **(base or {})),
                                      MixLoraConfig(**{**defaults, **cfg}))
    randomize_adapter(model, seed=seed)
    return model.to(DEVICE)


def batch(**kwargs):
    """conftest's padded batch, on DEVICE."""
    return tuple(t.to(DEVICE) for t in cpu_batch(**kwargs))


FAST = pytest.mark.parametrize("fast", ["grouped", "grouped_mm", "dense", "auto"])


def close(*, rtol, atol):
    """Elementwise comparison (fp32)."""
    def check(got, want, what):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=what)
    return check


def close_on_average(rel):
    """bf16 comparison: the mean absolute difference at most ``rel`` times the mean magnitude. Two bf16 paths
    round in different places and can flip a routing tie, which moves single elements far: a max bound
    would say nothing."""
    def check(got, want, what):
        error, scale = (got.float() - want.float()).abs().mean(), want.float().abs().mean()
        assert error <= rel * scale, f"{what}: mean error {error:.3g} > {rel} x mean magnitude {scale:.3g}"
    return check


def assert_parity(model, fast, *, values, grads, router_grads=None, rows=3, pad_rows=2):
    """The ``fast`` and reference dispatch agree in logits, loss, aux loss (``values``) and every adapter
    gradient (``grads``; the routers' by ``router_grads`` if given) on a padded batch; each comparison is a
    :func:`close` or :func:`close_on_average`."""
    ids, mask = batch(rows=rows, pad_rows=pad_rows)
    labels = ids.masked_fill(mask == 0, -100)
    fast, fast_grads = run_dispatch(model, fast, input_ids=ids, attention_mask=mask, labels=labels)
    ref, ref_grads = run_dispatch(model, "per_expert", input_ids=ids, attention_mask=mask, labels=labels)
    for what in ("logits", "aux_loss", "loss"):
        values(getattr(fast, what), getattr(ref, what), what)
    assert set(fast_grads) == set(ref_grads) and ref_grads
    for name in ref_grads:
        single_expert_router = "router" in name and model.mixlora_config.num_experts == 1  # softmax of one logit
        assert single_expert_router or ref_grads[name].abs().max() > 0, name  # every adapter tensor is exercised
        (router_grads if router_grads and "router" in name else grads)(fast_grads[name], ref_grads[name], name)


FP32 = dict(values=close(rtol=1e-5, atol=1e-5), grads=close(rtol=1e-4, atol=1e-6))
# A router's weight gradient is a difference of near-equal terms: in bf16 it differs between paths by 10-15%
# on average (dense and grouped_mm against per_expert), the other gradients by at most 5%, the logits by 1%.
BF16 = dict(values=close_on_average(2e-2), grads=close_on_average(8e-2), router_grads=close_on_average(2.5e-1))


@pytest.mark.parametrize("model_type, targets", [
    ("llama", None),
    ("llama", ["q_proj", "up_proj"]),                 # gated, one input projection adapted, no output LoRA
    ("llama", ["v_proj", "gate_proj", "down_proj"]),
    ("llama", ["down_proj"]),                         # output LoRA only
    ("phi", ["fc1"]),                                 # plain FFN with biases
    ("phi", None),
    ("phi3", ["gate_up_proj"]),                       # fused gate/up
    ("phi3", None),
    ("gpt2", None),                                   # Conv1D projections
])
@FAST
def test_fp32_parity_for_every_ffn_kind_and_target_subset(model_type, targets, fast):
    model = mixlora(model_type, target_modules=targets, num_experts=6, top_k=2)
    assert_parity(model, fast, **FP32)


@pytest.mark.parametrize("experts, top_k", [(1, 1), (8, 2), (8, 1), (3, 3), (16, 4)])
@FAST
def test_fp32_parity_for_expert_counts_and_top_k(experts, top_k, fast):
    # 16 experts on 27 tokens leaves some experts empty; k == E routes every token to every expert.
    model = mixlora("llama", num_experts=experts, top_k=top_k, seed=experts)
    assert_parity(model, fast, **FP32)


@FAST
def test_fp32_parity_when_no_width_or_rank_keeps_the_grouped_gemm_alignment(fast):
    # The kernel wants rows of a multiple of 4 fp32 elements: hidden 34, FFN 50 and rank 3 are none, so
    # grouped_mm copies its operands into padded rows.
    model = mixlora("llama", r=3, num_experts=5, top_k=2,
                    base=dict(hidden_size=34, intermediate_size=50, num_attention_heads=1, num_key_value_heads=1))
    assert_parity(model, fast, **FP32)


@pytest.mark.parametrize("model_type", ["llama", "phi3", "gpt2"])
@FAST
def test_bf16_parity(model_type, fast):
    model = mixlora(model_type, dtype=torch.bfloat16, num_experts=4, top_k=2)
    assert next(model.base_model.parameters()).dtype == torch.bfloat16
    # The paths round to bf16 in different places (grouped_mm also runs its expert LoRAs in bf16, with a
    # rank of 4 padded to the kernel's 8): agreement is to bf16 precision.
    assert_parity(model, fast, **BF16)


@FAST
def test_bf16_autocast_parity(fast):
    # Under autocast the base projections compute in bf16 (the router stays fp32); the fast path picks its dtypes itself.
    model = mixlora("llama", num_experts=4, top_k=2)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        assert_parity(model, fast, **BF16)


def test_dispatch_defaults_to_auto_and_names_are_checked():
    model = mixlora("llama")
    assert loramix.DISPATCHES == ("grouped", "grouped_mm", "dense", "per_expert")  # the concrete paths
    assert {layer.dispatch for layer in model.moe_layers()} == {"auto"}
    model.set_dispatch("grouped_mm")
    assert {layer.dispatch for layer in model.moe_layers()} == {"grouped_mm"}
    with pytest.raises(LoramixError, match="dispatch must be one of 'auto', 'grouped', 'grouped_mm', 'dense', "
                                           "'per_expert', got 'sorted'"):
        model.set_dispatch("sorted")


def test_auto_picks_the_path_of_its_table_for_the_device_dtype_and_widths():
    aligned = lora_widths(mixlora("llama").moe_layers()[0].view())  # {32, 48}: rows of 16-byte multiples
    unaligned = lora_widths(mixlora("llama", base=dict(hidden_size=36, num_attention_heads=2,
                                                       num_key_value_heads=2)).moe_layers()[0].view())
    assert aligned == {32, 48} and unaligned == {36, 48}                # hidden 36: 72-byte bf16 rows
    bf16, fp32 = torch.bfloat16, torch.float32
    assert auto_path(aligned, "cpu", fp32) == auto_path(aligned, "cpu", bf16) == "grouped"
    assert auto_path(aligned, "cuda", bf16, 9) == auto_path(aligned, "cuda", bf16, 10) == "grouped_mm"
    assert auto_path(aligned, "cuda", bf16, 8) == "dense"         # no CUTLASS grouped GEMM before sm90
    assert auto_path(unaligned, "cuda", bf16, 9) == "dense"
    assert auto_path(unaligned, "cuda", fp32, 9) == "dense"       # the fp32 kernel would read offsets on the host
    assert auto_path(aligned, "cuda", torch.float16, 9) == "dense"
    assert auto_path(aligned, "mps", bf16) == "dense"
    assert {rule.path for rule in AUTO_TABLE} <= set(loramix.DISPATCHES) and all(r.evidence for r in AUTO_TABLE)


@FAST
def test_single_token_decode_steps_and_generate_match_the_reference(fast):
    model = mixlora("llama", num_experts=8, top_k=2).eval()
    ids, mask = batch(rows=2, pad_rows=1)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                  output_logits=True, return_dict_in_generate=True)
    model.set_dispatch(fast)
    got = model.generate(**kwargs)  # each decode step routes T = 2 tokens: most experts get none
    model.set_dispatch("per_expert")
    ref = model.generate(**kwargs)
    assert torch.equal(got.sequences, ref.sequences)
    for fast_step, ref_step in zip(got.logits, ref.logits):
        torch.testing.assert_close(fast_step, ref_step, rtol=1e-5, atol=1e-5)


@FAST
def test_gradient_checkpointing_with_active_dropout_gives_the_same_gradients(fast):
    # Dropout masks are drawn inside the fast path's forward; the checkpointed recomputation must draw
    # the same ones (the RNG state is restored), or the gradients would differ.
    model = mixlora("llama", lora_dropout=0.3).train()
    ids, mask = batch()
    torch.manual_seed(123)
    out, grads = run_dispatch(model, fast, input_ids=ids, attention_mask=mask, labels=ids)
    model.gradient_checkpointing_enable()
    torch.manual_seed(123)
    out_ckpt, grads_ckpt = run_dispatch(model, fast, input_ids=ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(out_ckpt.loss, out.loss)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], msg=name)


def test_dropout_is_active_in_training_only():
    model = mixlora("llama", lora_dropout=0.5, target_modules=["down_proj"])
    ids, mask = batch()
    model.train()
    assert not torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)
    model.eval()
    with torch.no_grad():
        fast = model(input_ids=ids, attention_mask=mask).logits
        model.set_dispatch("per_expert")
        torch.testing.assert_close(fast, model(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)


# ---- PairMix on its own, against a per-pair formula and finite differences -------------------------------

def _pair_problem(kind: str, *, dropout: bool, seed: int = 0, sort=sort_pairs):
    """A small PairMix problem: (spec, weight, keep, tensors, formula) with float64 leaves; ``sort(experts, E)``
    makes the pairs (and so picks the matmul primitive)."""
    g = torch.Generator().manual_seed(seed)
    T, D, I, E, k, r = 7, 5, 6, 4, 2, 3
    experts = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    weight = torch.rand(T, k, generator=g, dtype=torch.float64)
    out_width = {"gated": I, "fused": 2 * I, "plain": I}[kind]
    n_inputs = 2 if kind == "gated" else 1
    act_fn = F.silu if kind != "plain" else F.gelu

    def activate(h):
        if kind == "gated":
            return act_fn(h[0]) * h[1]
        if kind == "fused":
            gate, up = h[0].chunk(2, dim=-1)
            return up * act_fn(gate)
        return act_fn(h[0])

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    inputs = [(rand(T, out_width), rand(T, D), rand(E, r, D), rand(E, out_width, r)) for _ in range(n_inputs)]
    out_A, out_B = rand(E, r, I), rand(E, D, r)
    keep = None
    if dropout:
        keep = (torch.rand(T, I, generator=g) > 0.4).to(torch.float64) / (1 - 0.4)
    scalings = (0.5,) * n_inputs
    routing = sort(experts, E)
    pair_weight = weight.reshape(-1)[routing.order].requires_grad_()
    tensors = [t for projection in inputs for t in projection] + [out_A, out_B]

    def formula(pair_weight, *tensors):
        """Per (token, slot) straight from the definition, with the same dropout mask."""
        w = torch.zeros(T * k, dtype=torch.float64).index_copy(0, routing.order, pair_weight).view(T, k)
        mixed, delta = torch.zeros(T, I, dtype=torch.float64), torch.zeros(T, D, dtype=torch.float64)
        ins = [tensors[4 * j:4 * j + 4] for j in range(n_inputs)]
        A2, B2 = tensors[-2:]
        for t in range(T):
            for slot in range(k):
                e = experts[t, slot]
                h = [H[t] + 0.5 * B[e] @ (A[e] @ X[t]) for H, X, A, B in ins]
                a = activate([v.unsqueeze(0) for v in h])[0]
                dropped = a if keep is None else a * keep[t]
                mixed[t] += w[t, slot] * a
                delta[t] += w[t, slot] * 2.0 * B2[e] @ (A2[e] @ dropped)
        return mixed, delta

    spec = PairMixSpec(routing=routing, activate=activate, input_scalings=scalings, output_scaling=2.0)
    return spec, pair_weight, keep, tensors, formula


# The grouped path's segments compute in the operands' dtype (float64 here); grouped_mm's kernel has no
# float64, so its offsets run the expert LoRAs in fp32 inside the float64 problem (unaligned widths: padded).
SORTS = pytest.mark.parametrize("sort, tol", [
    (sort_pairs, dict(rtol=1e-10, atol=1e-12)),
    (lambda experts, E: offset_pairs(experts, E, torch.float32), dict(rtol=1e-5, atol=1e-5)),
], ids=["segments", "offsets"])


@pytest.mark.parametrize("kind", ["gated", "fused", "plain"])
@pytest.mark.parametrize("dropout", [False, True])
@SORTS
def test_pair_mix_equals_the_per_pair_formula_and_its_gradients(kind, dropout, sort, tol):
    spec, weight, keep, tensors, formula = _pair_problem(kind, dropout=dropout, sort=sort)
    mixed, delta = PairMix.apply(spec, weight, keep, *tensors)
    want_mixed, want_delta = formula(weight, *tensors)
    torch.testing.assert_close(mixed, want_mixed, **tol)
    torch.testing.assert_close(delta.double(), want_delta, **tol)  # delta: in the matmuls' dtype

    probe = torch.randn(mixed.shape, dtype=torch.float64), torch.randn(delta.shape, dtype=torch.float64)
    leaves = [weight, *tensors]
    got = torch.autograd.grad((mixed * probe[0]).sum() + (delta * probe[1]).sum(), leaves)
    want_m, want_d = formula(weight, *tensors)
    want = torch.autograd.grad((want_m * probe[0]).sum() + (want_d * probe[1]).sum(), leaves)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **tol, msg=f"gradient of argument {i}")


def test_pair_mix_passes_gradcheck():
    spec, weight, keep, tensors, _ = _pair_problem("gated", dropout=True, seed=1)
    assert torch.autograd.gradcheck(lambda w, *t: PairMix.apply(spec, w, keep, *t), (weight, *tensors))


# ---- grouped_mm's primitive: grouped GEMMs over device-side offsets ----------------------------------------

@pytest.mark.parametrize("counts", [(3, 0, 5, 2), (0, 4, 4, 0), (6, 0, 0, 0), (0, 0, 0, 0)])
@pytest.mark.parametrize("n, m", [(8, 16), (5, 3)])           # rows of 16-byte multiples, and not
@pytest.mark.parametrize("dtype, tol", [(torch.float32, dict(rtol=1e-5, atol=1e-5)),
                                        (torch.bfloat16, dict(rtol=2e-2, atol=5e-2))])
def test_offset_matmuls_equal_per_expert_matmuls_and_their_autograd(counts, n, m, dtype, tol):
    g = torch.Generator().manual_seed(sum(counts) + n)
    experts = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))
    pairs = offset_pairs(experts[torch.randperm(len(experts), generator=g)].view(-1, 1), 4, dtype)
    x = torch.randn(len(experts), n, generator=g, requires_grad=True)          # rows in sorted pair order
    weight = torch.randn(4, m, n, generator=g, requires_grad=True)
    ends = torch.tensor(counts).cumsum(0).tolist()
    want = torch.cat([x.new_zeros(0, m)] + [x[end - c:end] @ weight[e].t() for e, (c, end) in
                                           enumerate(zip(counts, ends))])      # [P, m], fp32 autograd
    got = pairs.matmul(x, weight)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, **tol)
    base = torch.randn(len(experts), m, generator=g)
    torch.testing.assert_close(pairs.matmul(x, weight, accumulate=base.to(dtype, copy=True), alpha=0.5).float(),
                               base + 0.5 * want, **tol)
    grad = torch.randn(len(experts), m, generator=g)
    want_x, want_w = torch.autograd.grad(want, (x, weight), grad, allow_unused=True, materialize_grads=True)
    got_x, got_w = pairs.matmul_backward(grad, x, weight)
    torch.testing.assert_close(got_x.float(), want_x, **tol)
    torch.testing.assert_close(got_w.float(), want_w, **tol)                  # zero for the empty experts
    assert pairs.matmul_backward(grad, None, weight, need_weight=False)[1] is None


class HostReads(TorchDispatchMode):
    """Lists the ops that, on a GPU, make the host wait for the device: reading a value (``.item()``,
    ``.tolist()``, a tensor's truth) or an op whose output size depends on the data."""

    SYNCING = {"_local_scalar_dense", "nonzero", "bincount", "masked_select", "_unique2", "unique_consecutive",
               "unique_dim", "histc"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.SYNCING or (name == "repeat_interleave" and isinstance(args[0], torch.Tensor)
                                    and args[0].dtype in (torch.int32, torch.int64)):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dispatch, syncs", [("grouped_mm", False), ("grouped", True)])
def test_grouped_mm_dispatch_reads_nothing_on_the_host_in_forward_and_backward(dispatch, syncs):
    # The router stays outside: on CPU, F.one_hot reads its input's range (on CUDA PyTorch skips that).
    model = mixlora("llama", lora_dropout=0.1, num_experts=8).train()
    model.set_dispatch(dispatch)
    layer = model.moe_layers()[0]
    x = torch.randn(18, 32, requires_grad=True)
    record = layer.router(x, batch_shape=(2, 9))
    with HostReads() as reads:
        layer.mix(x, record.weights, record.experts).square().sum().backward()
    assert bool(reads.calls) == syncs, reads.calls  # the grouped path reads its segment sizes: the check sees it


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA's sync debug mode: LORAMIX_TEST_DEVICE=cuda")
def test_grouped_mm_moe_layer_never_syncs_on_cuda():
    model = mixlora("llama", dtype=torch.bfloat16, r=8, lora_dropout=0.1, num_experts=8,
                    base=dict(hidden_size=64, intermediate_size=128)).train()
    model.set_dispatch("grouped_mm")
    layer = model.moe_layers()[0]
    x = torch.randn(2, 9, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().square().sum().backward()  # the first call may initialise lazily
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x).float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---- the benchmark ---------------------------------------------------------------------------------------

def test_peak_step_bytes_counts_the_live_peak_of_a_step():
    def step(_model, _batch):
        a = torch.ones(1 << 18)          # 1 MiB
        b = torch.ones(1 << 19)          # 2 MiB, 3 MiB live
        del a, b
        c = torch.ones(1 << 18)          # 1 MiB live again
        return c.sum()

    peak = peak_step_bytes(None, step, {}, device="cpu")
    assert 3 << 20 <= peak < (3 << 20) + (64 << 10)


TINY_BENCH = ["--hidden", "32", "--ffn", "48", "--layers", "2", "--vocab", "64", "--heads", "4", "--batch", "2",
              "--seq", "8", "--decode-batch", "2", "--decode-prompt", "4", "--new-tokens", "3", "--experts", "4",
              "--rank", "4", "--reps", "1", "--decode-reps", "1", "--warmup", "0", "--threads", "0"]


def test_bench_command_prints_medians_memory_and_ratios_between_all_variants(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", *TINY_BENCH, "--output", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == result
    assert result["shape"]["hidden"] == 32 and result["shape"]["rank"] == 4 and result["auto"] == "grouped"
    variants = {"peft-lora", *(f"mixlora-{name}" for name in ("auto", *loramix.DISPATCHES))}
    assert set(result["results"]) == variants
    for res in result["results"].values():
        assert res["train_step_s"] > 0 and res["prefill_s"] > 0 and res["peak_step_extra_mb"] > 0
        assert res["decode_tokens_per_s"] > 0
        assert set(res["ratio_to"]) == variants
        assert set(res["ratio_to"]["peft-lora"]) == {"train_step", "prefill", "decode_tokens_per_s",
                                                     "peak_step_extra", "peak_step_total"}
    grouped = result["results"]["mixlora-grouped"]
    assert grouped["ratio_to"]["peft-lora"]["train_step"] == pytest.approx(
        grouped["train_step_s"] / result["results"]["peft-lora"]["train_step_s"])
    assert result["results"]["peft-lora"]["ratio_to"]["peft-lora"]["train_step"] == 1.0


@pytest.mark.parametrize("argv, shape, auto", [
    (["--preset", "llama2-7b"], dict(hidden=4096, ffn=11008, heads=32, kv_heads=32, vocab=32000, layers=4), "grouped"),
    (["--preset", "llama3-8b", "--layers", "2", "--dtype", "bf16"],
     dict(hidden=4096, ffn=14336, heads=32, kv_heads=8, vocab=128256, layers=2), "grouped"),
    (["--preset", "qwen2.5-7b", "--batch", "8", "--seq", "1024"],
     dict(model_type="qwen2", hidden=3584, ffn=18944, heads=28, kv_heads=4, vocab=152064, batch=8, seq=1024), "grouped"),
])
def test_bench_presets_take_the_real_layer_shapes_and_flags_override_them(argv, shape, auto, capsys):
    assert main(["bench", *argv, "--dry-run"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {key: result["shape"][key] for key in shape} == shape and result["auto"] == auto


def test_a_preset_shape_runs_end_to_end_with_tiny_overrides(capsys):
    # The preset's plumbing (qwen2 family, grouped KV heads) on a CPU-sized model: a 7B width takes minutes.
    assert main(["bench", "--preset", "qwen2.5-7b", *TINY_BENCH, "--kv-heads", "2", "--variants",
                 "peft-lora,mixlora-grouped_mm"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["preset"] == "qwen2.5-7b" and result["shape"]["model_type"] == "qwen2"
    assert result["results"]["mixlora-grouped_mm"]["ratio_to"]["peft-lora"]["decode_tokens_per_s"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--variants", "mixlora-grouped,lora"], "--variants: unknown variant 'lora'"),
    (["--hidden", "30", "--heads", "4"], "--hidden (30) must be a multiple of --heads (4)"),
    (["--preset", "llama3-8b", "--kv-heads", "5"], "--kv-heads (5) must divide --heads (32)"),
    (["--top-k", "9"], "--top-k (9) must be at most --experts (8)"),
    (["--reps", "0"], "--reps must be >= 1"),
    (["--new-tokens", "-1"], "--new-tokens must be >= 0"),
])
def test_bench_command_rejects_bad_arguments_in_one_line(argv, message, capsys):
    assert main(["bench", *argv, "--dry-run"]) == 2
    assert f"loramix: error: {message}" in capsys.readouterr().err
