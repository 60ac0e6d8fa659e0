"""
GPT-2 in plain torch, as the judge of generative perplexity on real text (both papers: GPT-2 Large, L = 1024).

    judge = GPT2Judge(load_gpt2('path/to/gpt2-large'))     # a local Hugging Face folder, no `transformers` needed
    judge.genppl(x)                                         # x (B, L) GPT-2 token ids sampled by a diffusion model

The network (Radford et al. 2019): learned token and position embeddings, n_layer pre-LayerNorm blocks
    h += c_proj(causal_attention(c_attn(ln_1(h))))         h += c_proj(gelu_tanh(c_fc(ln_2(h))))
then ln_f and logits = h @ wte^T (the output layer is tied to the token embedding). Hugging Face stores c_attn,
c_proj and c_fc as Conv1D weights of shape [in, out]; nn.Linear keeps [out, in], so they are transposed on load.

The protocol (the Duo code's evaluation, which IDLM and DiDi follow): decode the sampled ids to text, re-tokenise
the text with GPT-2's BPE (data.gpt2_encoding), truncate to 1024 tokens, and score each token from the ones before
it (the first token has no context and is not scored). An EOS counts only the first time it appears in a sample;
later EOS do not (nor padding, which this code never scores at all).
GenPPL = exp(sum of the counted NLLs / number of counted tokens), over all samples together.
"""

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import GPT2_EOS, gpt2_encoding
from official import CheckpointError, read_weights


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 1280          # the defaults are GPT-2 Large (774M): 36 blocks of width 1280, 20 heads
    n_layer: int = 36
    n_head: int = 20
    layer_norm_epsilon: float = 1e-5


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)                                     # 1/sqrt(hd)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, d))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(cfg.n_embd, 4 * cfg.n_embd),
                                      c_proj=nn.Linear(4 * cfg.n_embd, cfg.n_embd)))

    def forward(self, h):
        h = h + self.attn(self.ln_1(h))
        x = F.gelu(self.mlp['c_fc'](self.ln_2(h)), approximate='tanh')   # HF's "gelu_new"
        return h + self.mlp['c_proj'](x)


class GPT2(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)

    def forward(self, ids):
        """ids (B, T), T <= n_positions -> next-token logits (B, T, V): position i predicts token i + 1."""
        T = ids.shape[1]
        h = self.wte(ids) + self.wpe(torch.arange(T, device=ids.device))[None]
        for block in self.h:
            h = block(h)
        return self.ln_f(h) @ self.wte.weight.T      # tied output layer


# ----------------------------------------------------------------------------------------------------------------
# Loading a Hugging Face folder

CONV1D = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')


def hf_to_ours(weights):
    """Hugging Face GPT-2 names -> ours: drop the `transformer.` prefix and the causal-mask buffers, check and drop
    the tied lm_head, transpose the Conv1D weights ([in, out] -> [out, in])."""
    state = {}
    for name, tensor in weights.items():
        name = name[len('transformer.'):] if name.startswith('transformer.') else name
        if name.endswith(('.attn.bias', '.attn.masked_bias')):   # the causal mask as buffers: SDPA makes its own
            continue
        state[name] = tensor.t() if name.endswith(CONV1D) else tensor
    lm_head = state.pop('lm_head.weight', None)
    if lm_head is not None and 'wte.weight' in state and not torch.equal(lm_head, state['wte.weight']):
        raise CheckpointError("this GPT-2 has an output layer that is not tied to its token embedding; GPT-2 judges "
                              "tie them, so point to an unmodified GPT-2 folder")
    return state


def load_gpt2(folder):
    """A GPT2 from a local Hugging Face folder (config.json + model.safetensors or pytorch_model.bin), in eval mode."""
    path = os.path.join(folder, 'config.json')
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder} has no config.json; download a GPT-2 folder (e.g. gpt2-large) with its "
                              f"config.json and weights")
    try:
        hf = json.load(open(path))
    except ValueError:
        raise CheckpointError(f"{path} is not valid JSON; download it again") from None
    if hf.get('model_type', 'gpt2') != 'gpt2' or hf.get('activation_function', 'gelu_new') != 'gelu_new' \
            or hf.get('scale_attn_by_inverse_layer_idx') or hf.get('reorder_and_upcast_attn'):
        raise CheckpointError(f"{path} describes a model other than a plain GPT-2 (model_type "
                              f"{hf.get('model_type')!r}); point to a GPT-2 folder such as gpt2-large")
    cfg = GPT2Config(**{k: hf[k] for k in ('vocab_size', 'n_positions', 'n_embd', 'n_layer', 'n_head',
                                           'layer_norm_epsilon') if k in hf})
    model = GPT2(cfg)
    state = hf_to_ours(read_weights(folder))
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        raise CheckpointError(f"{folder}: the weights do not match its config.json (missing {missing[:3]}, "
                              f"unexpected {extra[:3]}); download the folder again")
    bad = [k for k in expected if state[k].shape != expected[k].shape]
    if bad:
        raise CheckpointError(f"{folder}: weight {bad[0]} has shape {tuple(state[bad[0]].shape)}, not "
                              f"{tuple(expected[bad[0]].shape)} as config.json says; download the folder again")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# Generative perplexity

def counted(tokens, eos_id):
    """Which targets count, for one sample tokens (T,): positions 1..T-1, except every EOS after the first
    (an EOS at position 0 is the first one, though it is never a target). -> bool (T - 1,)"""
    is_eos = tokens == eos_id
    first_eos = is_eos & (is_eos.cumsum(0) == 1)
    return (~is_eos | first_eos)[1:]


@torch.no_grad()
def nll_sum(model, samples, eos_id=GPT2_EOS, batch_size=8):
    """Sum of counted next-token NLLs and their number over token-id lists `samples` (each already truncated to
    the judge's context). Samples are scored a batch at a time, padded on the right; causal attention keeps the
    padding out of every real position, and padded targets are never counted. -> (float64 sum, int count)"""
    device = next(model.parameters()).device
    total, count = torch.zeros((), dtype=torch.float64), 0
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]))       # similar lengths share a batch
    for b in range(0, len(order), batch_size):
        batch = [samples[i] for i in order[b:b + batch_size] if len(samples[i]) >= 2]
        if not batch:
            continue
        T = max(len(s) for s in batch)
        x = torch.zeros(len(batch), T, dtype=torch.long)                     # padding: any id, never a target
        keep = torch.zeros(len(batch), T - 1, dtype=torch.bool)
        for row, s in enumerate(batch):
            tokens = torch.as_tensor(s, dtype=torch.long)
            x[row, :len(s)] = tokens
            keep[row, :len(s) - 1] = counted(tokens, eos_id)
        logits = model(x.to(device)).float()                                  # (b, T, V)
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:].to(device), reduction='none')  # (b, T - 1)
        keep = keep.to(device)
        total += (nll.double() * keep).sum().cpu()
        count += int(keep.sum())
    return total.item(), count


def generative_perplexity(model, samples, eos_id=GPT2_EOS, batch_size=8):
    """exp(token-weighted mean NLL over all samples) of token-id lists under the judge."""
    total, count = nll_sum(model, samples, eos_id, batch_size)
    return math.exp(total / max(count, 1))


def retokenize(texts, max_len=1024):
    """Text -> GPT-2 BPE ids (tiktoken), '<|endoftext|>' read as the EOS token, truncated to max_len."""
    enc = gpt2_encoding()
    return [enc.encode(t, allowed_special={'<|endoftext|>'})[:max_len] for t in texts]


class GPT2Judge:
    """eval.py's judge for GPT-2-token samples: decode, re-tokenise, score with GPT-2 (the module docstring)."""

    def __init__(self, model, batch_size=8, eos_id=GPT2_EOS):
        self.model, self.batch_size, self.eos_id = model, batch_size, eos_id
        self.max_len = model.config.n_positions

    def parameters(self):
        return self.model.parameters()

    def genppl(self, x):
        """x (B, L) sampled GPT-2 ids -> GenPPL. Ids outside GPT-2's vocabulary (a mask left over) are dropped."""
        enc = gpt2_encoding()
        texts = [enc.decode([t for t in row if 0 <= t < enc.n_vocab]) for row in torch.as_tensor(x).tolist()]
        return generative_perplexity(self.model, retokenize(texts, self.max_len), self.eos_id, self.batch_size)
