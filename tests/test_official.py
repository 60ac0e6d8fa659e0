"""Official SEDD / MDLM / Duo checkpoints, built here with random weights in each documented layout
(reference/checkpoints-and-eval.md), read by official.py, and checked against a forward pass written directly
from the raw tensors, so a wrong key, transposition, chunk order or head shows up as a numerical mismatch."""
import json
import math
import os
import struct
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import common
import official
import train
from common import UserError
from official import load_official

D, C, HEADS, LAYERS = 32, 16, 2, 2   # tiny: width 32, conditioning 16, 2 heads, 2 blocks


# ----------------------------------------------------------------------------------------------------------------
# Random weights with the official names, in the official order (rotary buffer included), and a reference forward

def official_weights(V, seed=0):
    """{name: tensor} in the order the official DiT registers them; every tensor random (no zero-init)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: 0.3 * torch.randn(*shape, generator=g)
    hd = D // HEADS
    w = {'vocab_embed.embedding': r(V, D),
         'sigma_map.mlp.0.weight': r(C, 256), 'sigma_map.mlp.0.bias': r(C),
         'sigma_map.mlp.2.weight': r(C, C), 'sigma_map.mlp.2.bias': r(C),
         'rotary_emb.inv_freq': 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)}
    for i in range(LAYERS):
        w.update({f'blocks.{i}.norm1.weight': 1 + r(D), f'blocks.{i}.attn_qkv.weight': r(3 * D, D),
                  f'blocks.{i}.attn_out.weight': r(D, D), f'blocks.{i}.norm2.weight': 1 + r(D),
                  f'blocks.{i}.mlp.0.weight': r(4 * D, D), f'blocks.{i}.mlp.0.bias': r(4 * D),
                  f'blocks.{i}.mlp.2.weight': r(D, 4 * D), f'blocks.{i}.mlp.2.bias': r(D),
                  f'blocks.{i}.adaLN_modulation.weight': r(6 * D, C), f'blocks.{i}.adaLN_modulation.bias': r(6 * D)})
    w.update({'output_layer.norm_final.weight': 1 + r(D), 'output_layer.linear.weight': r(V, D),
              'output_layer.linear.bias': r(V), 'output_layer.adaLN_modulation.weight': r(2 * D, C),
              'output_layer.adaLN_modulation.bias': r(2 * D)})
    return w


def parameters_in_order(w):
    """The trainable parameters in registration order: what an EMA's shadow_params list follows."""
    return [k for k in w if k != 'rotary_emb.inv_freq']


def reference_raw_logits(w, ids, sigma):
    """The DiT forward written out from the raw tensors: ids (B, L), sigma (B,) -> raw logits (B, L, V)."""
    B, L = ids.shape
    h = w['vocab_embed.embedding'][ids]                                                  # (B, L, d)
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half).float() / half)
    t = torch.cat([torch.cos(sigma[:, None] * freqs), torch.sin(sigma[:, None] * freqs)], -1)   # (B, 256)
    c = F.silu(t @ w['sigma_map.mlp.0.weight'].T + w['sigma_map.mlp.0.bias'])
    c = F.silu(c @ w['sigma_map.mlp.2.weight'].T + w['sigma_map.mlp.2.bias'])          # (B, C)
    hd = D // HEADS
    inv = 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.arange(L).float()[:, None] * inv[None]                                  # (L, hd/2)
    cos, sin = ang.cos(), ang.sin()

    def rope(x):  # (B, H, L, hd): rotate each pair (x_j, x_{j + hd/2}) by its angle
        a, b = x[..., :hd // 2], x[..., hd // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

    def norm(x, weight):
        return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5) * weight

    for i in range(LAYERS):
        p = lambda name: w[f'blocks.{i}.{name}']
        mod = (c @ p('adaLN_modulation.weight').T + p('adaLN_modulation.bias'))[:, None]  # (B, 1, 6d)
        shift1, scale1, gate1, shift2, scale2, gate2 = [mod[..., k * D:(k + 1) * D] for k in range(6)]
        x = norm(h, p('norm1.weight')) * (1 + scale1) + shift1
        qkv = (x @ p('attn_qkv.weight').T).view(B, L, 3, HEADS, hd)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))                       # (B, H, L, hd)
        att = torch.softmax(rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(hd), -1)     # non-causal
        x = (att @ v).transpose(1, 2).reshape(B, L, D) @ p('attn_out.weight').T
        h = h + gate1 * x
        x = norm(h, p('norm2.weight')) * (1 + scale2) + shift2
        x = F.gelu(x @ p('mlp.0.weight').T + p('mlp.0.bias'), approximate='tanh')
        h = h + gate2 * (x @ p('mlp.2.weight').T + p('mlp.2.bias'))
    mod = (c @ w['output_layer.adaLN_modulation.weight'].T + w['output_layer.adaLN_modulation.bias'])[:, None]
    x = norm(h, w['output_layer.norm_final.weight']) * (1 + mod[..., D:]) + mod[..., :D]
    return x @ w['output_layer.linear.weight'].T + w['output_layer.linear.bias']


# ----------------------------------------------------------------------------------------------------------------
# Writing the layouts

def write_safetensors(path, tensors):
    """The safetensors format by hand (8-byte header length, JSON header, raw little-endian float32 bytes)."""
    header, blobs, offset = {'__metadata__': {'format': 'pt'}}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().float().numpy().tobytes()
        header[name] = {'dtype': 'F32', 'shape': list(t.shape), 'data_offsets': [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    with open(path, 'wb') as f:
        f.write(struct.pack('<Q', len(text)) + text + b''.join(blobs))


def hf_folder(path, kind, V, w, fmt='safetensors', **config):
    """A Hugging Face folder of MDLM ('mdlm') or Duo ('duo'): keys under backbone., the config fields of their HF
    code."""
    os.makedirs(path, exist_ok=True)
    cfg = dict(model_type=kind, vocab_size=V, model_length=16, hidden_dim=D, cond_dim=C, n_blocks=LAYERS,
               n_heads=HEADS, dropout=0.1, time_conditioning=False if kind == 'mdlm' else True)
    cfg.update(config)
    json.dump(cfg, open(os.path.join(path, 'config.json'), 'w'))
    prefixed = {f'backbone.{k}': v for k, v in w.items()}
    if fmt == 'safetensors':
        write_safetensors(os.path.join(path, 'model.safetensors'), prefixed)
    else:
        torch.save(prefixed, os.path.join(path, 'pytorch_model.bin'))
    return str(path)


def sedd_config(V, graph='absorb', noise='loglinear'):
    return {'tokens': V - 1, 'graph': {'type': graph, 'file': 'data'}, 'noise': {'type': noise, 'sigma_min': 1e-4},
            'training': {'ema': 0.9999}, 'model': {'name': 'tiny', 'type': 'ddit', 'hidden_size': D, 'cond_dim': C,
                                                    'length': 16, 'n_blocks': LAYERS, 'n_heads': HEADS,
                                                    'scale_by_sigma': True, 'dropout': 0.1}}


SEDD_YAML = """ngpus: 8
tokens: {tokens}
training:
  batch_size: 512
  ema: 0.9999   # a comment
data:
  train: openwebtext
graph:
  type: absorb
  file: data
noise:
  type: loglinear
  sigma_min: 1e-4
sampling:
  predictor: euler
model:
  name: small
  type: ddit
  hidden_size: {d}
  cond_dim: {c}
  length: 16
  n_blocks: {layers}
  n_heads: {heads}
  scale_by_sigma: True
  dropout: 0.1
hydra:
  run:
    dir: exp_local/${{data.train}}/${{now:%Y.%m.%d}}
  callbacks:
  - name: a
    value: 3
"""


def ema_of(w, seed=5):
    """Different weights for the EMA (so a test can tell which set was loaded), as a list in parameter order."""
    shadow = official_weights(len(w['vocab_embed.embedding']), seed=seed)
    return [shadow[k] for k in parameters_in_order(w)], shadow


def sedd_run(path, V, w):
    os.makedirs(path / '.hydra')
    os.makedirs(path / 'checkpoints-meta')
    (path / '.hydra' / 'config.yaml').write_text(SEDD_YAML.format(tokens=V - 1, d=D, c=C, layers=LAYERS, heads=HEADS))
    shadow_list, shadow = ema_of(w)
    torch.save({'model': dict(w), 'ema': {'decay': 0.9999, 'num_updates': 7, 'shadow_params': shadow_list},
                'optimizer': {}, 'step': 7}, path / 'checkpoints-meta' / 'checkpoint.pth')
    return str(path), shadow


# ----------------------------------------------------------------------------------------------------------------
# The layouts load, and compute what the raw weights say

def ids_and_sigma(V, mask_id=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V - 1, (3, 7), generator=g)
    if mask_id is not None:
        ids[:, ::2] = mask_id                                             # some masked positions
    return ids, torch.tensor([0.3, 1.2, 4.0])


def test_mdlm_hugging_face_folder(tmp_path):
    V = 41
    w = official_weights(V)
    model, ckpt = official.load_model(hf_folder(tmp_path / 'mdlm', 'mdlm', V, w))
    assert ckpt['kind'] == 'official' and ckpt['teacher'] == 'mdlm' and ckpt['layout'] == 'hf'
    assert ckpt['data_meta']['vocab_size'] == V - 1 and ckpt['data_meta']['seq_len'] == 16
    cfg = model.config
    assert (cfg.head, cfg.mask_id, cfg.time_conditioning, cfg.dropout) == ('subs', V - 1, False, 0.1)
    ids, sigma = ids_and_sigma(V, mask_id=V - 1)
    with torch.no_grad():
        out = model(ids, sigma)
    raw = reference_raw_logits(w, ids, torch.zeros(3))                    # MDLM is not time-conditioned: sigma = 0
    raw[..., V - 1] = -1e6                                                # SUBS: never the mask...
    expect = raw.log_softmax(-1)
    masked = ids == V - 1
    assert torch.allclose(out[masked], expect[masked], atol=1e-4)
    unmasked = out[~masked]                                               # ...and unmasked tokens carried over
    assert torch.equal(unmasked.argmax(-1), ids[~masked]) and (unmasked.max(-1).values == 0).all()


def test_duo_pytorch_bin_drops_the_pad_id(tmp_path):
    """Duo counts GPT-2 + [PAD] in its vocabulary; with the PAD id dropped the x0 head is the log-softmax of the
    raw logits over the other ids, for ids and for soft (probability) input alike."""
    V = 41
    w = official_weights(V)
    path = hf_folder(tmp_path / 'duo', 'duo', V, w, fmt='bin')
    model, ckpt = load_official(path, pad_id=V - 1)
    N = V - 1
    assert ckpt['teacher'] == 'duo' and model.config.vocab_size == N and ckpt['data_meta']['vocab_size'] == N
    assert (model.config.head, model.config.time_conditioning) == ('x0', True)
    assert ckpt['config']['sampling_schedule'] == 'loglinear'
    objective = train.teacher_objective(train.stored_config(ckpt['config']), N)   # its NELBO and distillers' loss
    ends = objective.alpha(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))  # the Duo code's log-linear range
    assert torch.allclose(ends, torch.tensor([0.999, 0.5, 0.001], dtype=torch.float64), atol=1e-6), ends
    ids, sigma = ids_and_sigma(N)
    raw = reference_raw_logits(w, ids, sigma)
    expect = raw[..., :N].log_softmax(-1)
    with torch.no_grad():
        assert torch.allclose(model(ids, sigma), expect, atol=1e-4)
        assert torch.allclose(model(F.one_hot(ids, N).float(), sigma), expect, atol=1e-4)
    # 'auto' drops PAD only at GPT-2's size (V = 50258); a tiny vocabulary is kept whole
    model, ckpt = load_official(path)
    assert model.config.vocab_size == V and ckpt['data_meta']['tokenizer'] == 'none'


def test_sedd_hub_folder(tmp_path):
    V = 41
    w = official_weights(V)
    folder = tmp_path / 'sedd'
    folder.mkdir()
    json.dump(sedd_config(V), open(folder / 'config.json', 'w'))
    write_safetensors(folder / 'model.safetensors', w)                    # SEDD: no prefix
    model, ckpt = official.load_model(str(folder))
    assert ckpt['teacher'] == 'sedd' and model.config.head == 'sedd' and model.config.time_conditioning
    ids, sigma = ids_and_sigma(V, mask_id=V - 1)
    expect = reference_raw_logits(w, ids, sigma) - torch.log(torch.expm1(sigma))[:, None, None] - math.log(V - 1)
    expect = expect.scatter(-1, ids[..., None], 0.0)                      # the current token's log-score is 0
    with torch.no_grad():
        assert torch.allclose(model(ids, sigma), expect, atol=1e-4)


def test_sedd_run_folder_uses_the_ema_weights(tmp_path):
    V = 41
    w = official_weights(V)
    path, shadow = sedd_run(tmp_path / 'run', V, w)
    ids, sigma = ids_and_sigma(V, mask_id=V - 1)
    scaled = lambda weights: (reference_raw_logits(weights, ids, sigma) - torch.log(torch.expm1(sigma))[:, None, None]
                              - math.log(V - 1)).scatter(-1, ids[..., None], 0.0)
    model, ckpt = official.load_model(path)                                 # which='ema'
    assert ckpt['weights'] == 'ema' and ckpt['layout'] == 'sedd-run'
    with torch.no_grad():
        out = model(ids, sigma)
    assert torch.allclose(out, scaled(shadow), atol=1e-4)
    assert not torch.allclose(out, scaled(w), atol=1e-2)                  # not the raw weights
    raw_model, ckpt = official.load_model(os.path.join(path, 'checkpoints-meta', 'checkpoint.pth'), which='model')
    assert ckpt['weights'] == 'model'
    with torch.no_grad():
        assert torch.allclose(raw_model(ids, sigma), scaled(w), atol=1e-4)


def lightning_ckpt(path, V, w, config, extra_shadow=True):
    """A Lightning checkpoint as the MDLM / Duo code writes it: backbone. keys among others, the EMA's
    shadow_params in parameter order (then a learned-noise parameter that is not the backbone's)."""
    shadow_list, shadow = ema_of(w)
    state = {f'backbone.{k}': v for k, v in w.items()}
    state['metrics.valid.nll.mean_value'] = torch.tensor(0.0)             # not ours: ignored
    if extra_shadow:
        shadow_list = shadow_list + [torch.zeros(3)]
    torch.save({'state_dict': state, 'ema': {'decay': 0.9999, 'num_updates': 3, 'shadow_params': shadow_list},
                'hyper_parameters': {'config': config}, 'global_step': 3}, path)
    return str(path), shadow


def fake_omegaconf():
    """A stand-in for omegaconf's containers (entries in _content, leaf values in _val), to pickle a config that
    must later be read back without the package."""
    mod = types.ModuleType('fake_omegaconf')

    class DictConfig:
        def __init__(self, d):
            self._content = {k: DictConfig(v) if isinstance(v, dict) else AnyNode(v) for k, v in d.items()}

    class AnyNode:
        def __init__(self, v):
            self._val = v

    for cls in (DictConfig, AnyNode):                                     # picklable by name, like the real ones
        cls.__module__, cls.__qualname__ = 'fake_omegaconf', cls.__name__
    mod.DictConfig, mod.AnyNode = DictConfig, AnyNode
    return mod


def test_lightning_checkpoint_with_an_unimportable_config(tmp_path, monkeypatch):
    """Duo's .ckpt: EMA mapped onto the parameters in order, kind read from a pickled config whose package is
    not installed (the loader stubs unknown classes); its curriculum's gammas do not narrow the schedule."""
    V = 41
    w = official_weights(V)
    mod = fake_omegaconf()
    monkeypatch.setitem(sys.modules, 'fake_omegaconf', mod)
    config = mod.DictConfig({'algo': {'name': 'duo', 'parameterization': 'mean', 'time_conditioning': True,
                                      'curriculum': {'gamma_min': -3.5, 'gamma_max': -1.75}},
                             'model': {'hidden_size': D, 'cond_dim': C, 'length': 16, 'n_blocks': LAYERS,
                                       'n_heads': HEADS, 'dropout': 0.1}})
    path, shadow = lightning_ckpt(tmp_path / 'duo.ckpt', V, w, config)
    ids, sigma = ids_and_sigma(V)
    for importable in (True, False):                                      # the package installed, or not
        if not importable:
            monkeypatch.delitem(sys.modules, 'fake_omegaconf')
        model, ckpt = official.load_model(path)
        assert ckpt['teacher'] == 'duo' and ckpt['weights'] == 'ema' and ckpt['layout'] == 'lightning'
        assert (ckpt['config']['duo_gamma_min'], ckpt['config']['duo_gamma_max']) == (0.0, 0.0)
        assert ckpt['config']['duo_spacing'] == 'alpha'
        with torch.no_grad():
            out = model(ids, sigma)
        assert torch.allclose(out, reference_raw_logits(shadow, ids, sigma).log_softmax(-1), atol=1e-4)


def test_lightning_mdlm_with_a_plain_config(tmp_path):
    V = 41
    w = official_weights(V)
    config = {'parameterization': 'subs', 'time_conditioning': True, 'backbone': 'dit',
              'model': {'hidden_size': D, 'cond_dim': C, 'length': 16, 'n_blocks': LAYERS, 'n_heads': HEADS}}
    path, shadow = lightning_ckpt(tmp_path / 'mdlm.ckpt', V, w, config, extra_shadow=False)
    model, ckpt = official.load_model(path)
    assert ckpt['teacher'] == 'mdlm' and model.config.time_conditioning   # as its config says
    ids, sigma = ids_and_sigma(V, mask_id=V - 1)
    raw = reference_raw_logits(shadow, ids, sigma)
    raw[..., V - 1] = -1e6
    masked = ids == V - 1
    with torch.no_grad():
        assert torch.allclose(model(ids, sigma)[masked], raw.log_softmax(-1)[masked], atol=1e-4)


def test_lightning_ckpt_without_a_config_reads_its_head_count_from_the_rotary_table(tmp_path):
    """A bare .ckpt (no hyper_parameters) given its kind: rotary_emb.inv_freq has head_dim / 2 entries, so
    n_heads = width / head_dim (here 2 heads of 16, where the released models' 64-wide default would say 1)."""
    V = 41
    w = official_weights(V)
    shadow_list, shadow = ema_of(w)
    path = tmp_path / 'bare.ckpt'
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in w.items()}, 'ema': {'shadow_params': shadow_list}},
               path)
    one_line_user_error(path, '--teacher_kind mdlm')                      # which model it is, the file cannot say
    ids, sigma = ids_and_sigma(V)
    for kind in ('mdlm', 'duo'):
        model, ckpt = official.load_model(str(path), kind=kind)
        assert (ckpt['teacher'], model.config.n_head, ckpt['weights']) == (kind, HEADS, 'ema')
    with torch.no_grad():                                                 # duo, V = 41: no PAD to drop
        assert torch.allclose(model(ids, sigma), reference_raw_logits(shadow, ids, sigma).log_softmax(-1), atol=1e-4)


def test_official_teachers_go_through_the_samplers(tmp_path):
    import sample
    V = 41
    w = official_weights(V)
    for kind in ('mdlm', 'duo'):
        net, got, N, L, meta, schedule = sample.load_sampler(hf_folder(tmp_path / kind, kind, V, w), 'cpu')
        assert got == kind and L == 16 and schedule == 'loglinear'
        x, nfe = sample.generate(net, kind, 4, 8, 3, N, torch.Generator().manual_seed(0), progress=False)
        assert x.shape == (4, 8) and 0 <= x.min() and x.max() < N


# ----------------------------------------------------------------------------------------------------------------
# Reading the files

def test_safetensors_reader_handles_dtypes_and_offsets(tmp_path):
    tensors = {'a': torch.randn(3, 4), 'b': torch.arange(5, dtype=torch.int64), 'c': torch.randn(2).bfloat16()}
    header, blobs, offset = {}, [], 0
    codes = {torch.float32: 'F32', torch.int64: 'I64', torch.bfloat16: 'BF16'}
    for name in ('c', 'a', 'b'):                                          # data order differs from the header's
        t = tensors[name]
        raw = t.view(torch.int16).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
        header[name] = {'dtype': codes[t.dtype], 'shape': list(t.shape), 'data_offsets': [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    (tmp_path / 'x.safetensors').write_bytes(struct.pack('<Q', len(text)) + text + b''.join(blobs))
    got = official.read_safetensors(str(tmp_path / 'x.safetensors'))
    assert all(torch.equal(got[k], tensors[k]) and got[k].dtype == tensors[k].dtype for k in tensors)


def rewrite_header(path, edit):
    """Rewrite a safetensors file's JSON header with edit(header), keeping its data bytes."""
    blob = open(path, 'rb').read()
    (n,) = struct.unpack('<Q', blob[:8])
    header = json.loads(blob[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    open(path, 'wb').write(struct.pack('<Q', len(text)) + text + blob[8 + n:])


class ReadSpy:
    """A file that records the size of every binary read, to show what the reader asked for."""
    reads = []

    def __init__(self, path, mode='r', **kwargs):
        self.f, self.binary = open(path, mode, **kwargs), 'b' in mode

    def read(self, n=-1):
        if self.binary:
            ReadSpy.reads.append(n)
        return self.f.read(n)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_crafted_or_truncated_safetensors_are_refused_before_reading(tmp_path, monkeypatch):
    """A header length of 10^15, data offsets past the end (a truncated download), or a span that is not
    dtype x shape bytes long: one sentence, after reading only the 8-byte length and the header itself."""
    V = 41
    folder = hf_folder(tmp_path / 'mdlm', 'mdlm', V, official_weights(V))
    path = os.path.join(folder, 'model.safetensors')
    good = open(path, 'rb').read()
    monkeypatch.setattr(official, 'open', ReadSpy, raising=False)        # the reader's open() records its reads
    open(path, 'wb').write(struct.pack('<Q', 10 ** 15) + good[8:])
    ReadSpy.reads = []
    one_line_user_error(folder, 'header claims 1000000000000000 bytes', f'has {len(good)}', 'download it again')
    assert ReadSpy.reads == [8]
    open(path, 'wb').write(good[:-100])                                   # truncated: the last tensor runs past
    ReadSpy.reads = []
    one_line_user_error(folder, 'truncated', "'backbone.output_layer.adaLN_modulation.bias'", 'download it again')
    assert len(ReadSpy.reads) == 2 and max(ReadSpy.reads) < len(good)     # the length, the header, no tensor
    open(path, 'wb').write(good)
    rewrite_header(path, lambda h: h['backbone.vocab_embed.embedding'].update(shape=[10 ** 9, 10 ** 9]))
    one_line_user_error(folder, "'backbone.vocab_embed.embedding'", '4000000000000000000 bytes')
    open(path, 'wb').write(good)
    rewrite_header(path, lambda h: h['backbone.sigma_map.mlp.0.bias'].update(data_offsets=[0, 10 ** 15]))
    one_line_user_error(folder, "'backbone.sigma_map.mlp.0.bias'", 'claims bytes 0 to 1000000000000000')
    open(path, 'wb').write(good)
    rewrite_header(path, lambda h: h['backbone.sigma_map.mlp.0.bias'].update(data_offsets=[-8, 56]))
    one_line_user_error(folder, 'corrupt or not a safetensors file')
    monkeypatch.undo()
    open(path, 'wb').write(good)
    assert official.load_model(folder)[1]['teacher'] == 'mdlm'            # the untouched file still loads


def test_hydra_yaml_subset():
    import tempfile
    with tempfile.NamedTemporaryFile('w', suffix='.yaml', delete=False) as f:
        f.write(SEDD_YAML.format(tokens=50257, d=768, c=128, layers=12, heads=12))
    cfg = official.read_yaml(f.name)
    os.remove(f.name)
    assert cfg['tokens'] == 50257 and cfg['graph'] == {'type': 'absorb', 'file': 'data'}
    assert cfg['model']['hidden_size'] == 768 and cfg['model']['scale_by_sigma'] is True
    assert cfg['noise']['sigma_min'] == 1e-4 and cfg['training']['ema'] == 0.9999
    assert cfg['hydra']['run']['dir'] == 'exp_local/${data.train}/${now:%Y.%m.%d}'


# ----------------------------------------------------------------------------------------------------------------
# Errors: one sentence naming the problem

def one_line_user_error(path, *words, which='ema'):
    with pytest.raises(UserError) as err:
        official.load_model(str(path), which=which)
    message = str(err.value)
    assert '\n' not in message and message
    for word in words:
        assert word in message, message
    return message


def test_errors_name_the_mismatch(tmp_path):
    V = 41
    w = official_weights(V)
    # vocabulary: the config and the weights disagree
    one_line_user_error(hf_folder(tmp_path / 'vocab', 'mdlm', V, w, vocab_size=50258), 'vocabulary size 50258',
                        f'{V}')
    # width
    path = hf_folder(tmp_path / 'width', 'mdlm', V, w)
    cfg = json.load(open(os.path.join(path, 'config.json')))
    json.dump({**cfg, 'hidden_dim': 768}, open(os.path.join(path, 'config.json'), 'w'))
    one_line_user_error(path, 'width', '768', f'{D}')
    # a missing weight
    partial = {k: v for k, v in w.items() if k != 'blocks.1.mlp.2.bias'}
    one_line_user_error(hf_folder(tmp_path / 'missing', 'mdlm', V, partial), 'blocks.1.mlp.2.bias', 'lacks')
    # a weight our DiT has no place for
    extra = {**w, 'blocks.0.attn_qkv.bias': torch.zeros(3 * D)}
    one_line_user_error(hf_folder(tmp_path / 'extra', 'mdlm', V, extra), 'blocks.0.attn_qkv.bias')
    # output layer and embedding over different vocabularies
    bad = {**w, 'output_layer.linear.weight': torch.zeros(V + 1, D), 'output_layer.linear.bias': torch.zeros(V + 1)}
    one_line_user_error(hf_folder(tmp_path / 'out', 'duo', V, bad), 'output layer predicts')
    # unknown model type, unknown layout, empty folder, corrupt file
    one_line_user_error(hf_folder(tmp_path / 'bert', 'bert', V, w), "'bert'")
    (tmp_path / 'empty').mkdir()
    one_line_user_error(tmp_path / 'empty', 'none of the checkpoint layouts', 'Lightning')
    torch.save({'weights': torch.zeros(2)}, tmp_path / 'foreign.pt')
    one_line_user_error(tmp_path / 'foreign.pt', 'none of the checkpoint layouts')
    corrupt = tmp_path / 'corrupt'
    hf_folder(corrupt, 'mdlm', V, w)
    (corrupt / 'model.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": [1, 2')
    one_line_user_error(corrupt, 'corrupt', 'safetensors')
    (tmp_path / 'broken.ckpt').write_bytes(b'not a checkpoint')
    one_line_user_error(tmp_path / 'broken.ckpt', 'corrupt')
    # config.json without weights
    (tmp_path / 'noweights').mkdir()
    json.dump({'model_type': 'mdlm'}, open(tmp_path / 'noweights' / 'config.json', 'w'))
    one_line_user_error(tmp_path / 'noweights', 'model.safetensors')


def test_errors_for_what_our_model_lacks(tmp_path):
    V = 41
    w = official_weights(V)
    for graph, noise, words in (('uniform', 'loglinear', ("'uniform' graph", 'absorbing')),
                                ('absorb', 'geometric', ("'geometric'", 'log-linear'))):
        folder = tmp_path / f'{graph}-{noise}'
        folder.mkdir()
        json.dump(sedd_config(V, graph, noise), open(folder / 'config.json', 'w'))
        write_safetensors(folder / 'model.safetensors', w)
        one_line_user_error(folder, *words)
    # an EMA list that does not follow the parameter order
    config = {'parameterization': 'subs', 'model': {'n_heads': HEADS}}
    path, _ = lightning_ckpt(tmp_path / 'shuffled.ckpt', V, w, config, extra_shadow=False)
    ckpt = torch.load(path, weights_only=False)
    ckpt['ema']['shadow_params'] = ckpt['ema']['shadow_params'][::-1]
    torch.save(ckpt, path)
    one_line_user_error(path, 'not in parameter order')
    # a Lightning file whose parameterization is not a diffusion model we sample
    path, _ = lightning_ckpt(tmp_path / 'ar.ckpt', V, w, {'parameterization': 'ar'})
    one_line_user_error(path, "'ar'")
    # a teacher of the wrong kind for IDLM, caught by its own check
    with pytest.raises(UserError) as err:
        train.load_network(hf_folder(tmp_path / 'duo-teacher', 'duo', V, w), 'mdlm', None, None,
                           other_kinds=('mdlm', 'duo', 'sedd'))
    assert '--teacher duo' in str(err.value)


# ----------------------------------------------------------------------------------------------------------------
# The papers' settings as config files: every key must be an option of the script it is written for

@pytest.mark.parametrize('name', sorted(os.listdir(os.path.join(os.path.dirname(__file__), '..', 'config'))))
def test_config_files_are_accepted_by_their_scripts(name):
    import importlib
    scripts = {'idlm': 'distill_idlm', 'didi': 'distill_didi', 'mmd': 'distill_mmd', 'train': 'train', 'eval': 'eval'}
    module = importlib.import_module(scripts[name.split('_')[0]])
    path = os.path.join(os.path.dirname(__file__), '..', 'config', name)
    cfg = common.configure(module.DEFAULTS, [path])
    assert cfg['data'] == 'data/owt'
    if 'batch_size' in cfg and 'grad_accum' in cfg and name.startswith('idlm'):
        assert cfg['batch_size'] * cfg['grad_accum'] == 512                # IDLM App. F: global batch 512


@pytest.mark.parametrize('kind', ['mdlm', 'duo', 'sedd'])
def test_idlm_distills_an_official_teacher(tmp_path, kind):
    """The whole path: an official-layout teacher over the data's vocabulary, two IDLM iterations, a student
    checkpoint of our own format that samples like the teacher."""
    import distill_idlm
    import sample
    from data import prepare_synthetic
    data = str(tmp_path / 'syn')
    prepare_synthetic(data, num_train=64, num_val=16, N=8, L=8, K=2)
    V = 9 if kind != 'duo' else 8                                         # absorbing: N + mask; Duo: N
    w = official_weights(V)
    if kind == 'sedd':
        folder = tmp_path / 'teacher'
        folder.mkdir()
        config = {**sedd_config(V), 'model': {**sedd_config(V)['model'], 'length': 8}}
        json.dump(config, open(folder / 'config.json', 'w'))
        write_safetensors(folder / 'model.safetensors', w)
    else:
        folder = hf_folder(tmp_path / 'teacher', kind, V, w, model_length=8)
    out = distill_idlm.main([f'--teacher={kind}', f'--teacher_ckpt={folder}', f'--data={data}',
                             f'--out_dir={tmp_path / "student"}', '--batch_size=4', '--max_iters=2', '--warmup_iters=1',
                             '--eval_samples=0', '--log_every=1'])
    net, got, N, L, meta, schedule = sample.load_sampler(out, 'cpu')
    assert (got, N, L) == (kind, 8, 8)
    x, _ = sample.generate(net, kind, 4, L, 4, N, torch.Generator().manual_seed(0), schedule=schedule, progress=False)
    assert x.shape == (4, 8) and x.max() < N
