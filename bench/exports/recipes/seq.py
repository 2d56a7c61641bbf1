# ruff: noqa
# Provenance of bench/exports/*.onnx (torch==2.13.0; not run by the bench or CI): trained a few
# hundred steps on synthetic tasks, exported under ROOT (common.py), then copied.
from common import *

def seqdata(n, T=24, F_=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, T)
    freq = torch.rand(n, 1, F_, generator=g) * 6; ph = torch.rand(n, 1, F_, generator=g) * 6
    x = torch.sin(freq * t[None, :, None] * 6.28 + ph) + 0.2 * torch.randn(n, T, F_, generator=g)
    y = (freq[:, 0, :4].sum(1) / 24 * 5).long().clamp(0, 4)
    return x, y

class RNNCls(nn.Module):
    def __init__(s, kind):
        super().__init__(); s.r = (nn.GRU if kind == "gru" else nn.LSTM)(16, 48, num_layers=1, batch_first=True); s.fc = nn.Linear(48, 5)
    def forward(s, x):
        y, _ = s.r(x); return s.fc(y[:, -1])

class Audio(nn.Module):
    def __init__(s):
        super().__init__()
        s.c = nn.Sequential(nn.Conv1d(1, 32, 11, 4, 5), nn.PReLU(32), nn.Conv1d(32, 64, 5, 2, 2), nn.PReLU(64),
                            nn.Conv1d(64, 64, 5, 2, 2), nn.PReLU(), nn.Conv1d(64, 64, 3, 1, 1), nn.PReLU(64))
        s.fc = nn.Linear(64, 5)
    def forward(s, x):
        return s.fc(s.c(x).mean(-1))

torch.manual_seed(0)
X, Y = seqdata(2048, seed=1); Xc, _ = seqdata(32, seed=7); Xe, _ = seqdata(16, seed=8)
for kind, opset in (("gru", 13), ("lstm", 17)):
    m = cached_train(kind, RNNCls(kind), lambda s: ((X[(s*32)%2048:(s*32)%2048+32],), Y[(s*32)%2048:(s*32)%2048+32]), F.cross_entropy, steps=200)
    export(m, (Xc[:1],), kind, ["seq"], ["logits"], opset)
    save_samples(kind, ["seq"], [per_sample(Xc)], [per_sample(Xe)], classifier=["logits"])

def audiodata(n, seed):
    g = torch.Generator().manual_seed(seed); t = torch.arange(1600) / 16000.
    f = 200 + torch.rand(n, 3, generator=g) * 3000
    x = (torch.sin(6.28 * f[:, :, None] * t)).sum(1, keepdim=True) * 0.3 + 0.05 * torch.randn(n, 1, 1600, generator=g)
    return x, (f[:, 0] / 3200 * 5).long().clamp(0, 4)
A, AY = audiodata(1024, 1); Ac, _ = audiodata(32, 7); Ae, _ = audiodata(16, 8)
m = cached_train("audio", Audio(), lambda s: ((A[(s*32)%1024:(s*32)%1024+32],), AY[(s*32)%1024:(s*32)%1024+32]), F.cross_entropy, steps=200)
os.makedirs(ROOT + "/audio", exist_ok=True)
export(m, (Ac[:1],), "audio", ["wave"], ["logits"], 21, dynamo=True)
save_samples("audio", ["wave"], [per_sample(Ac)], [per_sample(Ae)], classifier=["logits"])
