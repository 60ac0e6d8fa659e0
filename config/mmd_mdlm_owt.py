# MDLM-MMD on the official MDLM teacher (kuleshov-group/mdlm-owt), OpenWebText, L = 1024: the public code's values
# (yandex-research/dlm-mmd: configs/config.yaml and scripts/train_mmd_mdlm.sh).
#   torchrun --standalone --nproc_per_node=8 distill_mmd.py config/mmd_mdlm_owt.py --teacher_ckpt /models/mdlm-owt
teacher = 'mdlm'
data = 'data/owt'          # python data.py --dataset owt --files /data/openwebtext --out data/owt --val_docs 100000
batch_size = 8             # sequences per micro-batch (loader.batch_size = 8 per GPU)
grad_accum = 64            # global batch 512 (loader.global_batch_size): 8 GPUs x 8 accumulated micro-batches of 8
lr = 1e-4                  # AdamW (beta2 0.999, no weight decay), constant
warmup_iters = 0           # the public lr_scheduler file was not in the snapshot read; MDLM's constant_warmup has 2500
beta2 = 0.999
weight_decay = 0.0
grad_clip = 0.0            # trainer.gradient_clip_val = null
ema = 0.9999               # training.ema
max_iters = 4000           # trainer.max_steps
feature_block = 3          # mmd.feature_layer: zero-based, of the 169M model's 12 blocks
alpha = '2e-5'             # mmd.rbf_alpha, for the 768-wide features
exclude_same_position = True
group_size = 4             # mmd.group_size
draws_per_candidate = 2    # mmd.draws_per_candidate
student_dropout = True     # the public student trains with the checkpoint's dropout (0.1)
eval_interval = 250        # trainer.val_check_interval
eval_steps = '8,16,32'     # the public sweep's steps (at temperatures 0.75 to 1.20: eval.py --temperature afterwards)
eval_samples = 64          # GenPPL with GPT-2 Large afterwards: python eval.py config/eval_owt.py --ckpt <out_dir>
eval_batch_size = 16       # as config/eval_owt.py: each sequence's (L, V) float32 outputs take ~1.2 GB at the head
ckpt_interval = 250        # the public run's periodic checkpoints
log_every = 50
