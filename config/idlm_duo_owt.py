# IDLM on the official Duo teacher (s-sahoo/duo; its PAD id dropped, official.py), OpenWebText, L = 1024: IDLM App. F.
#   torchrun --standalone --nproc_per_node=8 distill_idlm.py config/idlm_duo_owt.py --teacher_ckpt /models/duo
# The 169M DiT and its dropout 0.1 come with the teacher (student and fake are copies of it, §3.3).
teacher = 'duo'
data = 'data/owt'          # python data.py --dataset owt --files /data/openwebtext --out data/owt --val_docs 100000
batch_size = 4             # App. F: 8 per device; Duo's iteration holds ~8.6 GiB a sequence (bench.py --dry_run owt)
grad_accum = 128           # micro-batches per phase in total: global batch 4 x 128 = 512, as the paper's
lr = 1e-6                  # AdamW, constant after warm-up (App. F)
fake_lr = 1e-6
warmup_iters = 2500
fake_steps = 1             # the public code's fake_frequency
grad_clip = 0.0            # no clipping in the loop (public code)
ema = 0.9999
max_iters = 10000          # App. F gives no iteration count; 10k is about 1.2 h on 8 H100 by the README's estimate
eval_interval = 1000
eval_steps = '4,8,16'
eval_samples = 64          # GenPPL with GPT-2 Large afterwards: python eval.py config/eval_owt.py --ckpt <out_dir>
eval_batch_size = 16       # as config/eval_owt.py: each sequence's (L, V) float32 outputs take ~1.2 GB at the head
ckpt_interval = 500
log_every = 50
anchor_weight = 0.0        # the paper's objective, eq. 11 alone (the CPU default's anchor is ours: distill_idlm.py)
