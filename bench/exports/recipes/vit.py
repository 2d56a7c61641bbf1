# ruff: noqa
# Provenance of bench/exports/*.onnx (torch==2.13.0; not run by the bench or CI): trained a few
# hundred steps on synthetic tasks, exported under ROOT (common.py), then copied.
from common import *

class Attn(nn.Module):
    def __init__(s, d, h):
        super().__init__(); s.h = h; s.qkv = nn.Linear(d, 3 * d); s.o = nn.Linear(d, d)
    def forward(s, x):
        B, T, D = x.shape
        q, k, v = s.qkv(x).reshape(B, T, 3, s.h, D // s.h).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) / (D // s.h) ** 0.5, -1)
        return s.o((a @ v).transpose(1, 2).reshape(B, T, D))

class Block(nn.Module):
    def __init__(s, d, h):
        super().__init__(); s.n1 = nn.LayerNorm(d); s.a = Attn(d, h); s.n2 = nn.LayerNorm(d)
        s.m = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
    def forward(s, x):
        x = x + s.a(s.n1(x)); return x + s.m(s.n2(x))

class ViT(nn.Module):
    def __init__(s, d=64, depth=3, h=4):
        super().__init__(); s.pe = nn.Conv2d(3, d, 4, 4); s.cls = nn.Parameter(torch.randn(1, 1, d) * .02)
        s.pos = nn.Parameter(torch.randn(1, 65, d) * .02); s.blocks = nn.Sequential(*[Block(d, h) for _ in range(depth)])
        s.n = nn.LayerNorm(d); s.head = nn.Linear(d, 10)
    def forward(s, x):
        x = s.pe(x).flatten(2).transpose(1, 2)
        x = torch.cat([s.cls.expand(x.shape[0], -1, -1), x], 1) + s.pos
        x = s.n(s.blocks(x))
        return s.head(x[:, 0])

torch.manual_seed(0)
X = smooth_images(2048, 3, 32, 32, seed=1); Y = image_labels(X)
m = cached_train("vit", ViT(), lambda s: ((X[(s*32)%2048:(s*32)%2048+32],), Y[(s*32)%2048:(s*32)%2048+32]), F.cross_entropy, steps=300, lr=1e-3)
with torch.no_grad(): print("  train acc", (m(X[:256]).argmax(1) == Y[:256]).float().mean().item())
cal = smooth_images(32, 3, 32, 32, seed=7); ev = smooth_images(16, 3, 32, 32, seed=8)
export(m, (cal[:1],), "vit", ["input"], ["logits"], 17)
save_samples("vit", ["input"], [per_sample(cal)], [per_sample(ev)], classifier=["logits"])
os.makedirs(ROOT + "/vit_d21", exist_ok=True)
export(m, (cal[:1],), "vit_d21", ["input"], ["logits"], 21, dynamo=True)
save_samples("vit_d21", ["input"], [per_sample(cal)], [per_sample(ev)], classifier=["logits"])
