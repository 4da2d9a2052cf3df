"""Backward passes through kernels that are known to crash or miscompute on some CPUs.

oneDNN's 1x1 convolution with stride > 1 on channels-last inputs with fewer input channels than
its block size (8 with AVX2, 16 with AVX-512) writes past a workspace in ``backward_weights``:
the process dies ("double free or corruption") or, worse, the weight gradient is wrong without a
crash (docs/determinism.md). A native crash would kill the pytest worker and every test queued on
it, so each case runs in its own subprocess: a crash fails exactly this test, with the child's
exit status and stderr in the message.

The oracle is the same computation in contiguous (NCHW) format, which never takes that path.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import copy, json, sys, torch
    from pipeline.models.backbones import ResidualBlock, SceneResNet
    torch.set_num_threads(1)
    kind, c_in = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    if kind == "block":   # the reduced case: a stride-2 block whose shortcut projects c_in channels
        reference = ResidualBlock(c_in, 16, stride=2)
        x = torch.randn(8, c_in, 64, 64)
    else:                 # the whole backbone with small channels, as a user may configure it
        reference = SceneResNet((c_in, c_in, 16, 16), 64, num_labels=5)
        x = torch.randn(8, 3, 64, 64)
    reference.train()

    def gradients(channels_last):
        net = copy.deepcopy(reference)
        inp = x.clone()
        if channels_last:
            net.to(memory_format=torch.channels_last)
            inp = inp.to(memory_format=torch.channels_last)
        inp.requires_grad_()
        out = net(inp) if kind == "block" else net.classify(inp)
        out.square().sum().backward()
        return inp.grad.contiguous(), [p.grad.contiguous() for p in net.parameters()]

    x_nchw, w_nchw = gradients(False)
    x_nhwc, w_nhwc = gradients(True)
    scale = max(float(x_nchw.abs().max()), *(float(g.abs().max()) for g in w_nchw))
    print(json.dumps({
        "input": float((x_nchw - x_nhwc).abs().max()) / scale,
        "weights": max(float((a - b).abs().max()) for a, b in zip(w_nchw, w_nhwc)) / scale,
    }))
""")


def run_child(kind: str, c_in: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, kind, str(c_in)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"{kind} backward with {c_in} input channels in channels-last crashed or failed "
        f"(exit status {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["block", "backbone"])
@pytest.mark.parametrize("c_in", [4, 8])
def test_channels_last_backward_matches_contiguous(kind, c_in):
    errors = run_child(kind, c_in)
    # Relative to the largest gradient: the two layouts sum in different orders, nothing more.
    assert errors["input"] <= 1e-5, errors
    assert errors["weights"] <= 1e-5, errors


def test_strided_shortcut_is_subsampling_then_pointwise_convolution():
    """The stride-1 form is the same function as the strided 1x1 convolution it replaces
    (checked in contiguous format, where the strided kernel is safe)."""
    import torch

    from pipeline.models.backbones import ResidualBlock

    torch.manual_seed(1)
    block = ResidualBlock(16, 32, stride=2).eval()
    x = torch.randn(2, 16, 15, 17)   # odd sizes: the subsampled grid must match the strided one
    conv, bn = block.shortcut
    strided = torch.nn.functional.conv2d(x, conv.weight, stride=2)
    assert torch.allclose(block.shortcut(x[:, :, ::2, ::2]), bn(strided), atol=1e-6)
    main = block.bn2(block.conv2(block.relu1(block.bn1(block.conv1(x)))))
    assert torch.allclose(block(x), torch.relu(main + bn(strided)), atol=1e-6)
    assert block(x).shape == (2, 32, 8, 9)
