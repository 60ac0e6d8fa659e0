"""
Tests for data.py, read as documentation of where tokens come from:
the synthetic language against brute-force enumeration (likelihood, sampler, exact denoiser, entropy bounds),
then the on-disk format (round trips, clear errors) for the synthetic, pydoc and tiktoken sources, GPT-2's BPE
read offline as a user sets it up.
"""

import hashlib
import inspect
import itertools
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.stats import chi2

import data
from data import DataError, SyntheticLanguage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BPE_FILE = os.path.join(REPO, '..', 'shared', 'tokenizers', 'r50k_base.tiktoken')   # GPT-2's ranks, for tiktoken


def tiny_language(**kw):
    # few tokens and few successors, so the sparse structure matters and N^L sequences can be enumerated
    args = dict(N=3, L=3, K=2, successors=2, floor=0.05, concentration=0.5, seed=3)
    args.update(kw)
    return SyntheticLanguage(**args)


def all_sequences(lang):
    return torch.tensor(list(itertools.product(range(lang.N), repeat=lang.L)))  # (N^L, L)


def brute_prob(lang, x):
    """p(x) = sum_k pi_k start_k(x_1) prod_i T_k(x_i | x_{i-1}), term by term in plain Python."""
    total = 0.0
    for k in range(lang.K):
        p = math.exp(lang.log_weights[k]) * math.exp(lang.log_start[k, x[0]])
        for a, b in zip(x[:-1], x[1:]):
            p *= math.exp(lang.log_trans[k, a, b])
        total += p
    return total


# -----------------------------------------------------------------------------
# The language's tables

def test_language_is_deterministic():
    a, b = SyntheticLanguage(), SyntheticLanguage()
    assert torch.equal(a.log_trans, b.log_trans) and torch.equal(a.log_start, b.log_start)
    assert not torch.equal(a.log_trans, SyntheticLanguage(seed=1).log_trans)
    # The benchmark must not drift between machines or numpy versions: pin a few numbers of the default tables.
    top = a.log_trans[0, 0].exp()
    assert sorted(torch.topk(top, 4).indices.tolist()) == [29, 43, 45, 61]
    assert top.max().item() == pytest.approx(0.3718809347, abs=1e-9)
    assert a.log_trans[3, 63].exp().max().item() == pytest.approx(0.4623358638, abs=1e-9)
    assert a.log_start[1, 7].exp().item() == pytest.approx(0.0275627132, abs=1e-9)


def test_transitions_are_stochastic_floored_and_sparse():
    lang = SyntheticLanguage(N=16, K=3, successors=4, floor=0.02)
    trans = lang.log_trans.exp()                                                       # (K, N, N)
    assert torch.allclose(trans.sum(-1), torch.ones(3, 16, dtype=torch.float64), atol=1e-12)
    assert trans.min() >= 0.02 / 16 * (1 - 1e-12)
    # exactly `successors` entries per row are above the floor
    assert ((trans > 0.02 / 16 + 1e-12).sum(-1) == 4).all()
    # the first token comes from the stationary distribution: start_k T_k = start_k
    start = lang.log_start.exp()                                                       # (K, N)
    assert torch.allclose(torch.einsum('ka,kab->kb', start, trans), start, atol=1e-12)
    assert torch.allclose(lang.log_weights.exp().sum(), torch.tensor(1.0, dtype=torch.float64))


def test_meta_round_trip():
    lang = tiny_language()
    again = SyntheticLanguage.from_meta(json.loads(json.dumps(lang.meta())))
    assert torch.equal(lang.log_trans, again.log_trans)


# -----------------------------------------------------------------------------
# Likelihood and sampler against enumeration

def test_log_prob_matches_enumeration_and_sums_to_one():
    lang = tiny_language()
    xs = all_sequences(lang)                                                           # (27, 3)
    logp = lang.log_prob(xs)
    assert logp.dtype == torch.float64
    brute = torch.tensor([brute_prob(lang, x.tolist()) for x in xs], dtype=torch.float64)
    assert torch.allclose(logp.exp(), brute, rtol=1e-12, atol=0)
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-12)


def test_sample_frequencies_match_exact_probabilities():
    lang = tiny_language()
    xs = all_sequences(lang)
    n = 40_000
    x = lang.sample(n, generator=torch.Generator().manual_seed(0))
    assert x.shape == (n, 3) and x.dtype == torch.long
    code = (x * torch.tensor([9, 3, 1])).sum(-1)                                       # sequence -> index in xs
    observed = torch.bincount(code, minlength=27).double()
    expected = n * lang.log_prob(xs).exp()
    stat = ((observed - expected) ** 2 / expected).sum().item()
    assert stat < chi2.ppf(0.999, df=26), stat


# -----------------------------------------------------------------------------
# The exact denoiser against Bayes' rule by enumeration

def brute_denoise(lang, z, kind, alpha):
    """p(x_i | z) proportional to sum over all x with x_i fixed of p(x) prod_j e(z_j | x_j)."""
    xs = all_sequences(lang)                                                           # (S, L)
    prior = lang.log_prob(xs).exp()                                                    # (S,)
    out = torch.zeros(len(z), lang.L, lang.N, dtype=torch.float64)
    for b in range(len(z)):
        a = float(alpha[b])
        keep = (xs == z[b]).double()                                                   # (S, L)
        if kind == 'absorbing':
            emit = a * keep + (1 - a) * (z[b] == lang.N).double()
        else:
            emit = a * keep + (1 - a) / lang.N
        joint = prior * emit.prod(-1)                                                  # p(x, z)
        for i in range(lang.L):
            out[b, i] = torch.zeros(lang.N, dtype=torch.float64).index_add(0, xs[:, i], joint)
    return out / out.sum(-1, keepdim=True)


@pytest.mark.parametrize('kind', ['absorbing', 'uniform'])
def test_denoise_matches_enumeration(kind):
    lang = tiny_language(N=3, L=5, K=3)
    gen = torch.Generator().manual_seed(1)
    x = lang.sample(12, generator=gen)
    alpha = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.95, 0.999] * 2, dtype=torch.float64)
    if kind == 'absorbing':
        z = torch.where(torch.rand(12, 5, generator=gen) < 0.5, lang.N, x)
        z[0] = lang.N                                                                  # all masked: the prior
    else:
        z = torch.where(torch.rand(12, 5, generator=gen) < 0.5, torch.randint(0, 3, (12, 5), generator=gen), x)
    expected = brute_denoise(lang, z, kind, alpha)
    for a in (alpha, alpha[:, None]):                                                  # (B,) and (B, 1)
        got = lang.denoise(z, kind, a)
        assert got.shape == (12, 5, 3) and got.dtype == torch.float64
        assert torch.allclose(got, expected, atol=1e-12)
    # a float alpha, shared by the batch
    assert torch.allclose(lang.denoise(z, kind, 0.3), brute_denoise(lang, z, kind, [0.3] * 12), atol=1e-12)


def test_denoise_limits():
    lang = SyntheticLanguage(N=8, L=6, K=2)
    x = lang.sample(4, generator=torch.Generator().manual_seed(0))
    # nothing masked: the posterior is the clean sequence itself
    assert torch.allclose(lang.denoise(x, 'absorbing', 0.7), torch.nn.functional.one_hot(x, 8).double())
    # everything masked: the marginal of every position is the mixture of stationary distributions
    prior = (lang.log_weights.exp()[:, None] * lang.log_start.exp()).sum(0)
    got = lang.denoise(torch.full((2, 6), 8), 'absorbing', 0.5)
    assert torch.allclose(got, prior.expand(2, 6, 8), atol=1e-12)
    # pure noise under the uniform process tells nothing either
    assert torch.allclose(lang.denoise(x, 'uniform', 0.0), prior.expand(4, 6, 8), atol=1e-12)
    with pytest.raises(ValueError):
        lang.denoise(torch.full((1, 6), 8), 'uniform', 0.5)                            # no mask id in uniform


def test_denoise_is_stable_on_long_sequences():
    # 64 positions x 64 tokens: products of probabilities underflow unless each step is normalised
    lang = SyntheticLanguage()
    x = lang.sample(8, generator=torch.Generator().manual_seed(0))
    z = torch.where(torch.rand(8, 64, generator=torch.Generator().manual_seed(1)) < 0.3, 64, x)
    post = lang.denoise(z, 'absorbing', 0.7)
    assert torch.isfinite(post).all()
    assert torch.allclose(post.sum(-1), torch.ones(8, 64, dtype=torch.float64))
    # the clean token is likely under the posterior: much better than a uniform guess
    assert post.gather(-1, x[..., None]).log().mean() > -math.log(64) + 2


# -----------------------------------------------------------------------------
# Entropy rate against exact bounds

def conditional_entropy(lang):
    """H(X | K) exactly: H_k = H(start_k) + (L - 1) sum_a start_k(a) H(T_k(. | a)), since start_k is stationary."""
    start, trans = lang.log_start.exp(), lang.log_trans.exp()
    h_start = -(start * lang.log_start).sum(-1)                                        # (K,)
    h_rows = -(trans * lang.log_trans).sum(-1)                                         # (K, N)
    h_k = h_start + (lang.L - 1) * (start * h_rows).sum(-1)
    return (lang.log_weights.exp() * h_k).sum().item()


def test_entropy_rate_within_exact_bounds():
    lang = SyntheticLanguage()
    H, se = lang.entropy_rate()
    lower = conditional_entropy(lang) / lang.L                                          # H(X|K) <= H(X)
    upper = (conditional_entropy(lang) + math.log(lang.K)) / lang.L                     # H(X) <= H(X|K) + H(K)
    print(f"\nentropy rate H = {H:.4f} +- {se:.4f} nats/token, exp(H) = {math.exp(H):.3f}, "
          f"bounds [{lower:.4f}, {upper:.4f}]")
    assert lower - 4 * se <= H <= upper + 4 * se
    assert se < 0.003
    assert lang.entropy_rate() == (H, se)                                               # cached


def test_entropy_rate_of_a_single_chain_is_exact():
    # with K = 1 the bounds coincide: H(X) = H(X|K), so the Monte Carlo estimate must hit it
    lang = SyntheticLanguage(N=16, L=16, K=1, seed=5)
    H, se = lang.entropy_rate(num_samples=4000)
    assert abs(H - conditional_entropy(lang) / lang.L) < 4 * se


# -----------------------------------------------------------------------------
# The on-disk format

def test_synthetic_round_trip(tmp_path):
    out = str(tmp_path / 'syn')
    data.prepare_synthetic(out, num_train=300, num_val=50, seed=4, N=16, L=8, K=2)
    meta = json.load(open(os.path.join(out, 'meta.json')))
    assert meta['vocab_size'] == 16 and meta['seq_len'] == 8
    assert meta['tokenizer'] == 'synthetic' and meta['dataset'] == 'synthetic'
    assert meta['language'] == SyntheticLanguage(N=16, L=8, K=2).meta()
    for split, n in (('train', 300), ('val', 50)):
        assert os.path.getsize(os.path.join(out, f'{split}.bin')) == n * 8 * 2         # uint16
    d = data.load_data(out)
    assert d.train.shape == (300, 8) and d.val.shape == (50, 8) and d.train.dtype == np.uint16
    lang = d.language()
    assert torch.equal(lang.log_trans, SyntheticLanguage(N=16, L=8, K=2).log_trans)
    # the stored sequences are exactly the language's samples under the documented seed
    expected = lang.sample(300, generator=torch.Generator().manual_seed(4))
    index = torch.tensor([5, 0, 299, 5])
    got = d.batch('train', index)
    assert got.dtype == torch.long and got.shape == (4, 8)
    assert torch.equal(got, expected[index])
    assert torch.equal(d.batch('train', np.arange(300)), expected)
    assert not torch.equal(d.batch('val', np.arange(50)), expected[:50])
    assert d.decode(expected[:2]) == [' '.join(map(str, row)) for row in expected[:2].tolist()]


def test_pydoc_round_trip(tmp_path):
    out = data.prepare_pydoc(str(tmp_path / 'pydoc'), seq_len=128)
    d = data.load_data(out)
    assert d.meta['tokenizer'] == 'bytes' and d.vocab_size == 256 and d.seq_len == 128
    raw = data.pydoc_text().encode('utf-8')
    n_blocks = len(raw) // 128
    assert len(d.train) + len(d.val) == n_blocks and len(d.val) == round(0.05 * n_blocks)
    # train then val is the byte stream, cut into blocks
    stream = np.concatenate([np.asarray(d.train).ravel(), np.asarray(d.val).ravel()])
    assert bytes(stream.astype(np.uint8)) == raw[:n_blocks * 128]
    text = d.decode(d.batch('val', [3]))[0]
    assert len(text) > 50 and text.strip('\ufffd') in data.pydoc_text()
    # a mask id left in a sample is shown, not crashed on
    assert '□' in d.decode(torch.tensor([[104, 105, 256, 33]]))[0]


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    def chunks():
        yield np.arange(10)
        raise RuntimeError('interrupted')

    with pytest.raises(RuntimeError):
        data.write_bin(str(tmp_path / 'train.bin'), chunks())
    assert os.listdir(tmp_path) == []


# -----------------------------------------------------------------------------
# Clear errors

def assert_one_sentence(err, *words):
    message = str(err.value)
    assert '\n' not in message and message
    for w in words:
        assert w in message, message


def test_missing_directory(tmp_path):
    with pytest.raises(DataError) as err:
        data.load_data(str(tmp_path / 'nope'))
    assert_one_sentence(err, 'does not exist', 'python data.py --dataset synthetic')
    with pytest.raises(DataError) as err:
        data.ensure_data(str(tmp_path / 'nope'))
    assert_one_sentence(err, 'python data.py')


def test_vocab_must_fit_uint16():
    data.check_vocab_fits(65536)
    with pytest.raises(DataError) as err:
        data.check_vocab_fits(65537)
    assert_one_sentence(err, 'uint16', '65536')


def test_corrupt_directories(tmp_path):
    out = str(tmp_path / 'syn')
    data.prepare_synthetic(out, num_train=10, num_val=2, N=16, L=8)
    meta_path = os.path.join(out, 'meta.json')
    good = open(meta_path).read()

    open(meta_path, 'w').write('{"vocab_size": 16, ')
    with pytest.raises(DataError) as err:
        data.load_data(out)
    assert_one_sentence(err, 'meta.json', 'python data.py')

    open(meta_path, 'w').write(good.replace('"vocab_size": 16', '"vocab_size": 4'))   # ids up to 15 now too big
    with pytest.raises(DataError) as err:
        data.load_data(out)
    assert_one_sentence(err, 'vocab_size', 'prepare')

    open(meta_path, 'w').write(good)
    with open(os.path.join(out, 'val.bin'), 'ab') as f:
        f.write(b'\x00\x00')                                                           # one token too many
    with pytest.raises(DataError) as err:
        data.load_data(out)
    assert_one_sentence(err, 'val.bin', 'multiple of seq_len')

    os.remove(meta_path)
    with pytest.raises(DataError) as err:
        data.load_data(out)
    assert_one_sentence(err, 'meta.json', 'python data.py')


def test_dispatch_and_ensure(tmp_path):
    with pytest.raises(DataError) as err:
        data.prepare('wikipedia', str(tmp_path / 'w'))
    assert_one_sentence(err, 'synthetic', 'pydoc', 'text')
    out = data.prepare('synthetic', str(tmp_path / 's'), num_train=4, num_val=2, N=8, L=4)
    assert data.ensure_data(out) == out


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, 'data.py'), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_cli_errors_are_one_line(tmp_path):
    if not os.path.exists(os.path.join(REPO, 'common.py')):
        pytest.skip('common.py (configure, UserError) is not written yet; the CLI needs it')
    for args in (['--dataset', 'text', '--files', str(tmp_path / 'missing.txt'), '--out', str(tmp_path / 'o')],
                 ['--dataset', 'wikipedia', '--out', str(tmp_path / 'o')],
                 ['--no_such_option', '1']):
        result = run_cli(*args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith('error:') and 'Traceback' not in result.stderr, result.stderr
        assert result.stderr.count('\n') == 1
    result = run_cli('--dataset', 'synthetic', '--out', str(tmp_path / 's'), '--num_train', '20', '--num_val', '4')
    assert result.returncode == 0, result.stderr
    assert data.load_data(str(tmp_path / 's')).train.shape == (20, 64)


# -----------------------------------------------------------------------------
# Your own text through tiktoken's GPT-2 encoding

@pytest.fixture
def offline_bpe(tmp_path, monkeypatch):
    """GPT-2's BPE set up as a user does offline: r50k_base.tiktoken copied into a fresh TIKTOKEN_CACHE_DIR under
    the SHA-1 of its URL, no network needed. -> the encoding, read from that file"""
    if not os.path.isfile(BPE_FILE):
        pytest.skip(f"GPT-2's BPE file r50k_base.tiktoken is not at {os.path.normpath(BPE_FILE)}")
    tiktoken = pytest.importorskip('tiktoken')
    cache = tmp_path / 'tiktoken-cache'
    cache.mkdir()
    shutil.copyfile(BPE_FILE, cache / data.R50K_CACHE_NAME)
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', str(cache))
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, 'r50k_base', raising=False)   # read the file, not a cache
    data.gpt2_encoding.cache_clear()
    yield data.gpt2_encoding()
    data.gpt2_encoding.cache_clear()


def test_the_cache_name_is_the_sha1_of_tiktokens_url():
    openai_public = pytest.importorskip('tiktoken_ext.openai_public')
    assert data.R50K_URL in inspect.getsource(openai_public.r50k_base)
    assert hashlib.sha1(data.R50K_URL.encode()).hexdigest() == data.R50K_CACHE_NAME


def test_gpt2_bpe_offline_gives_gpt2s_ids(offline_bpe):
    enc = offline_bpe
    assert enc.name == 'r50k_base' and enc.n_vocab == 50257
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode("<|endoftext|>", allowed_special={'<|endoftext|>'}) == [data.GPT2_EOS]
    assert enc.decode([15496, 995]) == "Hello world"


def test_real_text_through_the_cli_with_gpt2_bpe(tmp_path, offline_bpe):
    """`python data.py --dataset text --tokenizer gpt2` on real text (the pydoc documentation), in a process that
    finds the BPE file only through TIKTOKEN_CACHE_DIR: the format holds the text's GPT-2 ids, EOS after the file."""
    text = data.pydoc_text()[:20_000]
    (tmp_path / 'doc.txt').write_text(text, encoding='utf-8')
    out = tmp_path / 'gpt2'
    result = run_cli('--dataset', 'text', '--tokenizer', 'gpt2', '--files', str(tmp_path / 'doc.txt'),
                     '--seq_len', '64', '--out', str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ['meta.json', 'train.bin', 'val.bin']
    d = data.load_data(str(out))
    assert (d.meta['tokenizer'], d.vocab_size, d.seq_len, d.meta['eos_id']) == ('gpt2', 50257, 64, 50256)
    ids = offline_bpe.encode_ordinary(text) + [50256]
    n_blocks = len(ids) // 64
    assert (len(d.train), len(d.val)) == (n_blocks - round(0.05 * n_blocks), round(0.05 * n_blocks))
    assert np.concatenate([d.train.ravel(), d.val.ravel()]).tolist() == ids[:n_blocks * 64]
    assert text.startswith(d.decode(d.batch('train', [0]))[0])


def test_text_round_trip(tmp_path, offline_bpe):
    enc = offline_bpe
    files = [tmp_path / 'a.txt', tmp_path / 'b.txt']
    files[0].write_text('The quick brown fox jumps over the lazy dog. ' * 40)
    files[1].write_text('Diffusion language models unmask many tokens per step. ' * 40)
    out = data.prepare_text(str(tmp_path / 'text'), [str(f) for f in files], seq_len=16)
    d = data.load_data(out)
    assert d.meta['tokenizer'] == 'gpt2' and d.vocab_size == 50257 and d.meta['eos_id'] == 50256
    stream = np.concatenate([np.asarray(d.train).ravel(), np.asarray(d.val).ravel()]).tolist()
    expected = []
    for f in files:
        expected += enc.encode_ordinary(f.read_text()) + [50256]
    assert stream == expected[:len(stream)] and len(stream) == len(expected) // 16 * 16
    assert 'quick brown fox' in d.decode(d.batch('train', [1]))[0]


class StandInEncoding:
    """Offline stand-in for tiktoken's GPT-2 encoding: one token per utf-8 byte, same vocabulary size."""
    n_vocab = 50257

    def encode_ordinary(self, text):
        return list(text.encode('utf-8'))

    def decode(self, ids):
        return bytes(ids).decode('utf-8', errors='replace')


def test_text_format_streams_files_with_eos(tmp_path, monkeypatch):
    # the file-by-file streaming, EOS placement and train/val split, checked even where the BPE files are missing
    monkeypatch.setattr(data, 'gpt2_encoding', StandInEncoding)
    texts = ['first file, ' * 30, 'second file. ' * 30, 'third.']
    for i, t in enumerate(texts):
        (tmp_path / f'{i}.txt').write_text(t)
    names = ','.join(str(tmp_path / f'{i}.txt') for i in range(3))                     # the CLI's form
    d = data.load_data(data.prepare_text(str(tmp_path / 'text'), names, seq_len=32, val_fraction=0.2))
    expected = []
    for t in texts:
        expected += list(t.encode('utf-8')) + [50256]
    n_blocks = len(expected) // 32
    assert len(d.val) == round(0.2 * n_blocks) and len(d.train) + len(d.val) == n_blocks
    stream = np.concatenate([np.asarray(d.train).ravel(), np.asarray(d.val).ravel()]).tolist()
    assert stream == expected[:n_blocks * 32]
    assert d.meta['eos_id'] == 50256 and d.meta['tokenizer'] == 'gpt2'
    assert d.decode(d.batch('train', [0]))[0] == texts[0][:32]
    # too little text for one train and one val block
    with pytest.raises(DataError) as err:
        data.prepare_text(str(tmp_path / 'small'), [str(tmp_path / '2.txt')], seq_len=32)
    assert_one_sentence(err, '--seq_len')


def test_text_without_bpe_files_is_a_clear_error(tmp_path, monkeypatch):
    tiktoken = pytest.importorskip('tiktoken')

    def offline(name):
        raise ConnectionError('Failed to resolve openaipublic.blob.core.windows.net')

    monkeypatch.setattr(tiktoken, 'get_encoding', offline)
    data.gpt2_encoding.cache_clear()
    (tmp_path / 'a.txt').write_text('hello')
    with pytest.raises(DataError) as err:
        data.prepare_text(str(tmp_path / 'out'), [str(tmp_path / 'a.txt')])
    data.gpt2_encoding.cache_clear()
    assert_one_sentence(err, 'TIKTOKEN_CACHE_DIR', 'r50k_base.tiktoken', data.R50K_CACHE_NAME, '--dataset pydoc')
    with pytest.raises(DataError) as err:
        data.prepare_text(str(tmp_path / 'out'), str(tmp_path / 'missing.txt'))
    assert_one_sentence(err, 'missing.txt', '--files')


# -----------------------------------------------------------------------------
# OpenWebText-style corpora: documents streamed into framed 1024-style blocks, the last documents held out

def owt_corpus(root):
    """Six documents in a known reading order: two .txt files in sorted subfolders, then a .jsonl of four lines."""
    texts = ['alpha ' * 9, 'beta gamma ' * 7, 'first line doc. ' * 3, 'second ' * 8, 'third', 'fourth doc ' * 6]
    (root / 'a').mkdir(parents=True)
    (root / 'b').mkdir()
    (root / 'a' / '0.txt').write_text(texts[0])
    (root / 'b' / '1.txt').write_text(texts[1])
    (root / 'b' / 'ignored.csv').write_text('not a document')
    with open(root / 'c.jsonl', 'w') as f:
        for t in texts[2:]:
            f.write(json.dumps({'text': t, 'url': 'x'}) + '\n\n')               # blank lines are skipped
    return texts


def framed(stream, seq_len):
    """The expected blocks: EOS + seq_len - 2 stream tokens + EOS each, the ragged tail dropped."""
    content = seq_len - 2
    n = len(stream) // content
    return [[50256] + stream[i * content:(i + 1) * content] + [50256] for i in range(n)]


def doc_stream(texts):
    out = []
    for t in texts:
        out += list(t.encode('utf-8')) + [50256]
    return out


def test_owt_holds_out_the_last_documents_in_framed_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(data, 'gpt2_encoding', StandInEncoding)
    texts = owt_corpus(tmp_path / 'corpus')
    out = data.prepare_owt(str(tmp_path / 'owt'), str(tmp_path / 'corpus'), seq_len=12, val_docs=2, threads=3)
    d = data.load_data(out)
    assert d.train.tolist() == framed(doc_stream(texts[:4]), 12)               # blocks never cross the split
    assert d.val.tolist() == framed(doc_stream(texts[4:]), 12)
    assert (d.meta['n_docs'], d.meta['val_docs'], d.meta['framed'], d.meta['tokenizer']) == (6, 2, True, 'gpt2')
    assert (d.meta['n_train'], d.meta['n_val']) == (len(d.train), len(d.val))


def test_owt_without_held_out_documents_splits_the_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(data, 'gpt2_encoding', StandInEncoding)
    texts = owt_corpus(tmp_path / 'corpus')
    files = ','.join(str(p) for p in (tmp_path / 'corpus' / 'a' / '0.txt', tmp_path / 'corpus' / 'c.jsonl'))
    d = data.load_data(data.prepare_owt(str(tmp_path / 'owt'), files, seq_len=8, val_fraction=0.25, frame=False))
    stream = doc_stream([texts[0]] + texts[2:])
    n_blocks = len(stream) // 8
    assert len(d.val) == round(0.25 * n_blocks) and len(d.train) + len(d.val) == n_blocks
    assert np.concatenate([d.train.ravel(), d.val.ravel()]).tolist() == stream[:n_blocks * 8]
    assert os.path.getsize(os.path.join(d.path, 'train.bin')) == len(d.train) * 8 * 2   # cut short in place


def test_owt_tokenizes_lazily():
    """Documents are pulled a batch at a time: an endless corpus still yields its first documents."""
    endless = ('doc %d' % i for i in itertools.count())
    first = list(itertools.islice(data.tokenized_documents(endless, StandInEncoding(), threads=2, batch=4), 6))
    assert first == [list(('doc %d' % i).encode()) for i in range(6)]


def test_owt_errors_are_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setattr(data, 'gpt2_encoding', StandInEncoding)
    owt_corpus(tmp_path / 'corpus')
    with pytest.raises(DataError) as err:
        data.prepare_owt(str(tmp_path / 'o1'), str(tmp_path / 'corpus'), seq_len=12, val_docs=6)
    assert_one_sentence(err, '6 documents', '--val_docs')
    with pytest.raises(DataError) as err:
        data.prepare_owt(str(tmp_path / 'o2'), str(tmp_path / 'nowhere'))
    assert_one_sentence(err, 'nowhere', '--files')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DataError) as err:
        data.prepare_owt(str(tmp_path / 'o3'), str(tmp_path / 'empty'))
    assert_one_sentence(err, '.jsonl', '--files')
    (tmp_path / 'bad.jsonl').write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError) as err:
        data.prepare_owt(str(tmp_path / 'o4'), str(tmp_path / 'bad.jsonl'), seq_len=4)
    assert_one_sentence(err, 'line 2', "'text'", '--text_field')
    with pytest.raises(DataError) as err:
        data.prepare_owt(str(tmp_path / 'o5'), str(tmp_path / 'corpus'), seq_len=4096)
    assert_one_sentence(err, 'seq_len=4096')
    assert not os.path.exists(tmp_path / 'o5' / 'train.bin')                  # nothing half-written is left


def test_owt_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.setattr(data, 'gpt2_encoding', StandInEncoding)
    texts = owt_corpus(tmp_path / 'corpus')
    data.main(['--dataset', 'owt', '--files', str(tmp_path / 'corpus'), '--out', str(tmp_path / 'owt'),
               '--seq_len', '12', '--val_docs', '1', '--threads', '1'])
    d = data.load_data(str(tmp_path / 'owt'))
    assert d.val.tolist() == framed(doc_stream(texts[5:]), 12)


def test_owt_with_gpt2_bpe(tmp_path, offline_bpe):
    enc = offline_bpe
    texts = owt_corpus(tmp_path / 'corpus')
    d = data.load_data(data.prepare_owt(str(tmp_path / 'owt'), str(tmp_path / 'corpus'), seq_len=8, val_docs=1))
    stream = []
    for t in texts[:5]:
        stream += enc.encode_ordinary(t) + [50256]
    assert d.train.tolist() == framed(stream, 8) and d.vocab_size == 50257
