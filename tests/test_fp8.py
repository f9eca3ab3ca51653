"""FP8 in the GLM-5-FP8 format: block quantization, the fast vs reference linear, FP8 experts, checkpoints (ours, the
official layout, errors), the round trip through transformers, memory and quality."""

import argparse
import copy
import json
import platform
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import glm5
from glm5.config import tiny
from glm5.model.moe import Experts
from glm5.quant import (FP8, FP8Experts, FP8Linear, dequantize, fp8_state_dict, kernels, linear_fast,
                        linear_reference, quantize, quantize_checkpoint, quantize_model,
                        save_fp8_checkpoint, scale_shape, set_linear_impl, weight_bytes)
from glm5.quant.cli import add_parser
from glm5.quant.format import quantized_by_release, read_quant_config
from glm5.weights import CheckpointError, hf_tensors

from .conftest import perturb

ASSET_MODEL = Path(glm5.__file__).resolve().parent / "assets" / "model"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _per_position(ref, out):
    """KL(ref || out) and top-1 agreement at every position."""
    lr, lo = ref.float().log_softmax(-1), out.float().log_softmax(-1)
    return (lr.exp() * (lr - lo)).sum(-1), ref.argmax(-1) == out.argmax(-1)


def _metrics(ref, out):
    """mean KL(ref || out) per position, mean correlation of centred logits, top-1 agreement."""
    kl, agree = _per_position(ref, out)
    cr, co = ref - ref.mean(-1, keepdim=True), out - out.mean(-1, keepdim=True)
    corr = ((cr * co).sum(-1) / (cr.norm(dim=-1) * co.norm(dim=-1))).mean().item()
    return kl.mean().item(), corr, agree.float().mean().item()


def _bf16_rounded(model):
    """Dense weights rounded to BF16 (as a checkpoint stores what it does not quantize), kept in fp32."""
    return model.cast_(torch.bfloat16).cast_(torch.float32)


# -- the format --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(300, 200), (128, 128), (3, 130, 257), (1, 5)])
def test_quantize_error_within_e4m3_bound(shape):
    g = _gen(0)
    # magnitudes over 6 decades, so blocks contain subnormal e4m3 values too, and one all-zero block
    w = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * 2.5)
    if shape == (300, 200):
        w[128:256, 128:200] = 0.0
    q, s = quantize(w)
    assert q.dtype == FP8 and s.dtype == torch.float32 and tuple(s.shape) == scale_shape(shape)
    dq = dequantize(q, s)
    s_el = s.repeat_interleave(128, -2)[..., : shape[-2], :].repeat_interleave(128, -1)[..., : shape[-1]]
    # e4m3: 3 mantissa bits -> relative error <= 2^-4; below 2^-6 (subnormal) absolute error <= 2^-10, in units of s
    bound = torch.maximum(w.abs() * 2**-4, s_el * 2**-10) * (1 + 1e-6)
    err = (dq - w).abs()
    assert (err <= bound).all(), (err / bound).max()
    assert (err / bound).max() > 0.5  # the bound is met, not vacuous
    # each non-zero block's largest magnitude lands on 448 (the full e4m3 range is used); zero blocks stay zero
    qf = q.float().abs()
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in s.shape]).tolist():
        *lead, bo, bi = idx
        blk = qf[tuple(lead)][bo * 128:(bo + 1) * 128, bi * 128:(bi + 1) * 128]
        wb = w[tuple(lead)][bo * 128:(bo + 1) * 128, bi * 128:(bi + 1) * 128]
        assert blk.max().item() == (448.0 if wb.abs().max() > 0 else 0.0)


def test_scale_shapes_and_edge_blocks():
    assert scale_shape((1, 1)) == (1, 1)
    assert scale_shape((127, 129)) == (1, 2)
    assert scale_shape((128, 256)) == (1, 2)
    assert scale_shape((257, 129)) == (3, 2)
    assert scale_shape((4, 2048, 6144)) == (4, 16, 48)
    # an edge block's scale comes from its own (partial) block only
    w = torch.ones(257, 129)
    w[256, 128] = 1000.0  # alone in the last block row and column
    _, s = quantize(w)
    assert s.shape == (3, 2)
    f32 = torch.tensor(448.0)
    assert torch.equal(s, torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1000.0]]) / f32)
    with pytest.raises(ValueError, match=r"weight_scale_inv has shape \[2, 2\], expected \[3, 2\]"):
        dequantize(quantize(w)[0], torch.ones(2, 2))


# -- linear: fast == reference --------------------------------------------------------------------------------------
@pytest.mark.parametrize("act_quant", [False, True])
@pytest.mark.parametrize("O,I", [(300, 200), (256, 512), (129, 1)])
def test_fast_linear_equals_reference(O, I, act_quant):
    g = _gen(1)
    lin = torch.nn.Linear(I, O, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(O, I, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(O, generator=g))
    m = FP8Linear.from_linear(lin)
    m.act_quant = act_quant
    for N in (1, 5, 8, 9, 70):  # fused kernel up to 8 tokens, dequantize + GEMM above
        x = torch.randn(2, N, I, generator=g)
        m.impl = "reference"
        ref = m(x)
        m.impl = "fast"
        out = m(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6 * ref.abs().max().item())
    # a bf16 activation goes through the same paths and comes back bf16
    xb = torch.randn(3, I, generator=g).bfloat16()
    out_b = linear_fast(xb, m.weight, m.weight_scale_inv, act_quant=act_quant, bias=m.bias)
    ref_b = linear_reference(xb, m.weight, m.weight_scale_inv, act_quant=act_quant, bias=m.bias)
    assert out_b.dtype == torch.bfloat16
    torch.testing.assert_close(out_b.float(), ref_b.float(), rtol=1e-2, atol=1e-2 * ref_b.abs().max().item())


def test_cpu_kernel_builds_and_torch_fallback_is_exact(tmp_path):
    if shutil.which("cc") is None and shutil.which("gcc") is None and shutil.which("clang") is None:
        pytest.skip("no C compiler on this machine: the FP8 fast path runs the pure-PyTorch fallback")
    lib = kernels.build(tmp_path)  # a fresh cache directory: the first-use build on a new machine
    assert lib is not None and lib.fp8_vector_width() >= 1
    libs = [lib]
    if platform.machine() in ("x86_64", "AMD64"):  # the AVX2 (8-wide) and plain-C (1-wide) builds, as on other CPUs
        libs += [kernels.build(tmp_path, arch="haswell"), kernels.build(tmp_path, arch="x86-64")]
        assert [x.fp8_vector_width() for x in libs[1:]] == [8, 1]
    q, s = quantize(torch.randn(300, 200, generator=_gen(2)))
    ref = dequantize(q, s)
    out = torch.empty(300, 200)
    kernels.dequant_rows_into(out, q, s, 0, (128, 128), lib)
    assert torch.equal(out, ref)  # both convert e4m3 exactly, then one fp32 multiply: bit-identical
    assert torch.equal(kernels.dequant_torch(q, s, (128, 128)), ref)
    assert torch.equal(kernels.dequant_torch(q[130:], s, (128, 128), row0=130), ref[130:])
    # every CPU route through linear_cpu: chunked rows (a small chunk forces 4 chunks), and no compiler at all
    x = torch.randn(12, 200, generator=_gen(3))
    want = linear_reference(x, q, s)
    for lib_ in [*libs, None]:
        for n in (1, 3, 12):
            got = kernels.linear_cpu(x[:n].contiguous(), q, s, (128, 128), lib=lib_, chunk_elems=80 * 200)
            torch.testing.assert_close(got, want[:n], rtol=1e-5, atol=1e-5 * want.abs().max().item())
        if lib_ is not None:
            kernels.dequant_rows_into(out, q, s, 0, (128, 128), lib_)
            assert torch.equal(out, ref)


@pytest.mark.parametrize("moe_impl", ["grouped", "loop"])
def test_fp8_experts_match_dense_experts_on_dequantized_weights(moe_impl):
    cfg = tiny().replace(hidden_size=160, moe_intermediate_size=136, n_routed_experts=6, num_experts_per_tok=2)
    g = _gen(3)
    dense = Experts(cfg)
    with torch.no_grad():
        for p in dense.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    fp8 = FP8Experts.from_experts(dense)
    with torch.no_grad():
        for name in FP8Experts.PROJS:  # the dense experts hold exactly the FP8 values
            getattr(dense, name).copy_(fp8.dequantized(name))
    N = 23
    x = torch.randn(N, 160, generator=g)
    idx = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(N)])
    w = torch.rand(N, 2, generator=g)
    idx[:, 0] = torch.where(idx[:, 0] == 5, 0, idx[:, 0])  # expert 5 gets few tokens, possibly none
    ref = dense(x, w, idx, "loop")
    for impl in ("reference", "fast"):
        fp8.impl = impl
        torch.testing.assert_close(fp8(x, w, idx, moe_impl), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_dtype_moves_never_reinterpret_fp8():
    lin = torch.nn.Linear(200, 130)
    m = FP8Linear.from_linear(lin)
    q, s = m.weight.clone(), m.weight_scale_inv.clone()
    m.to(torch.float32).float().to(torch.bfloat16)
    assert m.weight.dtype == FP8 and torch.equal(m.weight.view(torch.uint8), q.view(torch.uint8))
    assert m.weight_scale_inv.dtype == torch.float32 and torch.equal(m.weight_scale_inv, s)


# -- models ------------------------------------------------------------------------------------------------------
QUALITY_CFG = dict()  # tiny: 3 layers (1 dense, 2 MoE) + MTP
T_QUALITY = 16  # <= index_topk: DSA keeps every key, so no discrete top-k choice can flip


def test_quality_on_random_weights_and_fast_equals_reference():
    """Random weights give near-tied logits (top-1 means little), so: mean KL and the correlation of centred logits.
    Thresholds from measurements on this config over 6 seeds: FP8 gives KL 0.9-2.1e-3, corr >= 0.987,
    the same as 2.6% multiplicative noise (e4m3's RMS rounding error) in every quantized matrix (KL 0.8-2.1e-3):
    the model, not the format, is that sensitive (routing flips). A 10% error in every scale, a plausible bug,
    gives KL >= 5.1e-3 and corr <= 0.969. We require KL <= 3e-3 and corr >= 0.98, and the bug must fail them."""
    cfg = tiny().replace(**QUALITY_CFG)
    dense = perturb(glm5.load_model(cfg), seed=4, std=0.05)
    fp8 = quantize_model(copy.deepcopy(dense))
    ids = torch.randint(0, cfg.vocab_size, (8, T_QUALITY), generator=_gen(5))
    with torch.no_grad():
        ref = dense(ids)
        out = fp8(ids)
        set_linear_impl(fp8, "reference")
        out_ref = fp8(ids)
        set_linear_impl(fp8, "fast", act_quant=True)  # the release's dynamic 1x128 activation scales
        out_act = fp8(ids)
        set_linear_impl(fp8, "fast", act_quant=False)
        for m in fp8.modules():  # the negative control
            if isinstance(m, (FP8Linear, FP8Experts)):
                for n, b in m.named_buffers():
                    if n.endswith("scale_inv"):
                        b.mul_(1.1)
        out_bad = fp8(ids)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4 * out_ref.abs().max().item())
    kl, corr, _ = _metrics(ref, out)
    assert kl <= 3e-3 and corr >= 0.98, (kl, corr)
    kl_a, corr_a, _ = _metrics(ref, out_act)
    assert kl_a <= 4e-3 and corr_a >= 0.98, (kl_a, corr_a)  # activations in e4m3 too: a little more error
    kl_b, corr_b, _ = _metrics(ref, out_bad)
    assert kl_b > 3e-3 and corr_b < 0.98, (kl_b, corr_b)


def _memory_cfg():
    # GLM-5's proportions at toy size: dims multiples of 128, most weights in routed experts, embeddings a small
    # share (GLM-5: 0.25%; here 3%)
    return tiny().replace(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=256,
                          kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64,
                          index_n_heads=4, index_head_dim=128, n_routed_experts=16, num_experts_per_tok=2)


def test_resident_memory_at_most_055_of_bf16(tmp_path):
    cfg = _memory_cfg()
    dense = glm5.load_model(cfg, dtype=torch.bfloat16)
    glm5.save_checkpoint(dense, tmp_path / "bf16", dtype=torch.bfloat16)
    quantize_checkpoint(tmp_path / "bf16", tmp_path / "fp8", "fp8")
    fp8 = glm5.load_model(tmp_path / "fp8", dtype=torch.bfloat16)  # unquantized tensors in BF16, as stored
    ratio = weight_bytes(fp8) / weight_bytes(dense)
    assert 0.45 < ratio <= 0.55, ratio
    n_fp8 = sum(b.numel() for b in fp8.buffers() if b.dtype == FP8)
    assert n_fp8 > 0.85 * sum(p.numel() for p in dense.parameters())
    with torch.no_grad():  # and it runs, in bf16
        assert fp8(torch.tensor([[1, 2, 3]])).isfinite().all()


# -- checkpoints -------------------------------------------------------------------------------------------------
def _cli_quantize(src, dst, to):
    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers(dest="cmd"))
    args = p.parse_args(["quantize", str(src), str(dst), "--to", to])
    assert args.fn(args) == 0


def test_round_trip_fp8_bf16_loads_in_transformers(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    cfg = tiny()
    dense = _bf16_rounded(perturb(glm5.load_model(cfg), seed=6, std=0.05))
    glm5.save_checkpoint(dense, tmp_path / "dense", max_shard_bytes=400_000)  # several shards
    (tmp_path / "dense" / "tokenizer.json").write_text("{}")
    _cli_quantize(tmp_path / "dense", tmp_path / "fp8", "fp8")
    _cli_quantize(tmp_path / "fp8", tmp_path / "bf16", "bf16")
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "bf16" / "tokenizer.json").exists()
    qc = json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128] and qc["fmt"] == "e4m3"
    assert qc["activation_scheme"] == "dynamic" and "lm_head" in qc["modules_to_not_convert"]
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())
    fp8 = glm5.load_model(tmp_path / "fp8")
    assert isinstance(fp8.model.layers[1].mlp.experts, FP8Experts)
    assert isinstance(fp8.mtp[0].self_attn.indexer.wk, FP8Linear)
    assert type(fp8.mtp[0].eh_proj) is torch.nn.Linear  # left in BF16, as GLM-5-FP8 does
    ids = torch.randint(0, cfg.vocab_size, (2, T_QUALITY), generator=_gen(7))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    hf_dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32,
                                                                 attn_implementation="eager").eval()
    with torch.no_grad():
        ours = fp8(ids)
        theirs = hf(ids).logits
        theirs_dense = hf_dense(ids).logits
    # the BF16 checkpoint holds the FP8 values rounded to BF16 (8 bits): logits within BF16 rounding of ours
    kl, corr, _ = _metrics(ours, theirs)
    assert kl <= 1e-4 and corr >= 0.999, (kl, corr)
    kl_q, corr_q, _ = _metrics(theirs_dense, theirs)  # and within FP8 error of the original
    assert kl_q <= 2e-3 and corr_q >= 0.99, (kl_q, corr_q)


def _official_layout(tmp_path, dense, cfg, mutate=None):
    """An FP8 checkpoint laid out like zai-org/GLM-5-FP8: several shards, modules_to_not_convert naming the
    indexer as `indexers_proj`, the MTP layer's tied embedding copy, one scale in another shard than its weight."""
    tensors = {}
    for hf, t in hf_tensors(dense):
        if quantized_by_release(hf):
            tensors[hf], tensors[hf + "_scale_inv"] = quantize(t)
        else:
            fp32_kept = hf.endswith(("gate.weight", "bias", "weights_proj.weight"))
            tensors[hf] = t if fp32_kept else t.to(torch.bfloat16)
    L = cfg.num_hidden_layers
    tensors[f"model.layers.{L}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    if mutate:
        mutate(tensors)
    names = sorted(tensors)
    moved = "model.layers.1.self_attn.q_b_proj.weight_scale_inv"
    shards = [names[: len(names) // 3], names[len(names) // 3: 2 * len(names) // 3], names[2 * len(names) // 3:]]
    shards = [[k for k in s if k != moved] for s in shards]
    if moved in tensors:
        target = next(i for i, s in enumerate(shards) if "model.layers.1.self_attn.q_b_proj.weight" not in s)
        shards[target].append(moved)
    out = tmp_path / "official"
    out.mkdir()
    wmap = {}
    for i, keys in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in keys}, str(out / fname))
        wmap.update({k: fname for k in keys})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    hf_cfg = cfg.to_hf()
    hf_cfg["torch_dtype"] = "bfloat16"
    hf_cfg["quantization_config"] = {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128],
        "modules_to_not_convert": ["model.embed_tokens", "lm_head"]
        + [f"model.layers.{i}.self_attn.indexers_proj" for i in range(L + 1)]}
    (out / "config.json").write_text(json.dumps(hf_cfg))
    return out


def test_official_layout_loads_like_in_memory_quantization(tmp_path):
    cfg = tiny()
    dense = _bf16_rounded(perturb(glm5.load_model(cfg), seed=8, std=0.05))
    path = _official_layout(tmp_path, dense, cfg)
    fmt = read_quant_config(json.loads((path / "config.json").read_text()))
    assert fmt.listed_unconverted("model.layers.0.self_attn.indexer.weights_proj")  # the misspelling, understood
    loaded = glm5.load_model(path)
    in_memory = quantize_model(copy.deepcopy(dense))
    assert loaded.model.layers[0].self_attn.q_a_proj.weight.dtype == FP8
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=_gen(9))
    with torch.no_grad():
        a, b = loaded(ids), in_memory(ids)
        (ma, _), (mb, _) = loaded.forward_with_mtp(ids), in_memory.forward_with_mtp(ids)
    assert torch.equal(a, b) and torch.equal(ma, mb)  # the same e4m3 values, scales and dense weights
    # an in-memory FP8 model written back (save_fp8_checkpoint) loads to the same model
    save_fp8_checkpoint(in_memory, tmp_path / "saved", max_shard_bytes=300_000)
    assert len(list((tmp_path / "saved").glob("*.safetensors"))) > 1
    with torch.no_grad():
        assert torch.equal(glm5.load_model(tmp_path / "saved")(ids), a)
    # RL weight sync into an FP8 rollout model: dense tensors in, the same FP8 state out
    upd = fp8_state_dict(loaded, {k: v for k, v in dense.state_dict().items()})
    named = {**dict(loaded.named_parameters()), **dict(loaded.named_buffers())}
    assert set(upd) <= set(named) and all(upd[k].dtype == named[k].dtype for k in upd)
    with torch.no_grad():
        for k, v in upd.items():
            named[k].copy_(v)
        assert torch.equal(loaded(ids), a)


@pytest.mark.parametrize("case", ["missing_scale", "wrong_scale_shape", "unknown_method", "scale_on_dense",
                                  "fp8_listed_unconverted", "e5m2"])
def test_bad_fp8_checkpoints_fail_clearly(tmp_path, case):
    cfg = tiny()
    dense = glm5.load_model(cfg)
    key = "model.layers.1.mlp.experts.3.up_proj.weight"

    def mutate(t):
        if case == "missing_scale":
            del t[key + "_scale_inv"]
        elif case == "wrong_scale_shape":
            t[key + "_scale_inv"] = torch.ones(2, 1)
        elif case == "scale_on_dense":
            t["model.layers.0.self_attn.indexer.weights_proj.weight_scale_inv"] = torch.ones(1, 1)
        elif case == "fp8_listed_unconverted":
            w = "model.layers.0.self_attn.indexer.weights_proj.weight"
            t[w], t[w + "_scale_inv"] = quantize(t[w])
        elif case == "e5m2":
            t[key] = t[key].float().to(torch.float8_e5m2)

    path = _official_layout(tmp_path, dense, cfg, mutate)
    if case == "unknown_method":
        c = json.loads((path / "config.json").read_text())
        c["quantization_config"]["quant_method"] = "awq"
        (path / "config.json").write_text(json.dumps(c))
    expect = {"missing_scale": rf"{key}: stored as float8_e4m3fn but {key}_scale_inv is missing",
              "wrong_scale_shape": rf"{key}_scale_inv: checkpoint \[2, 1\], expected \[1, 1\]",
              "unknown_method": r"quant_method is 'awq'; glm5 reads only 'fp8'",
              "scale_on_dense": r"indexer.weights_proj.weight: has .*_scale_inv but is stored as (F32|BF16)",
              "fp8_listed_unconverted": r"weights_proj.weight: stored as e4m3 but its module is in modules_to_not",
              "e5m2": rf"{key}: stored as F8_E5M2"}[case]
    with pytest.raises(CheckpointError, match=expect):
        glm5.load_model(path)


def test_quantize_refuses_fp8_input_and_a_used_output(tmp_path):
    cfg = tiny().replace(num_nextn_predict_layers=0)
    glm5.save_checkpoint(glm5.load_model(cfg), tmp_path / "dense")
    quantize_checkpoint(tmp_path / "dense", tmp_path / "fp8", "fp8")
    with pytest.raises(CheckpointError, match="already FP8"):
        quantize_checkpoint(tmp_path / "fp8", tmp_path / "again", "fp8")
    with pytest.raises(CheckpointError, match="must be new or empty"):
        quantize_checkpoint(tmp_path / "dense", tmp_path / "fp8", "fp8")
    assert not (tmp_path / "again").exists() or not any((tmp_path / "again").iterdir())


# -- a trained model ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_fp8_metrics():
    """The shipped model, FP8 against BF16 weights, on held-out conversations of its own task families rendered
    with the chat template (~2.9k positions): {"served": ..., "all": ...}, each (top-1 agreement, mean KL).

    "served" are the positions whose next token the model writes when it is served (the SFT loss targets: its
    reasoning, answers, tool calls and the stop token), ~1.5k of them; "all" adds those predicting text it only
    reads (system prompt, user turns, tool results). There the model's distribution is broad (a user's next digit),
    so near-ties flip under any perturbation: the shipped model agrees on 99.7% of the served positions (KL
    9.8e-4) and 98.8% of all (KL 3.1e-3); the models shipped before it on 99.9-100% of the served positions and
    98.5-99.4% of all (dev/LOG.md)."""
    from glm5.data import examples
    from glm5.tokenizer import Tokenizer
    from glm5.train.sft import chat_doc

    dense = glm5.load_model(ASSET_MODEL)
    tok = Tokenizer.from_dir(ASSET_MODEL)
    fp8 = quantize_model(copy.deepcopy(dense))
    kls, agrees, served = [], [], []
    for fam in ("arithmetic", "world", "unknown", "tool", "chat"):
        for ex in examples(fam, "heldout", 6, seed=7):
            doc = chat_doc(tok, ex.messages, ex.tools)
            ids = torch.tensor([doc["ids"]])
            with torch.no_grad():
                kl, agree = _per_position(dense(ids)[0], fp8(ids)[0])
            kls.append(kl), agrees.append(agree)
            served.append(torch.tensor(doc["loss"][1:] + [False]))  # position t predicts token t + 1
    kl, agree, served = torch.cat(kls), torch.cat(agrees).float(), torch.cat(served)
    assert served.sum() > 1000 and len(kl) > 2000
    return {"served": (agree[served].mean().item(), kl[served].mean().item()),
            "all": (agree.mean().item(), kl.mean().item())}


def test_trained_model_top1_and_kl_on_served_text(trained_fp8_metrics):
    """The FP8 targets, on the tokens the model writes: top-1 agreement >= 99% and mean KL <= 1e-3."""
    top1, kl = trained_fp8_metrics["served"]
    assert top1 >= 0.99 and kl <= 1e-3, trained_fp8_metrics


def test_trained_model_on_all_positions(trained_fp8_metrics):
    """A regression guard on every position, read text included (the models shipped so far: top-1 98.5-99.6%, KL
    1.4e-3 to 4.9e-3; dev/LOG.md): the 99% / 1e-3 target is not met there, see the fixture."""
    top1, kl = trained_fp8_metrics["all"]
    assert top1 >= 0.98 and kl <= 1e-2, trained_fp8_metrics


def test_engine_decodes_an_fp8_model_like_plain_greedy(tmp_path):
    """The engine only calls model(...): an FP8 model runs there unchanged (paged cache, chunked prefill)."""
    from glm5.engine.engine import Engine
    from glm5.engine.sampler import SamplingParams

    cfg = tiny()
    glm5.save_checkpoint(perturb(glm5.load_model(cfg), seed=10, std=0.05), tmp_path / "dense")
    quantize_checkpoint(tmp_path / "dense", tmp_path / "fp8", "fp8")
    fp8 = glm5.load_model(tmp_path / "fp8")
    prompts = [[1, 5, 9, 33, 2], [7, 7, 100, 4, 8, 9, 10, 11, 12]]
    res = Engine(fp8, num_blocks=64, block_size=4, eos_token_ids=[]).generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=10))
    compared = 0
    for prompt, completions in zip(prompts, res):
        ids = list(prompt)
        with torch.no_grad():
            for got in completions[0].token_ids:
                top2 = fp8(torch.tensor([ids]))[0, -1].topk(2)
                # the engine's batched and the plain path sum in other orders (fused GEMV vs dequantize + GEMM):
                # a near-tied argmax may differ, and everything after it; compare up to the first one
                if (top2.values[0] - top2.values[1]).item() < 1e-3:
                    break
                assert got == top2.indices[0].item()
                ids.append(got)
                compared += 1
    assert compared >= 10


def test_load_model_routes_fp8_and_engine_update_weights_quantizes(tmp_path):
    """glm5.load_model opens an FP8 checkpoint with FP8 weights. The engine's update_weights takes dense tensors
    and quantizes them: afterwards it serves exactly what a fresh engine on the quantized new checkpoint serves."""
    from glm5.engine import Engine, SamplingParams

    def checkpoints(seed, name):  # a BF16 checkpoint, its FP8 quantization, and the dense tensors as stored
        glm5.save_checkpoint(perturb(glm5.load_model(tiny()), seed=seed, std=0.05), tmp_path / name,
                             dtype=torch.bfloat16)
        quantize_checkpoint(tmp_path / name, tmp_path / f"{name}-fp8", to="fp8")
        return glm5.load_model(tmp_path / name), glm5.load_model(tmp_path / f"{name}-fp8")

    _, m = checkpoints(10, "old")
    assert any(b.dtype == torch.float8_e4m3fn for b in m.buffers())
    with pytest.raises(glm5.CheckpointError, match="save_fp8_checkpoint"):
        glm5.save_checkpoint(m, tmp_path / "nope")
    new_dense, fresh = checkpoints(11, "new")
    prompts, sp = [[1, 2, 3, 4, 5], [7, 7, 100, 4, 8, 9]], SamplingParams(temperature=0, max_tokens=8)
    eng = Engine(m, num_blocks=32, block_size=4, eos_token_ids=[])
    before = [c[0].token_ids for c in eng.generate(prompts, sp)]
    assert eng.update_weights(dict(new_dense.state_dict())) == 1
    served = [c[0] for c in eng.generate(prompts, sp)]
    expected = [c[0] for c in Engine(fresh, num_blocks=32, block_size=4, eos_token_ids=[]).generate(prompts, sp)]
    # the same FP8 bytes and scales, the same dense tensors: hence the same tokens with the same log-probs
    got, want = m.state_dict(), fresh.state_dict()
    assert got.keys() == want.keys()
    for k in want:  # compared as bytes: torch.equal has no e4m3 kernel on the CPU
        assert got[k].dtype == want[k].dtype and torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), k
    assert [c.token_ids for c in served] == [c.token_ids for c in expected] != before
    assert [c.logprobs for c in served] == [c.logprobs for c in expected]
