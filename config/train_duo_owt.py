# A Duo teacher of the papers' size trained here (Duo's OpenWebText recipe, scripts/train_owt_duo.sh), if you have
# no official one:   torchrun --standalone --nproc_per_node=8 train.py config/train_duo_owt.py
teacher = 'duo'
data = 'data/owt'
model = 'small'            # the 169M DiT: d = 768, 12 blocks, 12 heads (model.PRESETS)
dropout = 0.1
batch_size = 8             # a Duo training step holds ~4.9 GB a sequence (float32, bench.py --dry_run owt): 8 fit 80 GB
grad_accum = 64            # global batch 512
lr = 3e-4
warmup_iters = 2500
lr_decay_iters = -1        # constant after warm-up
beta2 = 0.999
weight_decay = 0.0
grad_clip = 1.0
ema = 0.9999
max_iters = 1000000
duo_curriculum = 0.5       # the public run: the curriculum until step 500k of 1M
duo_tau = 1e-3             # the public run's temperature, held throughout the curriculum
eval_interval = 5000
eval_batches = 64
ckpt_interval = 5000
