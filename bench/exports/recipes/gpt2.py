# ruff: noqa
# Provenance of bench/exports/*.onnx (torch==2.13.0; not run by the bench or CI): trained a few
# hundred steps on synthetic tasks, exported under ROOT (common.py), then copied.
from common import *
V, D, L, H, TMAX = 256, 64, 2, 4, 64

class Blk(nn.Module):
    def __init__(s):
        super().__init__(); s.ln1 = nn.LayerNorm(D); s.qkv = nn.Linear(D, 3 * D); s.o = nn.Linear(D, D)
        s.ln2 = nn.LayerNorm(D); s.f1 = nn.Linear(D, 4 * D); s.f2 = nn.Linear(4 * D, D)
    def forward(s, x, bias):
        B, T, _ = x.shape
        q, k, v = s.qkv(s.ln1(x)).reshape(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-1, -2)) * (1.0 / (D // H) ** 0.5) + bias
        y = (torch.softmax(a, -1) @ v).transpose(1, 2).reshape(B, T, D)
        x = x + s.o(y)
        return x + s.f2(F.gelu(s.f1(s.ln2(x)), approximate="tanh"))

class GPT(nn.Module):
    def __init__(s):
        super().__init__(); s.wte = nn.Embedding(V, D); s.wpe = nn.Embedding(TMAX, D)
        s.blocks = nn.ModuleList([Blk() for _ in range(L)]); s.lnf = nn.LayerNorm(D)
    def forward(s, ids, mask):
        T = ids.shape[1]
        pos = torch.arange(T, device=ids.device)[None]
        x = s.wte(ids) + s.wpe(pos)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        bias = torch.where(causal, 0.0, float("-inf"))[None, None]
        bias = bias + (1.0 - mask[:, None, None, :].float()) * -1e9
        for b in s.blocks:
            x = b(x, bias)
        return s.lnf(x) @ s.wte.weight.T

def tokens(n, T, seed):
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, V, (n, 1), generator=g); step = torch.randint(1, 7, (n, 1), generator=g)
    ids = (start + step * torch.arange(T)) % V
    noise = torch.rand(n, T, generator=g) < 0.1
    return torch.where(noise, torch.randint(0, V, (n, T), generator=g), ids)

torch.manual_seed(0)
Xtr = tokens(4096, 33, 1)
def lossf(o, t): return F.cross_entropy(o.reshape(-1, V), t.reshape(-1))
m = cached_train("gpt2", GPT(), lambda s: ((Xtr[(s*32)%4096:(s*32)%4096+32, :-1], torch.ones(32, 32, dtype=torch.long)), Xtr[(s*32)%4096:(s*32)%4096+32, 1:]), lossf, steps=300, lr=3e-3)
T = 32
def masks(n, seed):
    g = torch.Generator().manual_seed(seed); lens = torch.randint(20, T + 1, (n, 1), generator=g)
    return (torch.arange(T)[None] < lens).long()
ic, ie = tokens(32, T, 7), tokens(16, T, 8); mc, me = masks(32, 7), masks(16, 8)
ex = (ic[:1], mc[:1])
export(m, ex, "gpt2", ["input_ids", "attention_mask"], ["logits"], 14,
       dynamic_axes={"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}, "logits": {1: "seq"}})
save_samples("gpt2", ["input_ids", "attention_mask"], [per_sample(ic), per_sample(mc)], [per_sample(ie), per_sample(me)], classifier=["logits"], extra={"input_shape": f"input_ids:1,{T};attention_mask:1,{T}"})
os.makedirs(ROOT + "/gpt2_d18", exist_ok=True)
seq = torch.export.Dim("seq", min=2, max=TMAX)
export(m, ex, "gpt2_d18", ["input_ids", "attention_mask"], ["logits"], 18, dynamo=True,
       dynamic_shapes={"ids": {1: seq}, "mask": {1: seq}})
save_samples("gpt2_d18", ["input_ids", "attention_mask"], [per_sample(ic), per_sample(mc)], [per_sample(ie), per_sample(me)], classifier=["logits"], extra={"input_shape": f"input_ids:1,{T};attention_mask:1,{T}"})
