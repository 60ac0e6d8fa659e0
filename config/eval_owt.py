# The papers' evaluation on OpenWebText: float64 sampling at L = 1024, GenPPL under GPT-2 Large, entropy.
#   python eval.py config/eval_owt.py --ckpt /models/mdlm-owt,out/idlm-mdlm-owt --judge gpt2:/models/gpt2-large
data = 'data/owt'
steps = '4,8,16,32,64,128,256,1024'
num_samples = 256
batch_size = 16            # at V = 50258 each sequence's (L, V) float32 outputs take ~1.2 GB at the head
floor = False              # no exact denoiser for real text
nelbo_batches = 16
out = 'out/eval-owt'
