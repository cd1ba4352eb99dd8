import sys, time, torch
sys.path.insert(0, '.')
from fdfo.model.tiny import random_pipeline
from fdfo.model.lora import attach_lora
from fdfo.model.sd3 import SD3, predict_velocity
dev = torch.device('cuda')
pipe = random_pipeline('sd35m', device=dev, dtype=torch.bfloat16)
cond = SD3(pipe).encode(['a red fox in the snow'] * 12, 1.0, 128)
x = torch.randn(12, 16, 64, 64, device=dev)
sigma = torch.tensor(0.7, device=dev)
def bench(name, fn, n=5):
    for _ in range(2): fn()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize(); print(f'{name}: {1000*(time.perf_counter()-t)/n:.1f} ms', flush=True)
with torch.no_grad():
    bench('plain bf16 transformer, no LoRA', lambda: pipe.transformer(hidden_states=x.bfloat16(), timestep=(1000*sigma).expand(12), encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled, return_dict=False))
    bench('predict_velocity, no LoRA', lambda: predict_velocity(pipe.transformer, x, sigma, cond, 1.0))
lora = attach_lora(pipe.transformer)
with torch.no_grad():
    bench('predict_velocity, LoRA', lambda: predict_velocity(pipe.transformer, x, sigma, cond, 1.0))
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        predict_velocity(pipe.transformer, x, sigma, cond, 1.0); torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by='cuda_time_total', row_limit=12))
print('attn processor', type(pipe.transformer.transformer_blocks[0].attn.processor).__name__)
print('param dtypes', {p.dtype for p in pipe.transformer.parameters()})
print('buffers', {n: (b.dtype, b.device) for n, b in pipe.transformer.named_buffers()})
