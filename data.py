"""
Where tokens come from: four sources, one on-disk format.

    python data.py --dataset synthetic            # -> data/synthetic (the benchmark language)
    python data.py --dataset synthetic --N 128 --L 48 --K 2 --successors 3 --out data/syn2   # another language
    python data.py --dataset pydoc --seq_len 256  # -> data/pydoc
    python data.py --dataset text --files a.txt,b.txt --out data/mytext                    # GPT-2 BPE (tiktoken)
    python data.py --dataset text --files a.txt,b.txt --tokenizer bytes --out data/mybytes # bytes, no download
    python data.py --dataset owt --files /data/openwebtext --out data/owt --val_docs 100000   # a folder or files

1. synthetic: a mixture of K sparse Markov chains (SyntheticLanguage) whose log p(x) is exact. Every sample can
   be scored against the truth ("true GenPPL"; the language's own samples score exp(H), H its entropy rate), and
   the exact posterior p(x_i | z) of a corrupted sequence is a perfectly trained denoiser (ExactDenoiser).
2. pydoc: the documentation bundled with Python (pydoc_data) as bytes, vocab 256: real text with no download.
3. text: your text files, as GPT-2 BPE or as bytes.
4. owt: an OpenWebText-style corpus (.txt files or .jsonl lines), streamed in the 1024-token blocks the official
   teachers were trained on, the last documents held out as validation.

GPT-2's BPE is tiktoken's r50k_base (the ranks of its `gpt2` encoding, in one file). Offline, tiktoken finds the
file in TIKTOKEN_CACHE_DIR under the SHA-1 of its URL: copy r50k_base.tiktoken there as
0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4 (gpt2_encoding's error says so too).

The format (nanoGPT's): <dir>/train.bin and <dir>/val.bin hold np.uint16 ids, one sequence per block of seq_len,
and <dir>/meta.json says how to read them. vocab_size counts the real tokens; an absorbing model adds its mask (id
vocab_size) itself. Each file is written under a temporary name and moved into place, meta.json last, so a
directory with a meta.json is complete. Ids from anywhere else (another tokenizer, proteins) need no code here:
write the two .bin files with numpy and a meta.json such as
    {"vocab_size": 25, "seq_len": 128, "tokenizer": "none",
     "vocab": ["A", "C", "D", ...],    (optional: one string per id, to decode samples; else ids are printed)
     "separator": ""}                  (optional: what joins decoded tokens; default " ")
"""

import functools
import itertools
import json
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager

import numpy as np
import torch
from tqdm import tqdm

from common import UserError, configure
from model import NEG_INF

DATA_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
GPT2_EOS = 50256                                              # <|endoftext|>, GPT-2's only special token
R50K_URL = 'https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken'
R50K_CACHE_NAME = '0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4'  # sha1(R50K_URL): the file's name in the cache


class DataError(UserError):
    """A problem with the data that the user can fix; its message is one sentence, printed without traceback."""


# -----------------------------------------------------------------------------
# The synthetic language: a mixture of sparse Markov chains with exact likelihood

class SyntheticLanguage:
    """
    p(x) = sum_k pi_k p_k(x),   p_k(x) = start_k(x_1) prod_{i>1} T_k(x_i | x_{i-1}).

    Each component's transition matrix gives every token `successors` allowed successors with Dirichlet
    probabilities, mixed with a uniform floor, T = (1 - floor) sparse + floor / N, so every sequence has finite
    probability. start_k is the stationary distribution of T_k, so every position has the same marginal. The
    mixture weights are uniform, pi_k = 1/K: then H(K) = log K exactly, and no component is rare by chance.
    The tables are built in float64 with numpy's legacy RandomState(seed), whose stream numpy keeps frozen
    across versions, so the language is the same on every machine.
    """

    def __init__(self, N=64, L=64, K=4, successors=4, floor=0.01, concentration=1.0, seed=0):
        if not 0 < floor <= 1:
            raise DataError(f"floor must be in (0, 1] so that every sequence has finite probability, got {floor}")
        if not 1 <= successors <= N:
            raise DataError(f"successors must be between 1 and N={N}, got {successors}")
        self.N, self.L, self.K = N, L, K
        self.successors, self.floor, self.concentration, self.seed = successors, floor, concentration, seed
        rng = np.random.RandomState(seed)
        trans = np.zeros((K, N, N))
        for k in range(K):
            for a in range(N):
                allowed = rng.choice(N, size=successors, replace=False)
                trans[k, a, allowed] = rng.dirichlet(np.full(successors, float(concentration)))
        trans = (1 - floor) * trans + floor / N  # rows still sum to one
        start = np.stack([stationary_distribution(trans[k]) for k in range(K)])
        self.log_weights = torch.full((K,), -np.log(K), dtype=torch.float64)  # (K,)
        self.log_start = torch.from_numpy(np.log(start))                      # (K, N)
        self.log_trans = torch.from_numpy(np.log(trans))                      # (K, N, N): [k, a, b] = log p(b | a)
        self._entropy_cache = {}

    def meta(self):
        return dict(N=self.N, L=self.L, K=self.K, successors=self.successors, floor=self.floor,
                    concentration=self.concentration, seed=self.seed)

    @classmethod
    def from_meta(cls, meta):
        return cls(**meta)

    def sample(self, n, generator=None):
        """n exact samples (n, L): a component per sequence, then ancestral sampling along its chain."""
        comp = categorical(self.log_weights.exp().expand(n, self.K), generator)         # (n,)
        x = torch.empty(n, self.L, dtype=torch.long)
        x[:, 0] = categorical(self.log_start.exp()[comp], generator)
        trans = self.log_trans.exp()
        for i in range(1, self.L):
            x[:, i] = categorical(trans[comp, x[:, i - 1]], generator)
        return x

    def log_prob(self, x):
        """Exact log p(x) for ids (n, L) -> float64 (n,), log-sum-exp over the K components."""
        x = torch.as_tensor(x, dtype=torch.long).cpu()
        per_comp = self.log_start[:, x[:, 0]]                                          # (K, n)
        per_comp = per_comp + self.log_trans[:, x[:, :-1], x[:, 1:]].sum(-1)           # (K, n, L-1) -> (K, n)
        return torch.logsumexp(per_comp + self.log_weights[:, None], dim=0)

    def entropy_rate(self, num_samples=20000, seed=1234):
        """(H, stderr): H = E[-log p(x)] / L nats per token by Monte Carlo with exact likelihoods, cached per
        (num_samples, seed). A mixture's entropy has no closed form; it lies in [H(X|K), H(X|K) + log K] / L."""
        key = (num_samples, seed)
        if key not in self._entropy_cache:
            x = self.sample(num_samples, generator=torch.Generator().manual_seed(seed))
            nll = -self.log_prob(x) / self.L                                           # (num_samples,)
            self._entropy_cache[key] = (nll.mean().item(), (nll.std() / num_samples ** 0.5).item())
        return self._entropy_cache[key]

    def denoise(self, z, kind, alpha):
        """Exact posterior marginals p(x_i | z) -> float64 (B, L, N), for z (B, L) whose positions were corrupted
        independently from a clean x ~ p with keep probability alpha (a float, or a tensor (B,) or (B, 1)):
            absorbing: e(z | x) = alpha [z == x] + (1 - alpha) [z == N]   (N is the mask id; IDLM eq. 16)
            uniform:   e(z | x) = alpha [z == x] + (1 - alpha) / N        (IDLM eq. 17, scaled as in processes.py)
        Absorbing: this is MDLM's optimal x0-predictor (IDLM eq. 4). Uniform: the optimal UDLM x0-predictor is
        the leave-one-out posterior p(x_i | z without z_i) instead (ExactDenoiser).
        Per component, a forward and a backward pass, each step normalised against underflow (the normalisers'
        logs sum to log p_k(z)); the components are then weighted by p(k | z) = pi_k p_k(z) / p(z)."""
        z = torch.as_tensor(z, dtype=torch.long)
        B, L = z.shape
        N = self.N
        if z.min() < 0 or z.max() > N or (kind == 'uniform' and z.max() == N):
            raise ValueError(f"z holds ids outside the {kind} process's vocabulary")
        alpha = torch.as_tensor(alpha, dtype=torch.float64, device=z.device)
        alpha = alpha.reshape(-1, 1, 1) if alpha.dim() > 0 else alpha                 # (B, 1, 1) or scalar
        hit = (z[..., None] == torch.arange(N, device=z.device)).double()              # (B, L, N)
        if kind == 'absorbing':
            emit = alpha * hit + (1 - alpha) * (z == N).double()[..., None]
        elif kind == 'uniform':
            emit = alpha * hit + (1 - alpha) / N
        else:
            raise ValueError(f"kind must be 'absorbing' or 'uniform', got {kind!r}")
        emit = emit.expand(B, L, N)
        trans = self.log_trans.exp().to(z.device)                                      # (K, N, N)
        # forward: fwd[:, :, i] is proportional to p_k(x_i, z_1..z_i)
        fwd = torch.empty(B, self.K, L, N, dtype=torch.float64, device=z.device)
        log_evidence = torch.zeros(B, self.K, dtype=torch.float64, device=z.device)   # log p_k(z)
        cur = self.log_start.exp().to(z.device)[None] * emit[:, None, 0]               # (B, K, N)
        for i in range(L):
            if i > 0:
                cur = torch.einsum('nkx,kxy->nky', fwd[:, :, i - 1], trans) * emit[:, None, i]
            norm = cur.sum(-1, keepdim=True)                                           # (B, K, 1)
            log_evidence += norm[..., 0].log()
            fwd[:, :, i] = cur / norm
        # backward: bwd is proportional to p_k(z_{i+1}..z_L | x_i); only its shape over x_i matters
        post = torch.empty_like(fwd)
        bwd = torch.ones(B, self.K, N, dtype=torch.float64, device=z.device)
        for i in range(L - 1, -1, -1):
            if i < L - 1:
                bwd = torch.einsum('kxy,nky->nkx', trans, emit[:, None, i + 1] * bwd)
                bwd = bwd / bwd.sum(-1, keepdim=True)
            post[:, :, i] = fwd[:, :, i] * bwd
        post = post / post.sum(-1, keepdim=True)                                      # (B, K, L, N) = p_k(x_i | z)
        weight = torch.softmax(self.log_weights.to(z.device) + log_evidence, dim=-1)  # (B, K) = p(k | z)
        return torch.einsum('nk,nkiv->niv', weight, post)


class ExactDenoiser:
    """The synthetic language's exact posterior (SyntheticLanguage.denoise) dressed as a network, in float64.

    mdlm: SUBS log x0_hat (B, L, N + 1) = log p(x_i | z), mask column at NEG_INF. The absorbing posterior does not
          depend on alpha (a mask is emitted with prob 1 - alpha whatever x is), so sigma is ignored and the
          sampler may cache (time_conditioned = False). Unmasked positions come out one-hot: SUBS carry-over.
    sedd: the exact log-score at masked positions, l_y = log p(x_i = y | z) - log expm1(sigma), since the
          absorbing score is s_y = x0_hat_y / expm1(sigma_bar); the current token's entry is 0, as in the DiT head.
    duo:  the uniform process at alpha = exp(-sigma). Its x0_hat is the leave-one-out posterior p(x_i | z without
          z_i), NOT p(x_i | z): p(x_i | z) divided by z_i's own emission alpha [z_i = x] + (1 - alpha) / N and
          renormalised. It minimises the UDLM loss, and only with it is q(z_s | z_t, x0_hat) the exact reverse step."""

    def __init__(self, language, kind):
        if kind not in ('mdlm', 'sedd', 'duo'):
            raise ValueError(f"kind must be mdlm, sedd or duo, got {kind!r}")
        self.language, self.kind, self.N = language, kind, language.N
        self.time_conditioned = kind != 'mdlm'

    def __call__(self, z, sigma):
        N, sigma = self.N, sigma.to(torch.float64)
        if self.kind == 'duo':
            alpha = torch.exp(-sigma)[:, None, None]                                     # (B, 1, 1)
            post = self.language.denoise(z, 'uniform', alpha[:, 0, 0])                  # (B, L, N)
            own = alpha * torch.nn.functional.one_hot(z, N).to(torch.float64) + (1 - alpha) / N
            return torch.log(post / own).log_softmax(-1).clamp_min(NEG_INF)
        log_post = torch.log(self.language.denoise(z, 'absorbing', 0.5)).clamp_min(NEG_INF)  # any alpha in (0, 1)
        if self.kind == 'sedd':
            log_post = log_post - torch.log(torch.expm1(sigma))[:, None, None]
        out = torch.cat([log_post, torch.full_like(log_post[..., :1], NEG_INF)], dim=-1)  # (B, L, N + 1)
        return out.scatter(-1, z[..., None], 0.0) if self.kind == 'sedd' else out


def exact_denoiser(language, kind):
    """The exact denoiser of a SyntheticLanguage for a sampler kind ('mdlm', 'sedd', 'duo'); see ExactDenoiser."""
    return ExactDenoiser(language, kind)


def categorical(probs, generator=None):
    """One draw per row of probs (n, C) by inverting the CDF (much faster than torch.multinomial on CPU)."""
    u = torch.rand(probs.shape[0], 1, dtype=probs.dtype, generator=generator)
    return torch.searchsorted(probs.cumsum(-1), u, right=True)[:, 0].clamp_max(probs.shape[-1] - 1)


def stationary_distribution(trans):
    """pi with pi T = pi and sum(pi) = 1 for a row-stochastic (N, N) numpy matrix (unique: T > 0 everywhere)."""
    N = trans.shape[0]
    A = np.vstack([(trans.T - np.eye(N))[:-1], np.ones(N)])  # one balance equation is redundant: normalise instead
    return np.linalg.solve(A, np.eye(N)[-1])


# -----------------------------------------------------------------------------
# Writing the format: train.bin / val.bin (uint16 blocks of seq_len) and meta.json

def check_vocab_fits(vocab_size):
    if vocab_size > 65536:
        raise DataError(f"uint16 .bin files hold ids below 65536, but the vocabulary has {vocab_size} tokens: "
                        f"use a tokenizer with at most 65536 tokens")


@contextmanager
def atomic_open(path, mode='wb'):
    """Write to a temporary file beside `path`, move it into place only if everything succeeded."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix='.tmp-')
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp makes files private; data files are ordinary files
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise


def write_bin(path, chunks):
    """Stream an iterable of integer arrays into one uint16 file (ids were checked to be below 65536)."""
    with atomic_open(path) as f:
        for chunk in chunks:
            f.write(np.asarray(chunk).astype(np.uint16).tobytes())


def start_dir(out_dir):
    """Create out_dir, or mark an existing one incomplete (no meta.json) while its files are rewritten."""
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, 'meta.json')):
        os.remove(os.path.join(out_dir, 'meta.json'))


def write_meta(out_dir, meta):
    """Written last: a directory with a meta.json is complete."""
    with atomic_open(os.path.join(out_dir, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=2)


def write_blocks(path, tokens, seq_len, lo, hi, chunk=4096):
    """Blocks lo..hi-1 of a flat token array (a memmap) into one .bin file, `chunk` blocks at a time."""
    write_bin(path, (tokens[b * seq_len:min(b + chunk, hi) * seq_len] for b in range(lo, hi, chunk)))


def write_splits(out_dir, chunks, seq_len, val_fraction):
    """Stream token chunks into a temporary flat file, then cut it into blocks of seq_len: the last val_fraction
    of the blocks become val.bin, the rest train.bin (a ragged tail is dropped). -> (n_train, n_val)"""
    fd, stream = tempfile.mkstemp(dir=out_dir, prefix='.tmp-stream-')
    os.close(fd)
    try:
        write_bin(stream, chunks)
        tokens = np.memmap(stream, dtype=np.uint16, mode='r') if os.path.getsize(stream) else np.zeros(0)
        n_blocks = len(tokens) // seq_len
        n_val = max(1, round(n_blocks * val_fraction))
        if n_blocks - n_val < 1:
            raise DataError(f"the text has only {len(tokens)} tokens, too few for a train and a val block of "
                            f"seq_len={seq_len}: use more text or a smaller --seq_len")
        write_blocks(os.path.join(out_dir, 'train.bin'), tokens, seq_len, 0, n_blocks - n_val)
        write_blocks(os.path.join(out_dir, 'val.bin'), tokens, seq_len, n_blocks - n_val, n_blocks)
        return n_blocks - n_val, n_val
    finally:
        os.remove(stream)


def prepare_synthetic(out_dir, num_train=200_000, num_val=2_000, seed=0, language_seed=0, **language_kwargs):
    """Sample the benchmark language; seq_len is the language's L. `seed` seeds the samples, `language_seed`
    the tables; train and val are drawn from separate generators (seed, seed + 1), so val does not change
    with num_train."""
    check_vocab_fits(language_kwargs.get('N', 0))
    language = SyntheticLanguage(seed=language_seed, **language_kwargs)
    start_dir(out_dir)
    for split, count, split_seed in (('train', num_train, seed), ('val', num_val, seed + 1)):
        gen = torch.Generator().manual_seed(split_seed)
        chunks = (language.sample(min(10_000, count - s), generator=gen).numpy() for s in range(0, count, 10_000))
        write_bin(os.path.join(out_dir, f'{split}.bin'), chunks)
    write_meta(out_dir, dict(vocab_size=language.N, seq_len=language.L, tokenizer='synthetic', dataset='synthetic',
                             language=language.meta(), seed=seed, n_train=num_train, n_val=num_val))
    return out_dir


def pydoc_text():
    """Python's bundled documentation (the text behind help('topics')), in sorted-topic order."""
    from pydoc_data.topics import topics
    return ''.join(topics[key] for key in sorted(topics))


def prepare_pydoc(out_dir, seq_len=128, val_fraction=0.05):
    """Byte-level tokens (vocab 256) of the pydoc text; the last val_fraction of the stream is validation."""
    start_dir(out_dir)
    tokens = np.frombuffer(pydoc_text().encode('utf-8'), dtype=np.uint8)
    n_train, n_val = write_splits(out_dir, [tokens], seq_len, val_fraction)
    write_meta(out_dir, dict(vocab_size=256, seq_len=seq_len, tokenizer='bytes', dataset='pydoc', eos_id=None,
                             n_train=n_train, n_val=n_val))
    return out_dir


@functools.lru_cache(maxsize=1)
def gpt2_encoding():
    """GPT-2's BPE: tiktoken's r50k_base, the same ranks, split pattern and <|endoftext|> = 50256 as its `gpt2`
    encoding, read from one file (r50k_base.tiktoken) where `gpt2` needs two."""
    try:
        import tiktoken
    except ImportError:
        raise DataError("tiktoken is not installed: pip install tiktoken, or use --dataset pydoc") from None
    try:
        return tiktoken.get_encoding('r50k_base')
    except Exception as e:  # no network (a ConnectionError), or a cached file whose SHA-256 is wrong
        raise DataError(f"tiktoken could not load GPT-2's BPE ({type(e).__name__}; no network?): copy "
                        f"r50k_base.tiktoken (from {R50K_URL}) into a folder as {R50K_CACHE_NAME} and set "
                        f"TIKTOKEN_CACHE_DIR to that folder, or use --dataset pydoc") from e


def prepare_text(out_dir, files, seq_len=None, val_fraction=0.05, tokenizer='gpt2'):
    """Your text files (a list or 'a,b'), streamed one file at a time: GPT-2 BPE with an EOS after each file
    (seq_len 1024 by default), or their UTF-8 bytes (tokenizer 'bytes': vocab 256, seq_len 128 by default)."""
    if isinstance(files, str):
        files = [name for name in files.split(',') if name]
    if not files:
        raise DataError("no text files given: pass them with --files a.txt,b.txt")
    for name in files:
        if not os.path.isfile(name):
            raise DataError(f"text file '{name}' does not exist: check the paths given to --files")
    if tokenizer not in ('gpt2', 'bytes'):
        raise DataError(f"--tokenizer is gpt2 or bytes, not {tokenizer!r}")
    if tokenizer == 'bytes':
        vocab_size, eos_id, seq_len = 256, None, seq_len or 128
        file_tokens = lambda name: np.fromfile(name, dtype=np.uint8)
    else:
        enc = gpt2_encoding()
        vocab_size, eos_id, seq_len = enc.n_vocab, GPT2_EOS, seq_len or 1024
        check_vocab_fits(vocab_size)

        def file_tokens(name):
            with open(name, encoding='utf-8', errors='replace') as f:
                return np.array(enc.encode_ordinary(f.read()) + [GPT2_EOS])
    start_dir(out_dir)
    n_train, n_val = write_splits(out_dir, map(file_tokens, files), seq_len, val_fraction)
    write_meta(out_dir, dict(vocab_size=vocab_size, seq_len=seq_len, tokenizer=tokenizer, dataset='text',
                             eos_id=eos_id, files=[os.path.abspath(n) for n in files], n_train=n_train, n_val=n_val))
    return out_dir


# -----------------------------------------------------------------------------
# OpenWebText-style corpora: millions of documents, streamed through the tokenizer

DOCUMENT_SUFFIXES = ('.txt', '.jsonl')


def document_files(paths):
    """Files and folders ('a,b' or a list) -> the files to read, in order: a folder contributes its .txt and .jsonl
    files at any depth, sorted by path (so 'the last documents' means the same thing on every machine)."""
    if isinstance(paths, str):
        paths = [p for p in paths.split(',') if p]
    if not paths:
        raise DataError("no corpus given: pass text or jsonl files, or folders of them, with --files")
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = [os.path.join(root, n) for root, _, names in os.walk(path) for n in names
                     if n.endswith(DOCUMENT_SUFFIXES)]
            files += sorted(found, key=lambda f: os.path.relpath(f, path).split(os.sep))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise DataError(f"'{path}' does not exist: check the paths given to --files")
    if not files:
        raise DataError(f"no .txt or .jsonl files under {', '.join(paths)}: point --files to the corpus")
    return files


def read_documents(files, text_field='text'):
    """One document's text at a time: a .jsonl file holds one JSON object per line with the text under
    text_field (the Hugging Face export of OpenWebText); any other file is one document."""
    for name in files:
        with open(name, encoding='utf-8', errors='replace') as f:
            if not name.endswith('.jsonl'):
                yield f.read()
                continue
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)[text_field]
                except (ValueError, KeyError, TypeError):
                    raise DataError(f"{name} line {number} is not a JSON object with a '{text_field}' field: fix "
                                    f"the line, or name the field with --text_field") from None


def count_documents(files):
    """How many documents read_documents will yield (a .jsonl file: its non-blank lines), without tokenising."""
    total = 0
    for name in files:
        with open(name, 'rb') as f:
            total += sum(1 for line in f if line.strip()) if name.endswith('.jsonl') else 1
    return total


def tokenized_documents(docs, enc, threads=8, batch=256):
    """GPT-2 ids of each document, in order. tiktoken releases the GIL while it encodes, so a thread pool
    encodes a batch of documents in parallel; only one batch is in memory at a time."""
    with ThreadPoolExecutor(max(1, threads)) as pool:
        while True:
            chunk = list(itertools.islice(docs, batch))
            if not chunk:
                return
            yield from pool.map(enc.encode_ordinary, chunk)


class BlockWriter:
    """Cuts a token stream into blocks of seq_len uint16 ids, appended to an open file (a short tail is dropped).
    frame: each block is EOS + the next seq_len - 2 tokens + EOS, as the MDLM / Duo OpenWebText loader builds them
    (wrap=True; GPT-2's BOS is its EOS), so distillation sees the teachers' training distribution."""

    def __init__(self, f, seq_len, frame=True, eos_id=GPT2_EOS):
        if seq_len < (3 if frame else 1):
            raise DataError(f"seq_len={seq_len} leaves no room for text between the frame's two EOS tokens")
        self.f, self.frame, self.eos_id = f, frame, eos_id
        self.content = seq_len - 2 if frame else seq_len          # text tokens per block
        self.pending = np.zeros(0, dtype=np.uint16)
        self.blocks = 0

    def add(self, tokens):
        stream = np.concatenate([self.pending, np.asarray(tokens, dtype=np.uint16)])
        n = len(stream) // self.content
        body = stream[:n * self.content].reshape(n, self.content)                   # (n, content)
        if self.frame:
            eos = np.full((n, 1), self.eos_id, dtype=np.uint16)
            body = np.concatenate([eos, body, eos], axis=1)                        # (n, seq_len)
        self.f.write(body.tobytes())
        self.pending, self.blocks = stream[n * self.content:], self.blocks + n


def move_tail_to_val(out_dir, n_val, seq_len):
    """The last n_val blocks of train.bin become val.bin, and train.bin is cut short in place (meta.json is not
    written yet, so an interrupted move leaves the directory marked incomplete)."""
    train_path = os.path.join(out_dir, 'train.bin')
    tokens = np.memmap(train_path, dtype=np.uint16, mode='r')
    n_blocks = len(tokens) // seq_len
    write_blocks(os.path.join(out_dir, 'val.bin'), tokens, seq_len, n_blocks - n_val, n_blocks)
    del tokens
    os.truncate(train_path, (n_blocks - n_val) * seq_len * 2)


def prepare_owt(out_dir, files, seq_len=1024, val_docs=0, val_fraction=0.05, frame=True, threads=8,
                text_field='text'):
    """An OpenWebText-style corpus, streamed: GPT-2 BPE, an EOS after every document, blocks of seq_len framed by
    EOS (BlockWriter). val_docs > 0: the last val_docs documents are the validation split, in blocks of their own
    (the papers hold out OpenWebText's last 100k); val_docs = 0: the last val_fraction of the blocks. Memory stays
    one batch of documents whatever the corpus size; a progress bar counts documents."""
    files = document_files(files)
    enc = gpt2_encoding()
    check_vocab_fits(enc.n_vocab)
    held_out = val_docs > 0
    n_docs = count_documents(files) if held_out else None
    if held_out and n_docs <= val_docs:
        raise DataError(f"the corpus has {n_docs} documents, not more than --val_docs {val_docs}: hold out fewer "
                        f"documents or add more text")
    start_dir(out_dir)
    bar = tqdm(tokenized_documents(read_documents(files, text_field), enc, threads), total=n_docs, unit='doc',
               desc='tokenize', dynamic_ncols=True, mininterval=2)
    with ExitStack() as stack:
        split = lambda name: BlockWriter(stack.enter_context(atomic_open(os.path.join(out_dir, name))), seq_len, frame)
        train, val = split('train.bin'), split('val.bin') if held_out else None
        count, tokens = 0, 0
        for count, ids in enumerate(bar, 1):
            (val if held_out and count > n_docs - val_docs else train).add(ids + [GPT2_EOS])
            tokens += len(ids) + 1
            if count % 4096 == 0:
                bar.set_postfix(tokens=f"{tokens / 1e6:.1f}M", refresh=False)
        bar.close()
        n_train = train.blocks
        n_val = val.blocks if held_out else max(1, round(n_train * val_fraction))
        n_train -= 0 if held_out else n_val
        if n_train < 1 or n_val < 1:
            raise DataError(f"the corpus gives {n_train} train and {n_val} val blocks of seq_len={seq_len}: use more "
                            f"text, fewer --val_docs or a smaller --seq_len")
    if not held_out:
        move_tail_to_val(out_dir, n_val, seq_len)
    write_meta(out_dir, dict(vocab_size=enc.n_vocab, seq_len=seq_len, tokenizer='gpt2', dataset='owt',
                             eos_id=GPT2_EOS, framed=frame, n_docs=count, val_docs=val_docs, n_files=len(files),
                             tokens=tokens, n_train=n_train, n_val=n_val))
    return out_dir


def prepare(dataset, out_dir=None, **kw):
    """dataset: 'synthetic', 'pydoc', 'text' or 'owt', written to out_dir (default data/<dataset>)."""
    makers = dict(synthetic=prepare_synthetic, pydoc=prepare_pydoc, text=prepare_text, owt=prepare_owt)
    if dataset not in makers:
        raise DataError(f"unknown dataset '{dataset}': choose one of {', '.join(makers)}")
    return makers[dataset](out_dir or os.path.join(DATA_ROOT, dataset), **kw)


def ensure_data(path_or_name):
    """A data directory's path; 'synthetic' or 'pydoc' mean data/<name>, prepared with defaults if missing."""
    if os.path.isdir(path_or_name):
        return path_or_name
    if path_or_name in ('synthetic', 'pydoc'):
        path = os.path.join(DATA_ROOT, path_or_name)
        if not os.path.isfile(os.path.join(path, 'meta.json')):
            print(f"preparing the {path_or_name} dataset in {path} (first use)")
            prepare(path_or_name, path)
        return path
    raise DataError(f"data directory '{path_or_name}' does not exist: create it with "
                    f"`python data.py --dataset synthetic --out {path_or_name}` (or pass 'synthetic' or 'pydoc')")


# -----------------------------------------------------------------------------
# Reading the format

class TokenData:
    """A prepared directory: train / val are read-only memmaps of shape (n, seq_len), uint16."""

    def __init__(self, path, meta, train, val):
        self.path, self.meta, self.train, self.val = path, meta, train, val
        self.vocab_size, self.seq_len = meta['vocab_size'], meta['seq_len']

    def batch(self, split, index):
        """Sequences number `index` (torch or numpy ints) of 'train' or 'val' -> LongTensor (len(index), seq_len)."""
        if torch.is_tensor(index):
            index = index.cpu().numpy()
        rows = getattr(self, split)[np.asarray(index)]
        return torch.from_numpy(rows.astype(np.int64))

    def language(self):
        """The SyntheticLanguage that generated this data, or None for text (built once, then kept)."""
        if self.meta['tokenizer'] != 'synthetic':
            return None
        if getattr(self, '_language', None) is None:
            self._language = SyntheticLanguage.from_meta(self.meta['language'])
        return self._language

    def decode(self, ids):
        """(B, L) or (L,) ids -> list of strings. Synthetic tokens (and 'none' tokens without a "vocab" list) are
        written as space-separated ids; ids outside the vocabulary (a leftover mask) appear as '□'."""
        ids = np.atleast_2d(torch.as_tensor(ids).cpu().numpy())
        kind = self.meta['tokenizer']
        if kind == 'synthetic' or (kind == 'none' and 'vocab' not in self.meta):
            return [' '.join(str(t) if t < self.vocab_size else '□' for t in row) for row in ids]
        if kind == 'none':
            names, sep = self.meta['vocab'], self.meta.get('separator', ' ')
            return [sep.join(names[t] if t < self.vocab_size else '□' for t in row) for row in ids]
        to_text = ((lambda run: bytes(run).decode('utf-8', errors='replace')) if kind == 'bytes'
                   else (lambda run: gpt2_encoding().decode(run)))
        in_vocab = lambda t: 0 <= t < self.vocab_size
        return [''.join(to_text(list(run)) if ok else '□' * len(list(run))
                        for ok, run in itertools.groupby(row, in_vocab)) for row in ids.tolist()]


TOKENIZERS = ('synthetic', 'bytes', 'gpt2', 'none')


def check_meta(meta, meta_path):
    """One sentence for each way a meta.json can be wrong."""
    if meta.get('tokenizer') not in TOKENIZERS:
        raise DataError(f"{meta_path} says tokenizer {meta.get('tokenizer')!r}, not one of {', '.join(TOKENIZERS)}; "
                        f"for token ids of another tokenizer write \"tokenizer\": \"none\" (and optionally a "
                        f"\"vocab\" list of strings to decode them)")
    if meta['vocab_size'] < 2 or meta['seq_len'] < 1:
        raise DataError(f"{meta_path} says vocab_size {meta['vocab_size']} and seq_len {meta['seq_len']}; both must be "
                        f"positive (vocab_size at least 2)")
    vocab = meta.get('vocab')
    if vocab is not None and (not isinstance(vocab, list) or len(vocab) != meta['vocab_size']
                              or not all(isinstance(t, str) for t in vocab)):
        raise DataError(f"{meta_path}: \"vocab\" must be a list of {meta['vocab_size']} strings (one per id), or "
                        f"left out")
    if meta['tokenizer'] == 'synthetic' and not isinstance(meta.get('language'), dict):
        raise DataError(f"{meta_path} says tokenizer 'synthetic' but has no language parameters; write it with "
                        f"`python data.py --dataset synthetic`, or use \"tokenizer\": \"none\" for your own ids")


def read_split(path, split, seq_len):
    name = os.path.join(path, f'{split}.bin')
    if not os.path.isfile(name):
        raise DataError(f"{name} is missing: prepare the directory again with `python data.py`")
    size = os.path.getsize(name)
    if size == 0 or size % (2 * seq_len):
        raise DataError(f"{name} has {size} bytes, not a positive multiple of seq_len={seq_len} uint16 tokens: "
                        f"prepare the directory again with `python data.py`")
    return np.memmap(name, dtype=np.uint16, mode='r').reshape(-1, seq_len)


def load_data(path):
    """Open a prepared directory (checks cheaply that it is what meta.json says)."""
    if not os.path.isdir(path):
        raise DataError(f"data directory '{path}' does not exist: create it with "
                        f"`python data.py --dataset synthetic --out {path}`")
    meta_path = os.path.join(path, 'meta.json')
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        vocab_size, seq_len = int(meta['vocab_size']), int(meta['seq_len'])
    except FileNotFoundError:
        raise DataError(f"{meta_path} is missing: prepare the directory with `python data.py`, or write one "
                        f"(data.py's docstring shows the form)") from None
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{meta_path} is not JSON with integer vocab_size and seq_len: prepare the directory again "
                        f"with `python data.py`, or fix the file (data.py's docstring shows the form)") from None
    meta.update(vocab_size=vocab_size, seq_len=seq_len)
    check_meta(meta, meta_path)
    check_vocab_fits(vocab_size)
    train, val = read_split(path, 'train', seq_len), read_split(path, 'val', seq_len)
    if int(train[0].max()) >= vocab_size:
        raise DataError(f"{path}/train.bin holds token ids >= vocab_size={vocab_size}: the .bin files do not "
                        f"match meta.json, prepare the directory again")
    return TokenData(path, meta, train, val)


# -----------------------------------------------------------------------------
# Command line

OPTIONS = dict(synthetic=('num_train', 'num_val', 'seed', 'language_seed', 'N', 'L', 'K', 'successors', 'floor',
                          'concentration'),
               pydoc=('seq_len', 'val_fraction'),
               text=('files', 'seq_len', 'val_fraction', 'tokenizer'),
               owt=('files', 'seq_len', 'val_fraction', 'val_docs', 'frame', 'threads', 'text_field'))


def main(argv=None):
    defaults = dict(dataset='synthetic', out='', files='', seq_len=0, val_fraction=0.05,   # seq_len 0: the default
                    num_train=200_000, num_val=2_000, seed=0, language_seed=0,           # --dataset synthetic
                    N=64, L=64, K=4, successors=4, floor=0.01, concentration=1.0,
                    val_docs=0, frame=True, threads=8, text_field='text',                # --dataset owt
                    tokenizer='gpt2')                                                    # --dataset text: or bytes
    try:
        cfg = configure(defaults, argv)
        kw = {k: cfg[k] for k in OPTIONS.get(cfg['dataset'], ()) if k != 'seq_len' or cfg['seq_len']}
        out = prepare(cfg['dataset'], cfg['out'] or None, **kw)
        d = load_data(out)  # read back what was written: the same checks every script will make
        print(f"wrote {out}: {len(d.train)} train and {len(d.val)} val sequences of {d.seq_len} tokens, "
              f"vocab {d.vocab_size} ({d.meta['tokenizer']})")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
