"""The single-process model equals Hugging Face GPT-2 on the same weights; import/export round trip."""
import pytest
import torch
import torch.nn.functional as F

from megagpt.config import KernelsConfig, ModelConfig, load_config
from megagpt.hf import from_hf, hf_config_dict, to_hf
from megagpt.model.gpt import (GPTStage, StageSpec, count_model_parameters, init_weights,
                               load_full_state_dict, stage_spec)
from megagpt.estimate import count_parameters

transformers = pytest.importorskip("transformers")

TORCH_KERNELS = dict(layernorm="torch", softmax="torch", bias_gelu="torch", cross_entropy="torch")


def small_model_config(**kw) -> ModelConfig:
    args = dict(vocab_size=1001, d_model=64, n_heads=4, n_layers=3, seq_length=32, dropout=0.0)
    args.update(kw)
    return ModelConfig(**args)


def hf_model(m: ModelConfig, seed=0):
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config_dict(m)))
    with torch.no_grad():   # GPT-2 initialises biases and norms to constants; make them random too
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def ours_from(model, m: ModelConfig, attention="eager") -> GPTStage:
    stage = GPTStage(m, KernelsConfig(attention=attention, **TORCH_KERNELS),
                     StageSpec(0, m.n_layers, True, True))
    load_full_state_dict(stage, from_hf(model.state_dict(), m))
    return stage.eval()


@pytest.mark.parametrize("attention, shape", [
    ("eager", {}), ("sdpa", {}),
    ("eager", {"layernorm_eps": 1e-2, "ffn_hidden_size": 96})])   # the exported config carries them
def test_logits_and_loss_equal_gpt2(attention, shape):
    m = small_model_config(**shape)
    hf = hf_model(m)
    ours = ours_from(hf, m, attention)
    ids = torch.randint(0, m.vocab_size, (3, 20))
    labels = torch.randint(0, m.vocab_size, (3, 20))
    with torch.no_grad():
        ref = hf(ids).logits
        logits = ours(ids)
        loss_sum, n = ours(ids, labels)
    assert logits.shape == (3, 20, m.padded_vocab_size(1))
    assert (logits[..., :m.vocab_size] - ref).abs().max().item() <= 1e-4
    ref_loss = F.cross_entropy(ref.reshape(-1, m.vocab_size), labels.reshape(-1))
    assert n.item() == 60
    torch.testing.assert_close(loss_sum / n, ref_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cross_entropy", ["torch", "triton"])
def test_labels_of_minus_100_are_left_out_and_others_outside_the_vocabulary_refused(cross_entropy):
    """Hugging Face's ignore label, -100, leaves its token out on every loss path, as a
    loss_mask of 0 does (the torch path added its log-sum-exp and counted it); any other label
    outside the vocabulary, or labels and masks of the wrong shape, are refused by name."""
    m = small_model_config()
    ours = ours_from(hf_model(m), m)
    ours.ops.cross_entropy_backend = cross_entropy
    ids = torch.randint(0, m.vocab_size, (2, 10))
    labels = torch.randint(0, m.vocab_size, (2, 10))
    mask = torch.ones(2, 10)
    mask[0, 3] = mask[1, 7] = 0
    with torch.no_grad():
        expected = ours(ids, labels, mask)
        ignored = labels.clone()
        ignored[0, 3] = ignored[1, 7] = -100
        got = ours(ids, ignored)
        assert got[1].item() == 18
        torch.testing.assert_close(got, expected)
        for bad in (m.vocab_size, 1020, -1):        # 1020: a padding column (1024 at tp 1)
            wrong = labels.clone()
            wrong[1, 2] = bad
            with pytest.raises(ValueError, match=rf"labels hold {bad}, outside \[0, "
                                                 rf"model.vocab_size=1001\); a label is the id"):
                ours(ids, wrong)
        wrong[1, 2] = 5000
        mask[1, 2] = 0                               # a label left out is not read
        torch.testing.assert_close(ours(ids, wrong, mask)[1], torch.tensor(17.0))
        wrong[1, 2] = 1020      # in the padding columns, whose logits the loss never reads
        torch.testing.assert_close(ours(ids, wrong, mask), ours(ids, labels, mask))
        with pytest.raises(ValueError, match=r"labels has shape \(2, 11\) but the tokens are "
                                             r"\(2, 10\) \(batch, sequence\); labels\[b, j\] is "
                                             r"the token after x\[b, j\]"):
            ours(ids, torch.randint(0, m.vocab_size, (2, 11)))
        with pytest.raises(ValueError, match=r"loss_mask has shape \(2, 9\)"):
            ours(ids, labels, torch.ones(2, 9))


def test_loss_mask_counts_only_masked_tokens():
    m = small_model_config()
    ours = ours_from(hf_model(m), m)
    ids = torch.randint(0, m.vocab_size, (2, 10))
    labels = torch.randint(0, m.vocab_size, (2, 10))
    mask = torch.zeros(2, 10)
    mask[:, 5:] = 1
    with torch.no_grad():
        logits = ours(ids)[..., :m.vocab_size]
        loss_sum, n = ours(ids, labels, mask)
    per_token = F.cross_entropy(logits.reshape(-1, m.vocab_size), labels.reshape(-1), reduction="none")
    assert n.item() == 10
    torch.testing.assert_close(loss_sum, (per_token * mask.reshape(-1)).sum())


def test_gradients_equal_gpt2():
    m = small_model_config(n_layers=2)
    hf = hf_model(m)
    ours = ours_from(hf, m)
    ids = torch.randint(0, m.vocab_size, (2, 16))
    hf.train()
    out = hf(ids, labels=ids)         # HF shifts labels inside
    out.loss.backward()
    ours.train()
    loss_sum, n = ours(ids[:, :-1], ids[:, 1:])
    (loss_sum / n).backward()
    torch.testing.assert_close((loss_sum / n).detach(), out.loss.detach(), rtol=1e-5, atol=1e-6)
    grads = {k: p.grad for k, p in ours.named_parameters()}
    hf_grads = from_hf({k: p.grad for k, p in hf.named_parameters()}, m)
    for k, g in grads.items():
        expected = hf_grads[k]
        if k == "embedding.wte.weight":
            g = g[:m.vocab_size]
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-6, msg=k)


def test_round_trip_is_identical():
    m = small_model_config()
    hf = hf_model(m)
    state = hf.state_dict()
    back = to_hf(from_hf(state, m), m)
    for k, v in state.items():
        assert torch.equal(back[k], v), k
    reloaded = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config_dict(m)))
    reloaded.load_state_dict(back)


def test_same_seed_same_weights_and_different_seed_differs():
    m = small_model_config()
    kernels = KernelsConfig(attention="eager", **TORCH_KERNELS)
    a, b, c = (GPTStage(m, kernels, stage_spec(m.n_layers, 0, 1)) for _ in range(3))
    init_weights(a, m, 1)
    init_weights(b, m, 1)
    init_weights(c, m, 2)
    for (k, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), k
        if k.endswith("qkv.weight"):
            assert not torch.equal(pa, pc)
    wte = a.embedding.wte.weight
    assert torch.all(wte[m.vocab_size:] == 0) and wte[:m.vocab_size].std() > 0.01


def test_the_initialisation_is_gpt2s():
    """N(0, init_std) weights, the residual projections' divided by sqrt(2 x n_layers) (GPT-2's
    and Megatron's scaled init), zero biases and the vocabulary padding, unit norm weights."""
    m = small_model_config(d_model=256, n_layers=8, vocab_size=2000, init_std=0.03)
    stage = GPTStage(m, KernelsConfig(attention="eager", **TORCH_KERNELS),
                     stage_spec(m.n_layers, 0, 1))
    init_weights(stage, m, 1)
    for name, p in stage.named_parameters():
        if name.endswith(".bias"):
            assert torch.all(p == 0), name
        elif "ln" in name:
            assert torch.all(p == 1), name
        else:
            want = m.init_std / (4 if name.endswith(("proj.weight", "fc2.weight")) else 1)
            values = p[:m.vocab_size] if name == "embedding.wte.weight" else p
            assert values.std().item() == pytest.approx(want, rel=0.05), name


def test_parameter_counts_from_the_meta_device_match_the_validator():
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    for path in sorted((root / "configs" / "training").glob("*.json")):
        m = load_config(path).model
        assert count_model_parameters(m) == count_parameters(m) == m.estimated_parameters, path.name


def test_input_longer_than_the_context_is_refused_by_name():
    m = small_model_config(n_layers=1, seq_length=8)
    stage = GPTStage(m, KernelsConfig(attention="eager", **TORCH_KERNELS), StageSpec(0, 1, True, True))
    with pytest.raises(ValueError, match="input_ids has 9 positions but the model has 8 "
                                         r"\(model.seq_length\); fix: cut the input"):
        stage(torch.zeros(2, 9, dtype=torch.long))


@pytest.mark.parametrize("dropout, n_heads, expected", [
    (0.0, 2, "triton"),     # head size 32
    (0.1, 2, "sdpa"),       # the kernel's dropout is not yet timed on a GPU
    (0.0, 4, "sdpa"),       # head size 16: not one of the kernel's
    (0.0, 8, "sdpa")])      # head size 8
def test_auto_attention_falls_back_to_sdpa_where_the_kernel_cannot_run(monkeypatch, dropout, n_heads, expected):
    import megagpt.model.gpt as gpt
    real = gpt.resolve_backend     # as on a GPU: auto means triton (its functions are not called here)

    def as_on_a_gpu(op, choice, device):
        return "triton" if (op, choice) == ("attention", "auto") else real(op, choice, device)
    monkeypatch.setattr(gpt, "resolve_backend", as_on_a_gpu)
    monkeypatch.setattr(gpt, "get_op", lambda op, choice, device: object())
    m = small_model_config(dropout=dropout, n_heads=n_heads)
    stage = GPTStage(m, KernelsConfig(attention="auto", **TORCH_KERNELS), StageSpec(0, 1, True, True))
    assert stage.ops.attention_backend == expected


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_attention_dropout_draws_from_the_tensor_parallel_stream(attention):
    """Attention dropout on the torch backends takes its masks from the tensor-parallel stream
    (each rank holds other heads), not the default one, which stays where it was."""
    from megagpt.parallel.random import get_rng_tracker, seed_everything

    m = small_model_config(dropout=0.5)
    stage = GPTStage(m, KernelsConfig(attention=attention, **TORCH_KERNELS),
                     StageSpec(0, 1, True, True))
    init_weights(stage, m, seed=0)
    attn = stage.layers["0"].attn.train()
    x = torch.randn(m.seq_length, 2, m.d_model)
    seed_everything(3)
    default_before = torch.get_rng_state()
    tp_before = get_rng_tracker().get_states()
    first = attn(x)
    assert torch.equal(torch.get_rng_state(), default_before)
    assert not all(torch.equal(a, b) for a, b in zip(get_rng_tracker().get_states().values(),
                                                     tp_before.values()))
    assert not torch.allclose(first, attn(x))            # new masks on the next call
    attn.eval()
    torch.testing.assert_close(attn(x), attn(x))
