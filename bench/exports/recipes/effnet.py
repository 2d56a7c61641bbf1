# ruff: noqa
# Provenance of bench/exports/*.onnx (torch==2.13.0; not run by the bench or CI): trained a few
# hundred steps on synthetic tasks, exported under ROOT (common.py), then copied.
from common import *

class SE(nn.Module):
    def __init__(s, c, r=4):
        super().__init__(); s.f1 = nn.Conv2d(c, c // r, 1); s.f2 = nn.Conv2d(c // r, c, 1)
    def forward(s, x):
        w = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(s.f2(F.silu(s.f1(w))))

class MBConv(nn.Module):
    def __init__(s, cin, cout, exp, stride):
        super().__init__(); h = cin * exp
        s.expand = nn.Sequential(nn.Conv2d(cin, h, 1, bias=False), nn.BatchNorm2d(h), nn.SiLU())
        s.dw = nn.Sequential(nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.SiLU())
        s.se = SE(h); s.proj = nn.Sequential(nn.Conv2d(h, cout, 1, bias=False), nn.BatchNorm2d(cout))
        s.res = stride == 1 and cin == cout
    def forward(s, x):
        y = s.proj(s.se(s.dw(s.expand(x))))
        return x + y if s.res else y

class Net(nn.Module):
    def __init__(s):
        super().__init__()
        s.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        s.blocks = nn.Sequential(MBConv(16, 16, 1, 1), MBConv(16, 24, 4, 2), MBConv(24, 24, 4, 1),
                                 MBConv(24, 40, 4, 2), MBConv(40, 40, 4, 1), MBConv(40, 80, 4, 2))
        s.head = nn.Sequential(nn.Conv2d(80, 160, 1, bias=False), nn.BatchNorm2d(160), nn.SiLU())
        s.fc = nn.Linear(160, 10)
    def forward(s, x):
        x = s.head(s.blocks(s.stem(x)))
        return s.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

torch.manual_seed(0)
X = smooth_images(2048, 3, 64, 64, seed=1); Y = image_labels(X)
m = cached_train("effnet", Net(), lambda s: ((X[(s*32)%2048:(s*32)%2048+32],), Y[(s*32)%2048:(s*32)%2048+32]), F.cross_entropy, steps=300)
with torch.no_grad(): print("  train acc", (m(X[:256]).argmax(1) == Y[:256]).float().mean().item())
cal = smooth_images(32, 3, 64, 64, seed=7); ev = smooth_images(16, 3, 64, 64, seed=8)
export(m, (cal[:1],), "effnet", ["input"], ["logits"], 13, fold=False)
save_samples("effnet", ["input"], [per_sample(cal)], [per_sample(ev)], classifier=["logits"])
