# ruff: noqa
# Provenance of bench/exports/*.onnx (torch==2.13.0; not run by the bench or CI): trained a few
# hundred steps on synthetic tasks, exported under ROOT (common.py), then copied.
from common import *

def cbs(ci, co, k=3, s=1):
    return nn.Sequential(nn.Conv2d(ci, co, k, s, k // 2, bias=False), nn.BatchNorm2d(co), nn.SiLU())

class C2f(nn.Module):
    def __init__(s, c):
        super().__init__(); s.cv1 = cbs(c, c, 1); s.m = nn.Sequential(cbs(c // 2, c // 2), cbs(c // 2, c // 2)); s.cv2 = cbs(c + c // 2, c, 1)
    def forward(s, x):
        a, b = self_split = s.cv1(x).split(x.shape[1] // 2, 1)
        return s.cv2(torch.cat([a, b, s.m(b)], 1))

class Det(nn.Module):
    NC = 4
    def __init__(s):
        super().__init__()
        s.s1 = nn.Sequential(cbs(3, 16, 3, 2), cbs(16, 32, 3, 2), C2f(32))   # /4
        s.s2 = nn.Sequential(cbs(32, 64, 3, 2), C2f(64))                      # /8
        s.s3 = nn.Sequential(cbs(64, 64, 3, 2), C2f(64))                      # /16
        s.h = nn.ModuleList([nn.Conv2d(c, 4 + 1 + s.NC, 1) for c in (32, 64, 64)])
    def forward(s, x):
        f1 = s.s1(x); f2 = s.s2(f1); f3 = s.s3(f2)
        outs = []
        for f, h in zip((f1, f2, f3), s.h):
            p = h(f); B, C, H, W = p.shape
            outs.append(p.reshape(B, C, H * W))
        p = torch.cat(outs, 2).transpose(1, 2)           # B, N, 9
        box, obj, cls = p.split([4, 1, s.NC], 2)
        box = torch.cat([box[..., :2].sigmoid() * 2 - 0.5, box[..., 2:].exp()], 2)
        scores = obj.sigmoid() * cls.sigmoid()
        return box, scores

torch.manual_seed(0)
X = smooth_images(1024, 3, 64, 64, seed=1)
def target(x):
    m = Det(); return None
net = Det()
# synthetic target: scores ~ local brightness per cell, boxes ~ local channel mix (learnable regression)
def tgt(x):
    outs = []
    for st in (4, 8, 16):
        p = F.avg_pool2d(x, st)
        B, C, H, W = p.shape
        outs.append(p.reshape(B, C, H * W))
    p = torch.cat(outs, 2).transpose(1, 2)
    return torch.cat([p[..., :2].sigmoid(), p[..., :2].exp() * 0.5 + 0.5], 2), torch.sigmoid(p.sum(2, keepdim=True)).expand(-1, -1, 4) * torch.tensor([1., .5, .25, .1])
TB, TS = tgt(X)
lf = lambda o, t: F.mse_loss(o[0], t[0]) + F.mse_loss(o[1], t[1])
m = cached_train("yolo", net, lambda s: ((X[(s*16)%1024:(s*16)%1024+16],), (TB[(s*16)%1024:(s*16)%1024+16], TS[(s*16)%1024:(s*16)%1024+16])), lf, steps=150)
cal = smooth_images(32, 3, 64, 64, seed=7); ev = smooth_images(16, 3, 64, 64, seed=8)
export(m, (cal[:1],), "yolo", ["images"], ["boxes", "scores"], 13)
save_samples("yolo", ["images"], [per_sample(cal)], [per_sample(ev)])
