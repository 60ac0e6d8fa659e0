# DiDi-Instruct on the official MDLM teacher, OpenWebText, L = 1024: DiDi §4, App. E-F (Table 5, public config).
#   python distill_didi.py config/didi_mdlm_owt.py --teacher_ckpt /models/mdlm-owt      # one GPU, as the paper
teacher = 'mdlm'
data = 'data/owt'
batch_size = 8             # DiDi Table 5: global batch 8
grad_accum = 1
group_size = 4             # G of eq. 7: two groups of 4 per batch
max_iters = 10000
lr = 1e-6                  # student, AdamW (Table 5: beta2 0.999, weight decay 0.01, no warm-up)
warmup_iters = 0
beta2 = 0.999
weight_decay = 0.01
disc_lr = 1e-5             # public config: 10x the student's
disc_trainable_blocks = 4  # only the discriminator's last 4 blocks (and its head) train
ema = 0.999                # public config (Table 5 says 0.9999)
reward_clip = 8.0
adv_clip = 3.0
label_smoothing = 0.1
group_share = 'none'        # the paper's groups: G samples, each at its own tau
kl_weight = 0.05           # the paper's regularisation weight (public code: 0.01); helps at <= 8 NFEs
entropy_weight = 5e-4
eval_interval = 1000
eval_steps = '8,16,32,64,128'
eval_samples = 40          # DiDi: 40 samples per configuration
eval_batch_size = 16       # as config/eval_owt.py: each sequence's (L, V) float32 outputs take ~1.2 GB at the head
ckpt_interval = 500
rgas = True                # the paper reports its students guided by RGAS (App. F.3) beside plain sampling
