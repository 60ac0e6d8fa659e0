"""
Official teachers (SEDD, MDLM, Duo) read into model.py's DiT, whatever folder or file they come in.

    model, ckpt = load_model('path/to/mdlm-owt')          # an official folder or file, or a ckpt.pt of ours
    export_hf(model, ckpt, 'exported/idlm-mdlm')           # and back: a Hugging Face folder in the official layout

Layouts, as the three code bases write them:
  Hugging Face folder   config.json + model.safetensors or pytorch_model.bin (or shards listed in *.index.json).
                        MDLM (kuleshov-group/mdlm-owt) and Duo (s-sahoo/duo, duo-distilled): keys under `backbone.`,
                        config fields vocab_size, model_length, hidden_dim, cond_dim, n_blocks, n_heads, dropout,
                        time_conditioning, told apart by model_type. SEDD on the Hub (louaaron/sedd-small): keys as
                        they are, config.json is the training config (tokens, graph, noise, model.hidden_size, ...).
  SEDD run folder       .hydra/config.yaml + checkpoints-meta/checkpoint.pth = {model, ema, optimizer, step}.
  Lightning .ckpt       (MDLM and Duo code) state_dict under `backbone.`; hyper_parameters.config says which model.
The EMA weights are used when the file has them (which='ema'): SEDD and Lightning keep them as
ema['shadow_params'], a list in the order of the trainable parameters, i.e. of the state dict's names without
its buffer rotary_emb.inv_freq. Hugging Face folders hold one set of weights.

Our vocabulary convention (data.py, losses.py): N real tokens; an absorbing model adds its mask as id N (V = N + 1),
a uniform model has V = N. The official models all have V = 50258:
  MDLM, SEDD   GPT-2's 50257 tokens + the mask at id 50257: N = 50257, mask_id = 50257, our convention exactly.
  Duo          GPT-2's 50257 tokens + the [PAD] the Duo code adds to the tokenizer, its uniform process running
               over all 50258 ids. We drop PAD's row of the embedding and column of the output layer, so N = 50257
               like the data, the other teachers and the GPT-2 judge: the uniform noise never draws PAD (its prior
               moves by 1/50258 in total variation) and x0_hat is renormalised without PAD, which never occurs in
               OpenWebText. A sampler over all 50258 ids could write a token no tokenizer decodes.
Sampling: MDLM ignores sigma; SEDD is fed sigma_bar; Duo is fed -log alpha_t and samples on the log-linear
alpha grid (the Duo code's sampler), which ckpt['config']['sampling_schedule'] tells sample.load_sampler.

Every problem is one CheckpointError sentence (a common.UserError) naming what is wrong and what to do. Nothing
is trusted before it is checked: pickles (.ckpt, .pth, .bin) are read without running code from them (torch's
weights-only loader, or for Lightning's hyper-parameters an unpickler that makes every class it names an inert
stub), and a safetensors header is checked against the file's size before a byte of tensor data is read.
"""

import json
import math
import os
import pickle
import re
import struct
import types
from dataclasses import asdict

import torch

import common
from model import DiT, DiTConfig

GPT2_VOCAB = 50257          # GPT-2's tokens; every official teacher adds one id to it
HEADS = {'mdlm': 'subs', 'duo': 'x0', 'sedd': 'sedd'}
BUFFERS = ('rotary_emb.inv_freq',)  # official state dicts may carry it; ours recomputes it (checked, then dropped)


class CheckpointError(common.UserError):
    """A checkpoint that cannot be read into our DiT; the message is one sentence with the fix."""


# ----------------------------------------------------------------------------------------------------------------
# Which layout is this?

def detect_layout(path):
    """'hf' | 'sedd-run' | 'lightning' for an official layout, 'ours' for a checkpoint this project wrote,
    None for anything else (including a path that does not exist)."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, 'ckpt.pt')):
            return 'ours'
        if os.path.isfile(os.path.join(path, 'config.json')):
            return 'hf'
        if os.path.isfile(os.path.join(path, '.hydra', 'config.yaml')):
            return 'sedd-run'
        return None
    if os.path.isfile(path):
        if path.endswith('.ckpt'):
            return 'lightning'
        if os.path.basename(os.path.dirname(os.path.abspath(path))) == 'checkpoints-meta':
            return 'sedd-run'   # the run's checkpoints-meta/checkpoint.pth itself
        return 'ours'
    return None


LAYOUTS = ("this project's ckpt.pt (train one with python train.py), a folder with config.json and "
           "model.safetensors or pytorch_model.bin (Hugging Face), a SEDD run folder with .hydra/config.yaml and "
           "checkpoints-meta/checkpoint.pth, or a Lightning .ckpt file")


def unknown_layout(path):
    return CheckpointError(f"{path} is none of the checkpoint layouts this project reads: {LAYOUTS}")


# ----------------------------------------------------------------------------------------------------------------
# Reading files: safetensors (no package needed), torch pickles, the YAML subset Hydra writes

SAFETENSORS_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
                      'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8,
                      'U8': torch.uint8, 'BOOL': torch.bool}


def read_safetensors(path):
    """A .safetensors file -> {name: tensor}, without the `safetensors` package. The format: an 8-byte
    little-endian header length n, a JSON header {name: {dtype, shape, data_offsets: [begin, end]}}, then the raw
    little-endian bytes, offsets counted from the end of the header. As the safetensors library does, every length
    and offset is checked against the file's size before anything is read, so a truncated or crafted file is
    refused instead of allocating what it claims."""
    try:
        with open(path, 'rb') as f:
            size = os.fstat(f.fileno()).st_size
            (n,) = struct.unpack('<Q', f.read(8))
            if n > size - 8:
                raise CheckpointError(f"{path} is truncated or not a safetensors file: its header claims {n} bytes "
                                      f"but the whole file has {size}; download it again")
            spans = safetensors_spans(json.loads(f.read(n)), size - 8 - n, path)
            tensors = {}
            for name, (dtype, shape, begin, end) in spans.items():
                f.seek(8 + n + begin)
                raw = bytearray(f.read(end - begin))
                flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
                tensors[name] = flat.reshape(shape)
            return tensors
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, struct.error) as e:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file ({type(e).__name__}); download it "
                              f"again") from None


def safetensors_spans(header, data_size, path):
    """{name: (dtype, shape, begin, end)} from a safetensors header, each span checked to lie within the data
    and to be exactly dtype x shape bytes long."""
    spans = {}
    for name, info in header.items():
        if name == '__metadata__':
            continue
        dtype, shape, (begin, end) = SAFETENSORS_DTYPES[info['dtype']], info['shape'], info['data_offsets']
        if not all(type(v) is int and v >= 0 for v in [*shape, begin, end]):
            raise ValueError(f"bad shape or offsets for {name}")
        nbytes = math.prod(shape) * dtype.itemsize
        if not begin <= end <= data_size or end - begin != nbytes:
            raise CheckpointError(f"{path} is truncated or corrupt: tensor {name!r} ({info['dtype']} {shape}, "
                                  f"{nbytes} bytes) claims bytes {begin} to {end} of the {data_size} the file holds; "
                                  f"download it again")
        spans[name] = (dtype, shape, begin, end)
    return spans


class _Stub:
    """Stands in, while unpickling, for every class or function that is not a tensor's building block (omegaconf,
    lightning, transformers in a Lightning checkpoint's hyper_parameters, or anything a crafted file names): it
    keeps whatever pickle hands it and runs nothing."""

    def __init__(self, *args, **kwargs):
        self._args, self._state, self._items = args, None, {}

    def __setstate__(self, state):
        self._state = state

    def __setitem__(self, key, value):   # dict subclasses are rebuilt item by item
        self._items[key] = value

    def append(self, value):             # list subclasses too
        self._items[len(self._items)] = value

    def extend(self, values):
        for v in values:
            self.append(v)


_STUBS = {}


def _safe_globals():
    """What torch.load(weights_only=True) lets a pickle name: tensors, storages, dtypes, OrderedDict and the like."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
        return dict(_get_allowed_globals())
    except ImportError:   # an older or newer torch without it: the tensor rebuilders are enough for a state dict
        import collections
        import torch._utils
        return {'collections.OrderedDict': collections.OrderedDict,
                'torch._utils._rebuild_tensor_v2': torch._utils._rebuild_tensor_v2,
                'torch._utils._rebuild_parameter': torch._utils._rebuild_parameter}


class _TolerantUnpickler(pickle.Unpickler):
    """Reads a Lightning checkpoint without importing or calling anything it names beyond tensors' building
    blocks: every other global becomes a _Stub, so a pickled callable (a crafted file) is inert."""
    allowed = None

    def find_class(self, module, name):
        if _TolerantUnpickler.allowed is None:
            _TolerantUnpickler.allowed = _safe_globals()
        if f"{module}.{name}" in self.allowed:
            return self.allowed[f"{module}.{name}"]
        if (module, name) not in _STUBS:
            _STUBS[module, name] = type(name, (_Stub,), {'__module__': module})
        return _STUBS[module, name]


_tolerant_pickle = types.SimpleNamespace(Unpickler=_TolerantUnpickler, __name__='official_tolerant_pickle',
                                         load=lambda f, **kw: _TolerantUnpickler(f, **kw).load())


def torch_load(path, tolerant=False):
    """torch.load on CPU that never runs code from the file, with one clear sentence for a missing or corrupt file:
    weights_only=True, or with tolerant every global beyond tensors' building blocks becomes an inert stub
    (Lightning checkpoints pickle omegaconf / transformers objects we neither need nor import)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist; check the path of the official checkpoint")
    try:
        if tolerant:
            return torch.load(path, map_location='cpu', weights_only=False, pickle_module=_tolerant_pickle)
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path} is corrupt or not a PyTorch checkpoint ({type(e).__name__}); download it "
                              f"again") from None


def plain(obj):
    """An unpickled config as plain dicts, lists and values: dicts, omegaconf's DictConfig / ListConfig (real, or
    stubs when omegaconf is not installed), which keep a container's entries in `_content` and a leaf's value in
    `_val`. Values are taken as stored, interpolations unresolved."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    state = obj._state if isinstance(obj, _Stub) else getattr(obj, '__dict__', None)
    if isinstance(state, dict) and '_content' in state:
        return plain(state['_content'])
    if isinstance(state, dict) and '_val' in state:
        return plain(state['_val'])
    if isinstance(obj, _Stub) and obj._items:
        return {k: plain(v) for k, v in obj._items.items()}
    return None


def _scalar(text):
    """A YAML scalar: quoted string, null, bool, int, float, or the text itself."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in '\'"':
        return text[1:-1]
    lowered = text.lower()
    if lowered in ('null', '~', ''):
        return None
    if lowered in ('true', 'false'):
        return lowered == 'true'
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def read_yaml(path):
    """The block-style YAML that Hydra writes (.hydra/config.yaml), read as nested `key: value` mappings by
    indentation. List items (`- ...`) are skipped: the fields this loader needs are never lists, and PyYAML is
    not a dependency of this project."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist; a SEDD run folder needs its .hydra/config.yaml")
    root = {}
    stack = [(-1, root)]                                     # (indent, mapping) of the open mappings
    with open(path, encoding='utf-8') as f:
        for line in f:
            text = line.split(' #', 1)[0].rstrip()
            body = text.strip()
            if not body or body.startswith('#') or body.startswith('- ') or body == '-':
                continue
            indent = len(text) - len(text.lstrip())
            while stack[-1][0] >= indent:
                stack.pop()
            match = re.match(r'^([^:]+):(?:\s+(.*))?$', body)
            if not match:
                continue
            key, value = match.group(1).strip(), match.group(2)
            if value is None or value == '':
                stack[-1][1][key] = child = {}
                stack.append((indent, child))
            else:
                stack[-1][1][key] = _scalar(value)
    return root


def read_weights(folder):
    """The weights of a Hugging Face folder: model.safetensors, pytorch_model.bin, or the shards listed by
    model.safetensors.index.json / pytorch_model.bin.index.json. -> {name: tensor}"""
    for name in ('model.safetensors', 'pytorch_model.bin'):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return read_weights_file(path)
        if os.path.isfile(path + '.index.json'):
            try:
                with open(path + '.index.json') as f:
                    shards = sorted(set(json.load(f)['weight_map'].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise CheckpointError(f"{path}.index.json is corrupt; download the folder again") from None
            return {k: v for shard in shards for k, v in read_weights_file(os.path.join(folder, shard)).items()}
    raise CheckpointError(f"{folder} has a config.json but no model.safetensors or pytorch_model.bin; download the "
                          f"weights into the same folder")


def read_weights_file(path):
    """One weights file: safetensors, or a pickled state dict of tensors."""
    if path.endswith('.safetensors'):
        return read_safetensors(path)
    state = torch_load(path)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a plain state dict of tensors; point to the model's weights file")
    return state


# ----------------------------------------------------------------------------------------------------------------
# The three layouts -> (kind, architecture fields from the config, weights, EMA list or None, extra config)

def _first(cfg, *names):
    """The first of several config field names that is present (the three code bases name things differently)."""
    for n in names:
        if isinstance(cfg, dict) and cfg.get(n) is not None:
            return cfg[n]
    return None


def _sedd_arch(cfg, where):
    """Architecture fields of a SEDD training config; refuses what our 'sedd' head cannot represent."""
    graph, noise, model = cfg.get('graph') or {}, cfg.get('noise') or {}, cfg.get('model') or {}
    if graph.get('type', 'absorb') != 'absorb':
        raise CheckpointError(f"{where} is a SEDD model with the {graph.get('type')!r} graph; our 'sedd' head and "
                              f"samplers implement the absorbing graph only, so use an absorbing SEDD checkpoint")
    if str(noise.get('type', 'loglinear')).replace('-', '') != 'loglinear':
        raise CheckpointError(f"{where} uses the {noise.get('type')!r} noise schedule; our losses and samplers use "
                              f"the log-linear one, so use a SEDD checkpoint trained with noise.type=loglinear")
    if model.get('scale_by_sigma') is False:
        raise CheckpointError(f"{where} has scale_by_sigma False; our 'sedd' head always scales the scores by sigma, "
                              f"so use a checkpoint trained with model.scale_by_sigma=True")
    tokens = cfg.get('tokens')
    return dict(vocab_size=None if tokens is None else int(tokens) + 1, width=model.get('hidden_size'),
                cond_dim=model.get('cond_dim'), n_layer=model.get('n_blocks'), n_head=model.get('n_heads'),
                seq_len=model.get('length'), dropout=model.get('dropout'))


def read_hf(folder):
    try:
        with open(os.path.join(folder, 'config.json')) as f:
            cfg = json.load(f)
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{folder}/config.json is not valid JSON; download it again") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{folder}/config.json is not a JSON object; download it again")
    extra = cfg.get('project') if isinstance(cfg.get('project'), dict) else {}   # written by export_hf below
    if isinstance(cfg.get('model'), dict) and 'graph' in cfg:   # SEDD's Hub mixin saves its training config
        return 'sedd', _sedd_arch(cfg, folder), read_weights(folder), None, extra
    model_type = str(cfg.get('model_type', '')).lower()
    if model_type not in ('mdlm', 'duo'):
        raise CheckpointError(f"{folder}/config.json has model_type {cfg.get('model_type')!r}; this loader knows "
                              f"'mdlm' and 'duo' Hugging Face folders and SEDD Hub folders")
    if cfg.get('causal') or cfg.get('causal_attention'):
        raise CheckpointError(f"{folder} holds a causal (autoregressive) model; load an MDLM or Duo diffusion model")
    arch = dict(vocab_size=cfg.get('vocab_size'), width=_first(cfg, 'hidden_dim', 'hidden_size', 'd_model'),
                cond_dim=cfg.get('cond_dim'), n_layer=_first(cfg, 'n_blocks', 'num_hidden_layers'),
                n_head=_first(cfg, 'n_heads', 'num_attention_heads'), seq_len=_first(cfg, 'model_length', 'length'),
                dropout=cfg.get('dropout'), time_conditioning=cfg.get('time_conditioning'))
    return model_type, arch, read_weights(folder), None, extra


def read_sedd_run(path):
    root = path if os.path.isdir(path) else os.path.dirname(os.path.dirname(os.path.abspath(path)))
    cfg = read_yaml(os.path.join(root, '.hydra', 'config.yaml'))
    state = torch_load(os.path.join(root, 'checkpoints-meta', 'checkpoint.pth'))
    if not isinstance(state, dict) or 'model' not in state:
        raise CheckpointError(f"{root}/checkpoints-meta/checkpoint.pth has no 'model' entry; point to a SEDD run "
                              f"folder written by its run_train.py")
    ema = state['ema'].get('shadow_params') if isinstance(state.get('ema'), dict) else None
    return 'sedd', _sedd_arch(cfg, root), state['model'], ema, {}


def _lightning_kind(cfg, path):
    """MDLM code: config.parameterization; Duo code: config.algo.parameterization (and algo.name)."""
    algo = cfg.get('algo') if isinstance(cfg.get('algo'), dict) else {}
    param = algo.get('parameterization') or cfg.get('parameterization')
    kinds = {'subs': 'mdlm', 'mean': 'duo', 'sedd': 'sedd', 'score': 'sedd'}
    if param not in kinds:
        raise CheckpointError(f"{path} holds a {param or 'model of unknown parameterization'!r}; this loader reads "
                              f"MDLM (subs), Duo (mean) and SEDD (score) diffusion models")
    return kinds[param], algo


def read_lightning(path, kind=None):
    """kind: what the caller knows the file holds ('mdlm' | 'duo' | 'sedd'), needed when it has no readable
    hyper_parameters; the architecture then comes from the weight shapes (dit_config)."""
    ckpt = torch_load(path, tolerant=True)
    if not isinstance(ckpt, dict) or 'state_dict' not in ckpt:
        raise CheckpointError(f"{path} has no state_dict; point to a .ckpt written by the MDLM or Duo code")
    cfg = plain((ckpt.get('hyper_parameters') or {}).get('config'))
    if not isinstance(cfg, dict):
        if kind not in HEADS:
            raise CheckpointError(f"{path} has no readable hyper_parameters.config, so which model it holds is "
                                  f"unknown; say it with --teacher_kind mdlm or --teacher_kind duo (the distillers "
                                  f"take it from --teacher)")
        cfg = {'algo': {'parameterization': {'mdlm': 'subs', 'duo': 'mean', 'sedd': 'score'}[kind]}}
    kind, algo = _lightning_kind(cfg, path)
    weights = {k[len('backbone.'):]: v for k, v in ckpt['state_dict'].items() if k.startswith('backbone.')}
    ema = ckpt['ema'].get('shadow_params') if isinstance(ckpt.get('ema'), dict) else None
    model = cfg.get('model') or {}
    if model.get('scale_by_sigma') is False and kind == 'sedd':
        raise CheckpointError(f"{path} has scale_by_sigma False; our 'sedd' head always scales the scores by sigma")
    timed = algo.get('time_conditioning', cfg.get('time_conditioning'))
    arch = dict(vocab_size=None, width=model.get('hidden_size'), cond_dim=model.get('cond_dim'),
                n_layer=model.get('n_blocks'), n_head=model.get('n_heads'), seq_len=model.get('length'),
                dropout=model.get('dropout'), time_conditioning=timed)
    return kind, arch, weights, ema, {}


# ----------------------------------------------------------------------------------------------------------------
# Weights -> DiT

def dit_config(kind, arch, state, where):
    """DiTConfig from the weight shapes, checked against what the config file says."""
    for key in ('vocab_embed.embedding', 'sigma_map.mlp.0.weight', 'output_layer.linear.weight'):
        if key not in state:
            raise CheckpointError(f"{where} has no weight {key!r} (with or without the backbone. prefix); it is not "
                                  f"an SEDD/MDLM/Duo DiT checkpoint")
    V, d = state['vocab_embed.embedding'].shape                       # (V, d)
    C = state['sigma_map.mlp.0.weight'].shape[0]                      # (C, 256)
    n_layer = len({int(m.group(1)) for k in state for m in [re.match(r'blocks\.(\d+)\.', k)] if m})
    found = dict(vocab_size=V, width=d, cond_dim=C, n_layer=n_layer)
    names = dict(vocab_size='vocabulary size', width='width (hidden size)', cond_dim='conditioning width',
                 n_layer='number of blocks')
    for field, value in found.items():
        said = arch.get(field)
        if said is not None and int(said) != value:
            raise CheckpointError(f"{where}: the config says {names[field]} {said} but the weights have {value}; "
                                  f"the config and the weights come from different models, download them together")
    if state['output_layer.linear.weight'].shape[0] != V:
        raise CheckpointError(f"{where}: the embedding has {V} rows but the output layer predicts "
                              f"{state['output_layer.linear.weight'].shape[0]} tokens; the file is inconsistent")
    n_head = arch.get('n_head')
    inv_freq = state.get('rotary_emb.inv_freq')
    if not n_head and inv_freq is not None and inv_freq.numel():
        n_head = max(1, d // (2 * inv_freq.numel()))   # no config: the rotary table has head_dim / 2 entries
    n_head = n_head or max(1, d // 64)                 # nor a table: the released models' 64-wide heads
    if d % int(n_head) or (d // int(n_head)) % 2:
        raise CheckpointError(f"{where}: width {d} does not split into {n_head} heads of even size; fix n_heads")
    timed = {'mdlm': bool(arch.get('time_conditioning') or False), 'duo': True, 'sedd': True}[kind]
    return DiTConfig(vocab_size=V, seq_len=int(arch.get('seq_len') or 1024), n_embd=d, n_layer=n_layer,
                     n_head=int(n_head), cond_dim=C, dropout=float(arch.get('dropout') or 0.0), head=HEADS[kind],
                     mask_id=V - 1 if kind in ('mdlm', 'sedd') else -1, time_conditioning=timed)


def strip_prefix(weights):
    """MDLM and Duo keep the DiT under `backbone.`; SEDD has no prefix. -> {our key: tensor}"""
    if any(k.startswith('backbone.') for k in weights):
        weights = {k[len('backbone.'):]: v for k, v in weights.items() if k.startswith('backbone.')}
    return dict(weights)


def check_names(state, model, where):
    """Every weight of our DiT present, nothing unknown left over (a part our model lacks is an error)."""
    ours = model.state_dict()
    missing = [k for k in ours if k not in state]
    extra = [k for k in state if k not in ours and k not in BUFFERS]
    if missing:
        raise CheckpointError(f"{where} lacks {len(missing)} weight(s) our DiT needs, e.g. {missing[:3]}; it is "
                              f"truncated or not an SEDD/MDLM/Duo DiT checkpoint")
    if extra:
        raise CheckpointError(f"{where} has {len(extra)} weight(s) our DiT has no place for, e.g. {extra[:3]}; this "
                              f"architecture differs from the SEDD/MDLM/Duo DiT (model.py)")


def check_shapes(state, model, where):
    for k, v in model.state_dict().items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{where}: weight {k} has shape {tuple(state[k].shape)} where our DiT expects "
                                  f"{tuple(v.shape)}; check n_heads and the widths in its config")


def check_rotary(state, cfg, where):
    """A stored rotary table must be ours: base 1e4 over head_dim = d / n_head (it tells n_head was right)."""
    if 'rotary_emb.inv_freq' in state:
        hd = cfg.n_embd // cfg.n_head
        ours = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        theirs = state['rotary_emb.inv_freq'].float()
        if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-4):
            raise CheckpointError(f"{where} stores rotary frequencies for another head width than {hd} (n_heads "
                                  f"{cfg.n_head}); fix n_heads in its config")


def with_ema(state, shadow, model, where):
    """Put EMA shadow params in place of the raw weights. shadow is a list in the order of the official model's
    trainable parameters = the order of the state dict's keys without buffers (further entries, e.g. a learned
    noise schedule after the backbone, are ignored). Shapes are checked one by one."""
    params = {name for name, _ in model.named_parameters()}
    order = [k for k in state if k in params]                            # the official parameter order
    if len(shadow) < len(order):
        raise CheckpointError(f"{where} has {len(shadow)} EMA shadow params for {len(order)} parameters; the EMA "
                              f"does not belong to these weights, load with which='model' or fix the file")
    state = dict(state)
    for name, tensor in zip(order, shadow):
        if tuple(tensor.shape) != tuple(state[name].shape):
            raise CheckpointError(f"{where}: EMA shadow param for {name} has shape {tuple(tensor.shape)}, not "
                                  f"{tuple(state[name].shape)}; the EMA list is not in parameter order")
        state[name] = tensor
    return state


def drop_duo_pad(state, V, pad_id):
    """Remove Duo's [PAD] id from the embedding and the output layer: V = N = 50257 (module docstring)."""
    keep = torch.tensor([i for i in range(V) if i != pad_id])
    state = dict(state)
    for key in ('vocab_embed.embedding', 'output_layer.linear.weight', 'output_layer.linear.bias'):
        state[key] = state[key][keep]
    return state


def load_official(path, which='ema', pad_id='auto', kind=None):
    """Read an official SEDD / MDLM / Duo checkpoint into model.py's DiT (see the module docstring).

    which: 'ema' takes the EMA weights when the file has them, 'model' the raw ones. pad_id (Duo only): the id
    dropped from Duo's vocabulary; 'auto' = 50257 when V = 50258 (GPT-2 + [PAD]), else none. kind: the model kind,
    for a Lightning .ckpt that does not say (no hyper_parameters).
    Returns (model in eval mode, a checkpoint-like dict): 'kind' 'official', 'teacher' mdlm | duo | sedd,
    'config' (what train.py's config would say: teacher, Duo's gammas, the sampling schedule, an evaluation
    batch), 'model_config', 'data_meta' {'vocab_size': N real tokens, 'seq_len', 'tokenizer', ...}."""
    layout = detect_layout(path)
    readers = {'hf': read_hf, 'sedd-run': read_sedd_run, 'lightning': lambda p: read_lightning(p, kind)}
    if layout not in readers:
        raise unknown_layout(path)
    kind, arch, weights, shadow, extra = readers[layout](path)
    state = strip_prefix(weights)
    cfg = dit_config(kind, arch, state, path)
    pad = None
    if kind == 'duo':
        pad = (cfg.vocab_size - 1 if cfg.vocab_size == GPT2_VOCAB + 1 else None) if pad_id == 'auto' else pad_id
    model = DiT(cfg if pad is None else DiTConfig(**{**asdict(cfg), 'vocab_size': cfg.vocab_size - 1}))
    check_names(state, model, path)
    check_rotary(state, cfg, path)
    used = 'model'
    if which == 'ema' and shadow is not None:
        state, used = with_ema(state, shadow, model, path), 'ema'
    state = {k: v for k, v in state.items() if k not in BUFFERS}
    if pad is not None:
        state = drop_duo_pad(state, cfg.vocab_size, pad)
    check_shapes(state, model, path)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    cfg = model.config
    N = cfg.vocab_size - 1 if kind in ('mdlm', 'sedd') else cfg.vocab_size
    duo = kind == 'duo'
    config = {'teacher': kind, 'model': 'official', 'batch_size': 8,   # 8: an evaluation batch that fits at V = 50k
              'duo_gamma_min': extra.get('duo_gamma_min', 0.0), 'duo_gamma_max': extra.get('duo_gamma_max', 0.0)}
    if duo and 'duo_spacing' in extra:               # a Duo model this project exported keeps its own schedule
        config['duo_spacing'] = extra['duo_spacing']
    elif duo:
        # The Duo code's curriculum gammas bound only its first iterations; after them, and in every validation
        # NELBO, it runs the log-linear schedule over the whole range (DUO.nll: use_true_nll): alpha_t linear in t,
        # which is our DuoObjective spaced in alpha between its default ends (alpha 0.999 -> 0.001).
        config.update(duo_spacing='alpha', sampling_schedule='loglinear')
    gpt2 = N == GPT2_VOCAB
    data_meta = extra.get('data_meta') or {
        'vocab_size': N, 'seq_len': cfg.seq_len, 'dataset': 'official',
        # a vocabulary that is not GPT-2's has no tokenizer here: samples are written as ids
        'tokenizer': 'gpt2' if gpt2 else 'none', 'eos_id': GPT2_VOCAB - 1 if gpt2 else None}
    ckpt = {'kind': 'official', 'teacher': kind, 'layout': layout, 'path': os.path.abspath(path), 'weights': used,
            'config': config, 'model_config': asdict(cfg), 'data_meta': data_meta}
    return model.eval(), ckpt


def load_model(path, which='ema', kind=None):
    """A DiT from one of our checkpoints, or from an official SEDD / MDLM / Duo checkpoint in any layout above.
    which='ema' takes the averaged weights when the file has them; kind ('mdlm' | 'duo' | 'sedd') says which model
    an official file holds when it does not say itself (a Lightning .ckpt without hyper_parameters).
    -> (model, checkpoint dict); an official one gets the same 'teacher', 'config', 'model_config' and 'data_meta'
    entries as ours, so every script takes either."""
    layout = detect_layout(path)
    if layout is None and os.path.isdir(path):
        raise unknown_layout(path)
    if layout not in (None, 'ours'):
        return load_official(path, which, kind=kind)
    ckpt = common.load_checkpoint(path)
    if not isinstance(ckpt, dict) or 'model_config' not in ckpt or 'model' not in ckpt:
        raise unknown_layout(path)
    try:
        model = DiT(DiTConfig(**ckpt['model_config']))
        model.load_state_dict(ckpt['ema'] if which == 'ema' and ckpt.get('ema') else ckpt['model'])
    except (TypeError, ValueError, RuntimeError, ZeroDivisionError, AttributeError) as e:
        raise common.UserError(f"checkpoint {path} has a model_config or weights that do not make a DiT "
                               f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); it is damaged or was not "
                               f"written by this project: re-create it") from None
    return model, ckpt


# ----------------------------------------------------------------------------------------------------------------
# Writing the Hugging Face layout: a student or teacher of this project, shared as the official models are

TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def write_safetensors(path, tensors):
    """{name: tensor} -> a .safetensors file: 8-byte little-endian header length, the JSON header, the raw
    little-endian bytes of every tensor in header order. Written to a temporary name, then renamed."""
    header, offset, blobs = {}, 0, []
    for name, tensor in tensors.items():
        data = tensor.detach().cpu().contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b''
        header[name] = {'dtype': TORCH_TO_SAFETENSORS[data.dtype], 'shape': list(data.shape),
                        'data_offsets': [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode('utf-8')
    text += b' ' * (-len(text) % 8)                    # the format pads the header to a multiple of 8 bytes
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, 'wb') as f:
        f.write(struct.pack('<Q', len(text)) + text)
        f.writelines(blobs)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def export_hf(model, ckpt, folder):
    """Write `model` (a DiT of this project, with its checkpoint dict) as a Hugging Face folder in the official
    layout, config.json + model.safetensors, that load_official (and the MDLM / Duo code, for MDLM and Duo) reads:
      mdlm, duo  keys under `backbone.`, config fields model_type, vocab_size, model_length, hidden_dim, cond_dim,
                 n_blocks, n_heads, dropout, time_conditioning;
      sedd       keys as they are, config.json as SEDD's Hub folder (tokens, graph, noise, model.*).
    A 'project' entry keeps what the official layout has no field for (the data's meta, Duo's schedule), so this
    project reads its own export back unchanged. -> folder"""
    kind, cfg = ckpt['teacher'], model.config
    if kind not in HEADS:
        raise CheckpointError(f"a {kind!r} model has no official Hugging Face layout; export an mdlm, duo or sedd "
                              f"model")
    os.makedirs(folder, exist_ok=True)
    project = {'data_meta': ckpt.get('data_meta'), 'source': 'few-step distillation (this project)'}
    if kind == 'duo':
        config = ckpt.get('config', {})
        project.update({k: config[k] for k in ('duo_gamma_min', 'duo_gamma_max') if k in config},
                       duo_spacing=config.get('duo_spacing', 'gamma'))
    if kind == 'sedd':
        config = {'tokens': cfg.vocab_size - 1, 'graph': {'type': 'absorb'}, 'noise': {'type': 'loglinear'},
                  'model': {'hidden_size': cfg.n_embd, 'cond_dim': cfg.cond_dim, 'length': cfg.seq_len,
                            'n_blocks': cfg.n_layer, 'n_heads': cfg.n_head, 'scale_by_sigma': True,
                            'dropout': cfg.dropout}, 'project': project}
        weights = dict(model.state_dict())
    else:
        config = {'model_type': kind, 'vocab_size': cfg.vocab_size, 'model_length': cfg.seq_len,
                  'hidden_dim': cfg.n_embd, 'cond_dim': cfg.cond_dim, 'n_blocks': cfg.n_layer, 'n_heads': cfg.n_head,
                  'dropout': cfg.dropout, 'time_conditioning': cfg.time_conditioning, 'project': project}
        weights = {f'backbone.{k}': v for k, v in model.state_dict().items()}
    write_safetensors(os.path.join(folder, 'model.safetensors'), weights)
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump(config, f, indent=2)
    return folder
