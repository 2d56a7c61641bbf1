# ruff: noqa
# Provenance of bench/exports/*.onnx (torch==2.13.0; not run by the bench or CI): trained a few
# hundred steps on synthetic tasks, exported under ROOT (common.py), then copied.
# Copied to bench/exports/: audio -> audio_cnn, yolo -> yolo_head, vit -> vit_tiny,
# gpt2_d18 -> gpt2_tiny, effnet -> effnet_small (the model.onnx of each).
"""Shared helpers for building sweep models (run with /tmp/sweep/tvenv/bin/python)."""
import json, os, shutil, time
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = "/tmp/sweep/models"
torch.set_num_threads(1)


def smooth_images(n, c, h, w, seed=0, lowres=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, lowres, lowres, generator=g)
    x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False)
    # add a little fine detail and some blobs
    x = x + 0.1 * torch.randn(n, c, h, w, generator=g)
    return x


def image_labels(x, ncls=10):
    # label from quadrant means of channel mixes: learnable rule
    n, c, h, w = x.shape
    q = F.adaptive_avg_pool2d(x, 2).reshape(n, -1)  # c*4
    W = torch.Generator().manual_seed(123)
    proj = torch.randn(q.shape[1], ncls, generator=W)
    return (q @ proj).argmax(1)


def train(model, batches, loss_fn, steps=200, lr=2e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    t0 = time.time()
    for s in range(steps):
        inputs, target = batches(s)
        out = model(*inputs)
        loss = loss_fn(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if s % 50 == 0 or s == steps - 1:
            print(f"  step {s} loss {loss.item():.4f}", flush=True)
    model.eval()
    print(f"  trained {steps} steps in {time.time()-t0:.1f}s")
    return model


def save_samples(name, input_names, calib, evals, classifier=None, extra=None):
    """calib/evals: list (per input) of arrays with leading sample axis; each sample saved as one file
    (shape = array.shape[1:], the per-sample shape including batch 1)."""
    d = os.path.join(ROOT, name)
    for split, arrs in (("calib", calib), ("eval", evals)):
        for nm, a in zip(input_names, arrs):
            sd = os.path.join(d, split, nm)
            if os.path.exists(sd):
                shutil.rmtree(sd)
            os.makedirs(sd)
            for i in range(a.shape[0]):
                np.ascontiguousarray(a[i]).tofile(os.path.join(sd, f"{i:06d}.bin"))
    meta = {
        "name": name,
        "inputs": input_names,
        "calib_shapes": [list(a.shape[1:]) for a in calib],
        "dtypes": [str(a.dtype) for a in calib],
        "n_calib": int(calib[0].shape[0]),
        "n_eval": int(evals[0].shape[0]),
        "classifier": classifier or [],
    }
    if extra:
        meta.update(extra)
    json.dump(meta, open(os.path.join(d, "meta.json"), "w"), indent=1)


def cached_train(name, model, *a, **k):
    p = os.path.join(ROOT, name, "torch_state.pt")
    if os.path.exists(p):
        model.load_state_dict(torch.load(p)); model.eval(); print("  loaded cached weights"); return model
    train(model, *a, **k)
    os.makedirs(os.path.dirname(p), exist_ok=True); torch.save(model.state_dict(), p)
    return model


def export(model, args, name, input_names, output_names, opset, dynamic_axes=None, dynamo=False, dynamic_shapes=None, fold=True):
    d = os.path.join(ROOT, name)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "model.onnx")
    with torch.no_grad():
        if dynamo:
            prog = torch.onnx.export(model, args, dynamo=True, opset_version=opset,
                                     input_names=input_names, output_names=output_names,
                                     dynamic_shapes=dynamic_shapes)
            prog.save(path)
        else:
            torch.onnx.export(model, args, path, opset_version=opset, dynamo=False,
                              input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes, do_constant_folding=fold)
    import onnx
    m = onnx.load(path)
    onnx.checker.check_model(m)
    ops = sorted({n.op_type for n in m.graph.node})
    print(f"  exported {path} opset {m.opset_import[0].version} ops {ops}")
    return path


def per_sample(x):
    """(N, ...) tensor -> numpy with per-sample batch axis of 1: (N, 1, ...)"""
    return x.detach().numpy()[:, None].astype(x.detach().numpy().dtype)
