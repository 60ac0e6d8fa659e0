# An MDLM teacher of the papers' size trained here (MDLM's OpenWebText recipe), if you have no official one:
#   torchrun --standalone --nproc_per_node=8 train.py config/train_mdlm_owt.py
teacher = 'mdlm'
data = 'data/owt'
model = 'small'            # the 169M DiT: d = 768, 12 blocks, 12 heads (model.PRESETS)
dropout = 0.1
batch_size = 16            # a training step holds ~2.5 GB a sequence (float32, bench.py --dry_run owt): 16 fit 80 GB
grad_accum = 32            # global batch 512
lr = 3e-4
warmup_iters = 2500
lr_decay_iters = -1        # constant after warm-up
beta2 = 0.999
weight_decay = 0.0
grad_clip = 1.0
ema = 0.9999
max_iters = 1000000
eval_interval = 5000
eval_batches = 64
ckpt_interval = 5000
