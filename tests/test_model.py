"""The DiT backbone: official parameter layout, soft input, heads, causality and conditioning."""
import math

import torch
import torch.nn.functional as F

from model import DiT, DiTConfig, ar_log_likelihood, build_model


def perturbed(model, scale=0.2, seed=0):
    """adaLN-zero and the zero output layer make a fresh model output constants; move every weight off its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def tiny(**kw):
    cfg = dict(vocab_size=9, seq_len=6, head='x0')
    cfg.update(kw)
    return perturbed(build_model('tiny', **cfg)).eval()


def test_parameter_names_follow_the_official_layout():
    """Keys as in reference/checkpoints-and-eval.md, so official weights load with at most a prefix rename."""
    model = build_model('tiny', vocab_size=9, mask_id=8, head='subs')
    d, C, V = 32, 32, 9
    expected = {
        'vocab_embed.embedding': (V, d),
        'sigma_map.mlp.0.weight': (C, 256), 'sigma_map.mlp.0.bias': (C,),
        'sigma_map.mlp.2.weight': (C, C), 'sigma_map.mlp.2.bias': (C,),
        'output_layer.norm_final.weight': (d,), 'output_layer.linear.weight': (V, d), 'output_layer.linear.bias': (V,),
        'output_layer.adaLN_modulation.weight': (2 * d, C), 'output_layer.adaLN_modulation.bias': (2 * d,),
    }
    for i in range(2):
        expected.update({
            f'blocks.{i}.norm1.weight': (d,), f'blocks.{i}.norm2.weight': (d,),
            f'blocks.{i}.attn_qkv.weight': (3 * d, d), f'blocks.{i}.attn_out.weight': (d, d),
            f'blocks.{i}.mlp.0.weight': (4 * d, d), f'blocks.{i}.mlp.0.bias': (4 * d,),
            f'blocks.{i}.mlp.2.weight': (d, 4 * d), f'blocks.{i}.mlp.2.bias': (d,),
            f'blocks.{i}.adaLN_modulation.weight': (6 * d, C), f'blocks.{i}.adaLN_modulation.bias': (6 * d,),
        })
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected


def test_small_preset_is_the_papers_169M_backbone():
    """d = 768, 12 blocks, 12 heads, V = 50258: about 169.6M parameters (built on the meta device, no memory)."""
    with torch.device('meta'):
        model = build_model('small', vocab_size=50258, seq_len=1024, mask_id=50257)
    assert abs(model.num_params() / 1e6 - 169.6) < 0.2


def test_one_hot_soft_input_gives_the_same_logits_as_ids():
    """The soft lookup (probabilities times the embedding matrix) equals the id lookup on one-hot vectors."""
    model = tiny()
    x = torch.randint(0, 9, (3, 6), generator=torch.Generator().manual_seed(1))
    soft = F.one_hot(x, 9).float()
    assert torch.allclose(model(x), model(soft), atol=1e-5)
    soft.requires_grad_(True)
    model(soft).sum().backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0  # differentiable in the input probabilities



def test_soft_input_keeps_a_float32_residual_stream_under_bf16_autocast():
    """Under bf16 autocast the soft lookup's matmul returns bf16; the embedding casts it back, so probability vectors
    enter the blocks in float32 like token ids, and both give the same logits (up to bf16 matmul round-off)."""
    model = tiny()
    x = torch.randint(0, 9, (3, 6), generator=torch.Generator().manual_seed(1))
    soft = F.one_hot(x, 9).float()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert model.vocab_embed(x).dtype == torch.float32
        assert model.vocab_embed(soft).dtype == torch.float32
        ids, probs = model(x).float(), model(soft).float()
    assert (ids - probs).abs().max() < 0.05 * ids.abs().max()

def test_subs_never_predicts_the_mask_and_copies_unmasked_tokens():
    """SUBS: p(mask) = 0 everywhere; an unmasked input token is its own prediction; masked rows are distributions."""
    model = tiny(head='subs', mask_id=8)
    x = torch.tensor([[8, 3, 8, 0, 8, 7], [1, 8, 8, 8, 2, 8]])
    p = model(x).exp()
    assert torch.all(p[..., 8] == 0)
    unmasked = x != 8
    assert torch.equal(p[unmasked], F.one_hot(x[unmasked], 9).float())
    assert torch.allclose(p[~unmasked].sum(-1), torch.ones(int((~unmasked).sum())), atol=1e-6)
    assert torch.all(p[~unmasked][:, :8] > 0)
    assert torch.isfinite(model(x)).all()  # a finite "log 0" (NEG_INF), so 0 * log 0 terms in losses stay 0


def test_sedd_head_scales_by_sigma_and_zeroes_the_current_token():
    """Untrained (zero output layer): l_y = -log(e^sigma - 1) - log(V - 1) for y != x, and l_x = 0."""
    model = build_model('tiny', vocab_size=9, head='sedd', time_conditioning=True)
    x = torch.randint(0, 9, (2, 6))
    sigma = torch.tensor([0.1, 3.0])
    out = model(x, sigma)
    for b in range(2):
        expected = -math.log(math.expm1(sigma[b].item())) - math.log(8)
        other = torch.ones(6, 9, dtype=torch.bool).scatter(-1, x[b][:, None], False)
        assert torch.allclose(out[b][other], torch.full((6 * 8,), expected), atol=1e-4)
        assert torch.all(out[b].gather(-1, x[b][:, None]) == 0)


def test_causal_head_does_not_look_ahead_and_bidirectional_does():
    x = torch.randint(0, 8, (1, 6), generator=torch.Generator().manual_seed(2))
    y = x.clone()
    y[0, 4] = (x[0, 4] + 1) % 8
    ar = tiny(head='ar', mask_id=8)
    assert torch.allclose(ar(x)[0, :4], ar(y)[0, :4], atol=1e-6)  # positions before the change see nothing of it
    assert not torch.allclose(ar(x)[0, 4:], ar(y)[0, 4:], atol=1e-4)
    bi = tiny(head='x0')
    assert not torch.allclose(bi(x)[0, :4], bi(y)[0, :4], atol=1e-4)


def test_ar_log_likelihood_is_a_normalised_sequence_distribution():
    """Summing exp(log p(x)) over all sequences of a tiny vocabulary gives 1 (BOS shift is right)."""
    model = tiny(vocab_size=4, head='ar', mask_id=3)  # 3 real tokens + BOS = id 3
    seqs = torch.cartesian_prod(*[torch.arange(3)] * 3)  # (27, 3)
    total = ar_log_likelihood(model, seqs, bos_id=3).sum(-1).exp().sum()
    assert abs(total.item() - 1.0) < 1e-5


def test_time_conditioning_switch():
    x = torch.randint(0, 9, (2, 6))
    s1, s2 = torch.tensor([0.1, 0.1]), torch.tensor([2.0, 2.0])
    timed = tiny(time_conditioning=True)
    assert not torch.allclose(timed(x, s1), timed(x, s2), atol=1e-4)
    untimed = tiny(time_conditioning=False)
    assert torch.equal(untimed(x, s1), untimed(x, s2))  # MDLM's released model ignores sigma


def test_fresh_model_is_uniform():
    """adaLN-zero and the zero-initialised output layer: a fresh model predicts the uniform distribution."""
    model = DiT(DiTConfig(vocab_size=9, n_embd=32, n_layer=2, n_head=2, cond_dim=32, head='x0'))
    out = model(torch.randint(0, 9, (2, 6)))
    assert torch.allclose(out, torch.full_like(out, -math.log(9)), atol=1e-6)
