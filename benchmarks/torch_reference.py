"""The PyTorch side of the benchmarks: medim's SAM-Med3D run the way the original code runs it.

`OriginalTrainStep` re-creates one step of the original `train.py`: batch-pooled
z-normalisation over voxels > 0, the image encoder once, 11 decoder passes with uniform clicks
from the error region of the previous logits (> 0.5), a no-point pass at a random t in [2, 8] and
at the end, the previous low-res logits as mask prompt, DiceCE (squared-denominator sigmoid Dice +
BCE) summed over passes, AdamW with the encoder at lr and prompt encoder / decoder at 0.1 lr,
fp16 autocast with a GradScaler on CUDA.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def build_medim(device: str = "cpu") -> torch.nn.Module:
    import medim

    return medim.create_model("SAM-Med3D", pretrained=False).to(device)


def dice_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits.float())
    g = target.float()
    dims = tuple(range(1, p.ndim))
    inter = (p * g).sum(dims)
    denom = (p * p).sum(dims) + (g * g).sum(dims)
    dice = 1 - (2 * inter + 1e-5) / (denom + 1e-5)
    return dice.mean() + F.binary_cross_entropy_with_logits(logits.float(), g)


def sample_clicks(prev: torch.Tensor, gt: torch.Tensor, rng: np.random.RandomState):
    pred = prev > 0.5
    true = gt > 0
    fn = true & ~pred
    err = fn | (~true & pred)
    pts, labels = [], []
    for i in range(gt.shape[0]):
        cand = torch.argwhere(err[i])
        if len(cand) == 0:
            cand = torch.argwhere(true[i])
        pick = cand[rng.randint(len(cand))]
        pts.append(pick[1:].view(1, 1, 3))
        labels.append(fn[i][tuple(pick)].long().view(1, 1))
    return torch.cat(pts), torch.cat(labels)


class OriginalTrainStep:
    def __init__(self, model: torch.nn.Module, lr: float = 8e-4, num_clicks: int = 11):
        self.model = model.train()
        self.device = next(model.parameters()).device
        self.num_clicks = num_clicks
        self.opt = torch.optim.AdamW(
            [
                {"params": model.image_encoder.parameters()},
                {"params": model.prompt_encoder.parameters(), "lr": lr * 0.1},
                {"params": model.mask_decoder.parameters(), "lr": lr * 0.1},
            ],
            lr=lr,
            betas=(0.9, 0.999),
            weight_decay=0.1,
        )
        self.cuda = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.cuda)
        self.rng = np.random.RandomState(2023)

    def __call__(self, image: torch.Tensor, gt: torch.Tensor) -> float:
        m = self.model
        x = image.float()
        mask = x > 0
        mean = x[mask].mean()
        std = x[mask].std()
        x = ((x - mean) / std).unsqueeze(1)
        gt = gt.unsqueeze(1)
        size = x.shape[-1]
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.cuda):
            emb = m.image_encoder(x)
            pe = m.prompt_encoder.get_dense_pe()
            prev = torch.zeros_like(gt, dtype=torch.float32)
            low = torch.zeros(gt.shape[0], 1, size // 4, size // 4, size // 4, device=x.device)
            r = self.rng.randint(2, 9)
            loss = 0
            for t in range(self.num_clicks):
                p, lab = sample_clicks(prev.detach(), gt, self.rng)
                if t == r or t == self.num_clicks - 1:
                    sparse, dense = m.prompt_encoder(points=None, boxes=None, masks=low)
                else:
                    sparse, dense = m.prompt_encoder(points=(p, lab), boxes=None, masks=low)
                low, _ = m.mask_decoder(emb, pe, sparse, dense, multimask_output=False)
                prev = F.interpolate(low, size=gt.shape[-3:], mode="trilinear", align_corners=False)
                loss = loss + dice_ce(prev, gt)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        return float(loss.detach())
