"""Symmetric InfoNCE (flip.loss): definition, local-loss chunks, and 2-process gathering."""

import math
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from flip.loss import contrastive_loss, global_contrastive_loss


def _features(b, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    return img.to(dtype), txt.to(dtype)


def _reference_loss(img, txt, s):
    """The definition, in float64: logits = s I T^T, mean of both cross-entropies."""
    img, txt, s = img.double(), txt.double(), torch.as_tensor(s).double()
    logits = s * img @ txt.T
    labels = torch.arange(img.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@pytest.mark.parametrize("b", [1, 2, 5, 16, 64])
@pytest.mark.parametrize("s", [1.0, 1 / 0.07, 100.0])
def test_matches_definition(b, s):
    img, txt = _features(b, seed=b)
    loss = contrastive_loss(img, txt, torch.tensor(s))
    assert loss.dtype == torch.float32
    ref = _reference_loss(img, txt, s)
    assert abs(loss.item() - ref.item()) <= 1e-6 * max(1.0, abs(ref.item())), (loss, ref)


def test_matches_hand_loop_3x3():
    img, txt = _features(3, d=4, seed=7)
    s = 5.0
    sim = [
        [s * sum(img[i, k].item() * txt[j, k].item() for k in range(4)) for j in range(3)]
        for i in range(3)
    ]

    def ce_rows(m):  # mean over rows of -log softmax(row)[diagonal]
        total = 0.0
        for i, row in enumerate(m):
            mx = max(row)
            lse = mx + math.log(sum(math.exp(v - mx) for v in row))
            total += lse - row[i]
        return total / len(m)

    sim_t = [[sim[j][i] for j in range(3)] for i in range(3)]
    ref = (ce_rows(sim) + ce_rows(sim_t)) / 2
    loss = contrastive_loss(img, txt, torch.tensor(s))
    assert loss.item() == pytest.approx(ref, rel=1e-6, abs=1e-6)


def test_perfect_alignment_small_loss_and_symmetry():
    img, _ = _features(8, seed=3)
    # identical, well-separated features at a large scale: loss close to 0
    assert (
        contrastive_loss(img, img, torch.tensor(100.0)).item()
        < _reference_loss(img, img, 1.0).item()
    )
    # swapping the roles of images and texts leaves the symmetric loss unchanged
    a, b = _features(8, seed=4)
    torch.testing.assert_close(
        contrastive_loss(a, b, torch.tensor(3.0)), contrastive_loss(b, a, torch.tensor(3.0))
    )


@pytest.mark.parametrize("K", [2, 4])
def test_local_chunks_average_to_full_batch(K):
    B = 8
    b = B // K
    img0, txt0 = _features(B, d=6, seed=11, dtype=torch.float64)
    s0 = torch.tensor(1 / 0.07, dtype=torch.float64)

    def leaves():
        return (
            img0.clone().requires_grad_(),
            txt0.clone().requires_grad_(),
            s0.clone().requires_grad_(),
        )

    img, txt, s = leaves()
    full = contrastive_loss(img, txt, s)
    full.backward()
    ref_grads = [img.grad, txt.grad, s.grad]
    torch.testing.assert_close(full.double(), _reference_loss(img0, txt0, s0), atol=1e-6, rtol=0)

    img, txt, s = leaves()
    losses = []
    for k in range(K):
        sl = slice(k * b, (k + 1) * b)
        loss_k = contrastive_loss(img[sl], txt[sl], s, all_image=img, all_text=txt, offset=k * b)
        loss_k.backward()  # gradients accumulate over chunks: their sum
        losses.append(loss_k.item())
    assert sum(losses) / K == pytest.approx(full.item(), abs=1e-6)
    for got, ref in zip([img.grad / K, txt.grad / K, s.grad / K], ref_grads):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)

    # without the offset every chunk would take rows 0..b-1 as its positives: wrong loss
    img, txt, s = leaves()
    wrong = (
        sum(
            contrastive_loss(
                img[k * b : (k + 1) * b], txt[k * b : (k + 1) * b], s, all_image=img, all_text=txt
            ).item()
            for k in range(K)
        )
        / K
    )
    assert abs(wrong - full.item()) > 1e-2


# ------------------------------------------------------------------- 2-process (gloo)

GLOBAL_BATCH, WORLD = 8, 2


class _TwoTower(nn.Module):
    """Deterministic stand-in for FLIP: linear image / text heads, shared logit scale."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.image = nn.Linear(6, 4).double()
        self.text = nn.Linear(5, 4).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), dtype=torch.float64))

    def forward(self, x_img, x_txt):
        return (
            F.normalize(self.image(x_img), dim=-1),
            F.normalize(self.text(x_txt), dim=-1),
            self.logit_scale.exp(),
        )


def _inputs():
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=torch.float64),
        torch.randn(GLOBAL_BATCH, 5, generator=g, dtype=torch.float64),
    )


def _avg_grads(model):
    out = {}
    for n, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)  # SUM, then / world: what DDP does
        out[n] = g / dist.get_world_size()
    return out


def _ddp_worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        model = _TwoTower()
        x_img, x_txt = _inputs()
        b = GLOBAL_BATCH // WORLD
        sl = slice(rank * b, (rank + 1) * b)

        img, txt, s = model(x_img[sl], x_txt[sl])
        loss = global_contrastive_loss(img, txt, s)
        loss.backward()
        grads = _avg_grads(model)
        avg_loss = loss.detach().clone()
        dist.all_reduce(avg_loss)
        avg_loss /= WORLD

        # the same step without gathering: each rank contrasts its local batch only
        model.zero_grad()
        img, txt, s = model(x_img[sl], x_txt[sl])
        local = contrastive_loss(img, txt, s)
        local.backward()
        local_grads = _avg_grads(model)

        torch.save(
            {"loss": avg_loss, "grads": grads, "local_grads": local_grads},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_gather_equals_full_batch(tmp_path):
    ctx = mp.start_processes(
        _ddp_worker,
        args=(_free_port(), str(tmp_path)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 90
    try:
        while not ctx.join(timeout=1):  # raises ProcessRaisedException on a worker error
            if time.monotonic() > deadline:
                pytest.fail("distributed workers timed out")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()

    # single-process full-batch reference
    model = _TwoTower()
    x_img, x_txt = _inputs()
    img, txt, s = model(x_img, x_txt)
    ref_loss = contrastive_loss(img, txt, s)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert ref_loss.item() == pytest.approx(_reference_loss(img, txt, s).item(), abs=1e-6)

    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for res in results:
        assert abs(res["loss"].item() - ref_loss.item()) < 1e-6
        assert res["grads"].keys() == ref_grads.keys()
        for n, g in ref_grads.items():
            torch.testing.assert_close(res["grads"][n], g, atol=1e-6, rtol=0, msg=n)
        # without gathering the gradients would differ: the test can fail
        diff = max((res["local_grads"][n] - g).abs().max().item() for n, g in ref_grads.items())
        assert diff > 1e-3
    # all ranks agree after the all-reduce
    for n in ref_grads:
        assert torch.equal(results[0]["grads"][n], results[1]["grads"][n])


def test_loss_stays_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(16, 32), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(16, 32), dim=-1)
    scale = torch.tensor(100.0)
    expected = contrastive_loss(image, text, scale)
    with torch.autocast("cpu", torch.bfloat16):
        loss = contrastive_loss(image.bfloat16(), text.bfloat16(), scale)
    assert loss.dtype == torch.float32
    # the same as fp32 on the bf16-rounded features: no bf16 matmul inside the loss
    reference = contrastive_loss(image.bfloat16().float(), text.bfloat16().float(), scale)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    assert loss.item() == pytest.approx(expected.item(), rel=2e-2)
