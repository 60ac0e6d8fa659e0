"""
The denoising network: a compact diffusion transformer (DiT) in the layout of the official SEDD / MDLM / Duo
backbone, so that their checkpoints load here with at most a prefix rename (`backbone.` for MDLM and Duo).

    x (ids (B, L) or probabilities (B, L, V)) --vocab_embed--> h (B, L, d)
    sigma (B,) --sinusoidal--> sigma_map MLP --SiLU--> c (B, C)           the noise level, C = cond_dim
    n_layer x block:  h += gate * attn(modulate(LN(h), shift, scale))     adaLN-zero: shift/scale/gate come from c
                      h += gate * mlp(modulate(LN(h), shift, scale))
    output_layer:     modulate(LN(h)) -> Linear(d, V) -> head

The head turns raw logits into what each method needs (all in log space, float32, shape (B, L, V)):
    'subs'  MDLM's SUBS parameterisation: log x0_hat with the mask logit at -inf and unmasked tokens copied through.
    'x0'    plain log-softmax over the vocabulary (Duo / UDLM denoiser, IDLM §2.1).
    'sedd'  SEDD log-scores log s_y, "scaled by sigma": raw - log(e^sigma - 1) - log(V - 1), current token set to 0.
    'ar'    causal attention and next-token log-probabilities (never BOS): the autoregressive baseline and judge.

Soft input ("soft lookup", IDLM §3.2, Duo eq. 6): a probability vector per position is multiplied by the embedding
matrix, so a one-hot vector gives exactly the embedding of its id and the network is differentiable in x.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# A large finite stand-in for log(0): exp() of it is exactly 0 in float32, but 0 * it stays 0 (no NaN in losses).
NEG_INF = -1e6

HEADS = ('subs', 'x0', 'sedd', 'ar')


@dataclass
class DiTConfig:
    vocab_size: int = 65          # V: real tokens plus the mask (absorbing) or BOS (autoregressive) token
    seq_len: int = 64             # L: rotary positions need no table, so this only documents the trained length
    n_embd: int = 128             # d
    n_layer: int = 4
    n_head: int = 4
    cond_dim: int = 128           # C: width of the noise-level embedding
    dropout: float = 0.0
    head: str = 'subs'            # one of HEADS
    mask_id: int = -1             # the mask (absorbing models) or BOS (AR) token, never predicted; -1 if none
    time_conditioning: bool = False  # MDLM's released model ignores sigma; SEDD and Duo use it


# Size presets. 'small' is the papers' 169M backbone (with V = 50258 and L = 1024).
PRESETS = {
    'tiny': dict(n_embd=32, n_layer=2, n_head=2, cond_dim=32),
    'cpu': dict(n_embd=128, n_layer=4, n_head=4, cond_dim=128),
    'small': dict(n_embd=768, n_layer=12, n_head=12, cond_dim=128, dropout=0.1),
    'medium': dict(n_embd=1024, n_layer=24, n_head=16, cond_dim=128, dropout=0.1),
}


# ----------------------------------------------------------------------------------------------------------------
# Building blocks

class LayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, computed in float32 even under bf16 autocast (as the official code)."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x):
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = F.layer_norm(x.float(), [self.dim])
        return x * self.weight[None, None, :]


def modulate(x, shift, scale):
    """adaLN: x (B, L, d), shift and scale (B, 1, d)."""
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """sigma (B,) -> sinusoidal features (256, [cos, sin], max period 1e4) -> Linear -> SiLU -> Linear -> (B, C)."""

    def __init__(self, cond_dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
        args = sigma.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class Rotary(nn.Module):
    """Rotary positions (GPT-NeoX "rotate half" layout, base 1e4) for queries and keys. No learned parameters."""

    def __init__(self, head_dim, base=10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        # Not persistent: it is a function of head_dim, and official checkpoints may or may not carry it.
        self.register_buffer('inv_freq', inv_freq, persistent=False)

    def forward(self, L, device):
        angles = torch.outer(torch.arange(L, device=device, dtype=torch.float32), self.inv_freq)  # (L, head_dim/2)
        angles = torch.cat([angles, angles], dim=-1)                                             # (L, head_dim)
        return angles.cos()[None, None], angles.sin()[None, None]                                # (1, 1, L, hd)


def apply_rotary(x, cos, sin):
    """x (B, H, L, hd): rotate each (x_i, x_{i + hd/2}) pair by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Block(nn.Module):
    """One transformer block with adaLN-zero conditioning; at init the gates are zero, so the block is the identity."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.n_embd
        self.n_head = cfg.n_head
        self.causal = cfg.head == 'ar'
        self.norm1 = LayerNorm(d)
        self.attn_qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.norm2 = LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate='tanh'), nn.Linear(4 * d, d))
        self.adaLN_modulation = nn.Linear(cfg.cond_dim, 6 * d)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, h, c, cos, sin):
        B, L, d = h.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)

        x = modulate(self.norm1(h), shift_msa, scale_msa)
        q, k, v = self.attn_qkv(x).view(B, L, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, hd)
        q, k = apply_rotary(q, cos, sin).to(v.dtype), apply_rotary(k, cos, sin).to(v.dtype)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = self.attn_out(x.transpose(1, 2).reshape(B, L, d))
        h = h + gate_msa * self.dropout(x)

        x = self.mlp(modulate(self.norm2(h), shift_mlp, scale_mlp))
        return h + gate_mlp * self.dropout(x)


class EmbeddingLayer(nn.Module):
    """A raw (V, d) matrix, so ids index it and probability vectors multiply it (the soft lookup)."""

    def __init__(self, V, d):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(V, d))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, x):
        if x.dtype in (torch.long, torch.int32, torch.int64):
            return self.embedding[x]                       # (B, L, d)
        # (B, L, V) @ (V, d). Under autocast the matmul comes out in bf16: cast it back, so the residual stream is
        # float32 for probability vectors as it is for token ids
        return (x.to(self.embedding.dtype) @ self.embedding).to(self.embedding.dtype)


class FinalLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm_final = LayerNorm(cfg.n_embd)
        self.linear = nn.Linear(cfg.n_embd, cfg.vocab_size)
        self.adaLN_modulation = nn.Linear(cfg.cond_dim, 2 * cfg.n_embd)
        for layer in (self.linear, self.adaLN_modulation):  # zero-init: the untrained model outputs uniform logits
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, h, c):
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        return self.linear(modulate(self.norm_final(h), shift, scale))


# ----------------------------------------------------------------------------------------------------------------
# The network

class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if cfg.head not in HEADS:
            raise ValueError(f"unknown head {cfg.head!r}; choose one of {', '.join(HEADS)}")
        if cfg.head in ('subs', 'ar') and not 0 <= cfg.mask_id < cfg.vocab_size:
            raise ValueError(f"the {cfg.head!r} head needs mask_id, the id of its mask or BOS token")
        if cfg.n_head < 1 or cfg.n_embd % cfg.n_head or (cfg.n_embd // cfg.n_head) % 2:
            raise ValueError(f"n_embd {cfg.n_embd} does not split into {cfg.n_head} heads of even width (rotary "
                             f"positions rotate pairs)")
        self.config = cfg
        self.vocab_embed = EmbeddingLayer(cfg.vocab_size, cfg.n_embd)
        self.sigma_map = TimestepEmbedder(cfg.cond_dim)
        self.rotary_emb = Rotary(cfg.n_embd // cfg.n_head)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.output_layer = FinalLayer(cfg)

    def forward(self, x, sigma=None):
        """x: ids (B, L) or probabilities (B, L, V); sigma: (B,) noise level. Returns the head's output (B, L, V)."""
        cfg = self.config
        B, L = x.shape[:2]
        if cfg.head == 'sedd' and sigma is None:
            raise ValueError("the 'sedd' head needs sigma: its log-scores are scaled by the noise level")
        cond = sigma if cfg.time_conditioning and sigma is not None else torch.zeros(B, device=x.device)
        c = F.silu(self.sigma_map(cond))  # MDLM and the AR model are not time-conditioned: they see sigma = 0
        cos, sin = self.rotary_emb(L, x.device)
        h = self.vocab_embed(x)
        for block in self.blocks:
            h = block(h, c, cos, sin)
        logits = self.output_layer(h, c).float()  # heads run in float32, also under bf16 autocast
        return self.head(logits, x, sigma)

    def head(self, logits, x, sigma):
        cfg = self.config
        if cfg.head == 'subs':
            return subs_log_probs(logits, x, cfg.mask_id)
        if cfg.head == 'sedd':
            return sedd_log_score(logits, x, sigma)
        if cfg.head == 'ar':  # BOS only starts a sequence: giving it probability would leak mass off real sequences
            logits = logits.clone()
            logits[..., cfg.mask_id] = NEG_INF
        return logits.log_softmax(-1)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


def subs_log_probs(logits, x, mask_id):
    """MDLM's SUBS parameterisation (Sahoo et al. 2024): the denoiser never predicts the mask ("zero masking
    probabilities"), and a token that is not masked is its own prediction ("carry-over unmasking").
    logits (B, L, V); x ids (B, L) or probabilities (B, L, V). Returns log x0_hat (B, L, V)."""
    logits = logits.clone()
    logits[..., mask_id] = NEG_INF
    logp = logits.log_softmax(-1)
    if x.dtype != torch.long:
        return logp  # soft input: there is no hard "unmasked" position to copy through
    copied = torch.full_like(logp, NEG_INF).scatter(-1, x[..., None], 0.0)
    return torch.where((x != mask_id)[..., None], copied, logp)


def sedd_log_score(logits, x, sigma):
    """SEDD's absorbing log-score l_y = log s_theta(x, t)_y, "scaled by sigma" (Lou et al. 2024): subtracting
    log(e^sigma - 1) + log(V - 1) makes the zero-output network a sensible score at every noise level.
    The score of the current token is the ratio p(x)/p(x) = 1, so its log is set to 0. sigma (B,) is sigma_bar_t."""
    sigma = sigma.double().clamp_min(1e-8)
    log_esigm1 = torch.where(sigma < 0.5, torch.expm1(sigma), sigma.exp() - 1).log().float()
    score = logits - log_esigm1[:, None, None] - math.log(logits.shape[-1] - 1)
    if x.dtype != torch.long:
        x = x.argmax(-1)
    return score.scatter(-1, x[..., None], 0.0)


def ar_log_likelihood(model, x, bos_id):
    """Per-token log p(x_i | x_<i) (B, L) under a causal DiT: the input is x shifted right behind a BOS token."""
    inp = torch.cat([torch.full_like(x[:, :1], bos_id), x[:, :-1]], dim=1)
    return model(inp).gather(-1, x[..., None]).squeeze(-1)


def build_model(preset='cpu', **overrides):
    """DiT from a size preset plus overrides (vocab_size, seq_len, head, mask_id, time_conditioning, ...)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return DiT(DiTConfig(**{**PRESETS[preset], **overrides}))


# ----------------------------------------------------------------------------------------------------------------
# The DiDi-Instruct discriminator: the same backbone with a new head, one logit per position

class DiscriminatorHead(nn.Module):
    """DiDi §5 / App. E.1: two spectral-normalised linear layers with a SiLU between them, h (B, L, d) -> (B, L, 1).
    The residual stream is layer-normalised (no learned scale) first, so that the Lipschitz bound of the two
    linear layers bounds the logits in a known way whatever the backbone's depth.

    torch's spectral norm runs one power-iteration step on every forward in train mode. Here the head stays in eval
    mode and power_iteration() is called once per discriminator update instead: the estimate then does not depend
    on how many forward passes an update takes, so 1 and N processes (and a resumed run) stay bit-identical."""

    def __init__(self, d):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        self.fc1, self.act, self.fc2 = sn(nn.Linear(d, d)), nn.SiLU(), sn(nn.Linear(d, 1))
        self.train(False)
        for _ in range(50):  # torch starts from 15 steps; the top two singular values of a random d x d are close
            self.power_iteration()

    def forward(self, h, c=None):
        x = F.layer_norm(h.float(), [h.shape[-1]])
        return self.fc2(self.act(self.fc1(x)))

    def train(self, mode=True):
        return super().train(False)  # see the class docstring: no power iteration as a side effect of forward

    @torch.no_grad()
    def power_iteration(self):
        """One power-iteration step for each layer's top singular vectors (u, v buffers, updated in place)."""
        for layer in (self.fc1, self.fc2):
            norm = layer.parametrizations.weight[0]
            norm.training = True
            layer.weight  # noqa: B018 -- computing the weight in training mode runs the step
            norm.training = False


class Discriminator(DiT):
    """D_lambda of DiDi-Instruct (§4.2, Lemma 4.2): the DiT trunk (embedding, conditioning, blocks) with the output
    layer replaced by DiscriminatorHead. Returns one logit per position (B, L) for ids or probability vectors
    (B, L, V) in: the soft input is what RGAS differentiates (sample.py).
    Label convention: sigmoid(logit) = P(the sequence is the teacher's), so at the optimum of the balanced BCE
    (eq. 8) logit = log q_teacher(z_t) - log q_student(z_t) = -R(z_t, t) of eq. 5."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.output_layer = DiscriminatorHead(cfg.n_embd)

    def head(self, logits, x, sigma):
        return logits[..., 0]  # (B, L)

    @classmethod
    def from_backbone(cls, net):
        """A discriminator whose trunk is a copy of net's (DiDi §5: "based on the same backbone"); new head."""
        disc = cls(net.config)
        trunk = {k: v for k, v in net.state_dict().items() if not k.startswith('output_layer.')}
        missing, unexpected = disc.load_state_dict(trunk, strict=False)
        assert not unexpected and all(k.startswith('output_layer.') for k in missing), (missing, unexpected)
        return disc.to(next(net.parameters()).device)

    def power_iteration(self):
        self.output_layer.power_iteration()


def discriminator_reward(logits, z, mask_id, reduce='mean'):
    """DiDi eq. 6: the mean (reduce='mean', the paper's) or the sum over the masked positions of z (B, L) of the
    per-position log-ratio logits (B, L). With Discriminator's label convention this is log q_teacher - log
    q_student: higher is more teacher-like. A sequence with no mask left (the last RGAS step) is scored over all its
    positions. -> (B,)"""
    scored = (z == mask_id)
    scored = scored | ~scored.any(-1, keepdim=True)
    total = torch.where(scored, logits, torch.zeros_like(logits)).sum(-1)
    return total / scored.sum(-1) if reduce == 'mean' else total
