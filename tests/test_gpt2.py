"""The GPT-2 judge: Hugging Face weights read correctly (checked against a forward pass written from the raw
Conv1D tensors, and against `transformers` where it is installed), and the papers' GenPPL protocol."""
import json
import math
import types

import pytest
import torch

import eval as evaluation
import gpt2
from common import UserError
from gpt2 import GPT2Judge, counted, generative_perplexity, load_gpt2, nll_sum
from official import CheckpointError
from test_data import offline_bpe  # noqa: F401  (a fixture: GPT-2's BPE read from TIKTOKEN_CACHE_DIR, offline)

CFG = dict(vocab_size=67, n_positions=32, n_embd=24, n_layer=2, n_head=3, layer_norm_epsilon=1e-5)


def hf_weights(cfg=CFG, seed=0):
    """Random GPT-2 weights named and shaped as Hugging Face stores them: Conv1D [in, out], tied lm_head,
    causal-mask buffers, everything under `transformer.`."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: 0.2 * torch.randn(*s, generator=g)
    d, T = cfg['n_embd'], cfg['n_positions']
    w = {'transformer.wte.weight': r(cfg['vocab_size'], d), 'transformer.wpe.weight': r(T, d),
         'transformer.ln_f.weight': 1 + r(d), 'transformer.ln_f.bias': r(d)}
    for i in range(cfg['n_layer']):
        p = f'transformer.h.{i}.'
        w.update({p + 'ln_1.weight': 1 + r(d), p + 'ln_1.bias': r(d), p + 'ln_2.weight': 1 + r(d), p + 'ln_2.bias': r(d),
                  p + 'attn.c_attn.weight': r(d, 3 * d), p + 'attn.c_attn.bias': r(3 * d),
                  p + 'attn.c_proj.weight': r(d, d), p + 'attn.c_proj.bias': r(d),
                  p + 'mlp.c_fc.weight': r(d, 4 * d), p + 'mlp.c_fc.bias': r(4 * d),
                  p + 'mlp.c_proj.weight': r(4 * d, d), p + 'mlp.c_proj.bias': r(d),
                  p + 'attn.bias': torch.tril(torch.ones(T, T)).view(1, 1, T, T), p + 'attn.masked_bias': torch.tensor(-1e4)})
    w['lm_head.weight'] = w['transformer.wte.weight'].clone()
    return w


def write_folder(path, w, cfg=CFG, **extra):
    path.mkdir(exist_ok=True)
    json.dump({'model_type': 'gpt2', 'activation_function': 'gelu_new', **cfg, **extra}, open(path / 'config.json', 'w'))
    torch.save(w, path / 'pytorch_model.bin')
    return str(path)


def reference_logits(w, ids, cfg=CFG):
    """GPT-2 from the raw tensors: y = x @ W + b for Conv1D (no transposition), an explicit causal mask, the tanh
    GELU written out, and logits through the token embedding (tied)."""
    d, H = cfg['n_embd'], cfg['n_head']
    hd, (B, T) = d // H, ids.shape
    p = lambda name: w['transformer.' + name]

    def ln(x, name):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * p(name + '.weight') + p(name + '.bias')

    gelu = lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    h = p('wte.weight')[ids] + p('wpe.weight')[:T]
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    for i in range(cfg['n_layer']):
        q, k, v = (ln(h, f'h.{i}.ln_1') @ p(f'h.{i}.attn.c_attn.weight') + p(f'h.{i}.attn.c_attn.bias')).split(d, -1)
        q, k, v = (t.view(B, T, H, hd).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(future, float('-inf')).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, d)
        h = h + y @ p(f'h.{i}.attn.c_proj.weight') + p(f'h.{i}.attn.c_proj.bias')
        x = gelu(ln(h, f'h.{i}.ln_2') @ p(f'h.{i}.mlp.c_fc.weight') + p(f'h.{i}.mlp.c_fc.bias'))
        h = h + x @ p(f'h.{i}.mlp.c_proj.weight') + p(f'h.{i}.mlp.c_proj.bias')
    return ln(h, 'ln_f') @ p('wte.weight').T


@pytest.fixture
def judge_folder(tmp_path):
    w = hf_weights()
    return write_folder(tmp_path / 'gpt2', w), w


def test_matches_a_forward_pass_from_the_raw_weights(judge_folder):
    folder, w = judge_folder
    model = load_gpt2(folder)
    ids = torch.randint(0, CFG['vocab_size'], (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(ids), reference_logits(w, ids), atol=1e-5)
    assert not hasattr(model, 'lm_head') and model.h[0].attn.c_attn.weight.shape == (3 * 24, 24)  # [out, in] here


def test_safetensors_folder_and_keys_without_prefix(tmp_path):
    from test_official import write_safetensors
    w = hf_weights()
    plain = {k[len('transformer.'):] if k.startswith('transformer.') else k: v for k, v in w.items()
             if k != 'lm_head.weight' and not k.endswith(('.attn.bias', '.attn.masked_bias'))}  # GPT2Model's own layout
    folder = tmp_path / 'st'
    folder.mkdir()
    json.dump(CFG, open(folder / 'config.json', 'w'))
    write_safetensors(folder / 'model.safetensors', plain)
    ids = torch.randint(0, CFG['vocab_size'], (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(load_gpt2(str(folder))(ids), reference_logits(w, ids), atol=1e-5)


def test_matches_transformers(tmp_path):
    transformers = pytest.importorskip('transformers', reason='transformers is a test-only extra (pip install '
                                                              'transformers) and is not installed here')
    config = transformers.GPT2Config(**{k: v for k, v in CFG.items()}, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    torch.manual_seed(0)
    reference = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():                                     # move every weight off its init
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    reference.save_pretrained(tmp_path / 'hf', safe_serialization=False)
    ids = torch.randint(0, CFG['vocab_size'], (3, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(load_gpt2(str(tmp_path / 'hf'))(ids), reference(ids).logits, atol=1e-5)


def test_causal(judge_folder):
    model = load_gpt2(judge_folder[0])
    ids = torch.randint(0, CFG['vocab_size'], (1, 12), generator=torch.Generator().manual_seed(4))
    changed = ids.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % CFG['vocab_size']
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6) and not torch.allclose(a[:, 7:], b[:, 7:])


def test_loading_errors(tmp_path):
    w = hf_weights()
    untied = {**w, 'lm_head.weight': w['lm_head.weight'] + 1}
    for name, folder, words in (
            ('untied', write_folder(tmp_path / 'untied', untied), ('not tied',)),
            ('bert', write_folder(tmp_path / 'bert', w, model_type='bert'), ("'bert'",)),
            ('wider', write_folder(tmp_path / 'wider', w, n_embd=48), ('shape',)),
            ('none', str(tmp_path), ('no config.json',))):
        with pytest.raises(CheckpointError) as err:
            load_gpt2(folder)
        assert '\n' not in str(err.value) and all(word in str(err.value) for word in words), (name, str(err.value))


# ----------------------------------------------------------------------------------------------------------------
# The protocol

E = 50256


def test_only_the_first_eos_counts():
    assert counted(torch.tensor([5, E, 7, E, E]), E).tolist() == [True, True, False, False]
    assert counted(torch.tensor([E, 3, E, 4]), E).tolist() == [True, False, True]   # EOS at 0 was the first
    assert counted(torch.tensor([1, 2, 3]), E).tolist() == [True, True]


class Fixed(torch.nn.Module):
    """A 'judge' whose next-token distribution is the same everywhere: NLL of token y is -log p[y]."""

    def __init__(self, logp):
        super().__init__()
        self.logp = torch.nn.Parameter(logp, requires_grad=False)

    def forward(self, ids):
        return self.logp.expand(*ids.shape, -1)


def test_genppl_is_token_weighted_over_all_samples():
    eos = 5
    logp = torch.log_softmax(torch.tensor([0.1, 0.5, -1.0, 2.0, 0.0, 1.0]), -1)
    samples = [[0, 1, eos, 2, eos, eos], [3, 3, 3], [4]]                 # a one-token sample scores nothing
    nll = -logp.double()
    expected_terms = [nll[1], nll[eos], nll[2]] + [nll[3], nll[3]]       # later EOS and padding excluded
    total, count = nll_sum(Fixed(logp), samples, eos_id=eos, batch_size=2)
    assert count == 5 and abs(total - sum(expected_terms).item()) < 1e-5
    assert abs(generative_perplexity(Fixed(logp), samples, eos) - math.exp(total / count)) < 1e-9


def test_padding_does_not_change_scores(judge_folder):
    model = load_gpt2(judge_folder[0])
    g = torch.Generator().manual_seed(5)
    samples = [torch.randint(0, 60, (n,), generator=g).tolist() for n in (3, 17, 9, 32)]
    together = nll_sum(model, samples, eos_id=66, batch_size=4)
    alone = [nll_sum(model, [s], eos_id=66, batch_size=1) for s in samples]
    assert together[1] == sum(c for _, c in alone) == 2 + 16 + 8 + 31
    assert abs(together[0] - sum(t for t, _ in alone)) < 1e-4


class IdsAsText:
    """Offline stand-in for the GPT-2 BPE: ids written as numbers, EOS as '<|endoftext|>'."""
    n_vocab = 60

    def decode(self, ids):
        return ' '.join('<|endoftext|>' if i == E else str(i) for i in ids)

    def encode(self, text, allowed_special=()):
        assert '<|endoftext|>' in allowed_special
        return [E if t == '<|endoftext|>' else int(t) for t in text.split()]


def test_judge_decodes_retokenizes_and_truncates(judge_folder, monkeypatch):
    model = load_gpt2(judge_folder[0])                                  # context 32 tokens
    monkeypatch.setattr(gpt2, 'gpt2_encoding', IdsAsText)
    x = torch.randint(0, 60, (3, 40), generator=torch.Generator().manual_seed(6))
    x[0, 5] = 61                                                          # outside the tokenizer: dropped
    judge = GPT2Judge(model, batch_size=2, eos_id=E)
    kept = [[t for t in row if t < 60][:32] for row in x.tolist()]
    assert abs(judge.genppl(x) - generative_perplexity(model, kept, E)) < 1e-9
    assert abs(evaluation.judge_genppl(judge, x, bos_id=0) - judge.genppl(x)) < 1e-12   # eval.py dispatches to it


def test_judge_retokenizes_with_gpt2s_bpe(offline_bpe):
    """The judge's side of the protocol with the real BPE: GPT-2's ids, '<|endoftext|>' read as EOS, and a decode /
    re-tokenise round trip that gives the same ids back for ordinary text."""
    assert gpt2.retokenize(['Hello world<|endoftext|> Hello'], max_len=3) == [[15496, 995, 50256]]
    ids = offline_bpe.encode_ordinary('Diffusion language models unmask many tokens per step.')
    assert gpt2.retokenize([offline_bpe.decode(ids)]) == [ids]


def test_eval_refuses_a_gpt2_judge_on_other_tokens(judge_folder):
    dataset = types.SimpleNamespace(vocab_size=64, meta={'tokenizer': 'synthetic'})
    with pytest.raises(UserError) as err:
        evaluation.load_judge(f'gpt2:{judge_folder[0]}', dataset, 'synthetic', torch.device('cpu'))
    assert "'synthetic' tokens" in str(err.value)
    dataset.meta['tokenizer'] = 'gpt2'
    assert isinstance(evaluation.load_judge(f'gpt2:{judge_folder[0]}', dataset, 'owt', torch.device('cpu')), GPT2Judge)
    with pytest.raises(UserError):
        evaluation.load_judge('gpt2:/nonexistent', dataset, 'owt', torch.device('cpu'))
