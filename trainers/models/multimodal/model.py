"""The multimodal model: one encoder per modality, fusion over the present ones, a task head.

Each encoder turns its modality into one token of width `dim`. The fusion block is a small
transformer over [fusion token, modality tokens] whose attention mask hides the modalities a
sample lacks; the fusion token, always present, is what the head reads. So a sample with only
sensor data and a sample with all three go through the same network.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from indai.platform.modalities import TEXT_VOCAB
from indai.trainers.models import build, register
from indai.trainers.models.checks import CNN1D_CONVS, CNN1D_POOL, patch_transformer_heads
from indai.trainers.models.multimodal.config import ANOMALY_PRETEXT, ModelConfig
from indai.trainers.models.multimodal.text_hf import mirror_folder  # also registers the hf text encoder

IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


class Block(nn.Module):
    """Pre-norm transformer block with a boolean key mask (True = attend)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))
        self.dropout = dropout

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = keep[:, None, None, :] if keep is not None else None
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(h.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class SensorNorm(nn.Module):
    """Per-channel standardisation with the dataset's training statistics, kept in the model
    so that served requests send raw sensor values."""

    def __init__(self, channels: int, mean: list[float] | None, std: list[float] | None):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean or [0.0] * channels).view(1, channels, 1))
        self.register_buffer("std", torch.tensor(std or [1.0] * channels).view(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@register("sensor", "cnn1d")
class SensorCNN(nn.Module):
    """1-D CNN with a wide first kernel (it sees a whole impact period of a bearing fault)."""

    def __init__(self, channels: int, dim: int, width: int = 32, **_):
        super().__init__()
        w = width
        sizes = (channels, w, 2 * w, 2 * w, 4 * w)
        layers: list[nn.Module] = []
        # the stages' geometry lives in trainers.models.checks, which derives the shortest window
        # this encoder takes from it (config validation refuses shorter ones)
        for (kernel, stride, padding), cin, cout in zip(CNN1D_CONVS, sizes, sizes[1:]):
            layers += [nn.Conv1d(cin, cout, kernel, stride=stride, padding=padding), nn.BatchNorm1d(cout), nn.ReLU(),
                       nn.MaxPool1d(CNN1D_POOL)]
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(4 * w, dim)

    def tuning_blocks(self) -> list[list[str]]:
        """The conv + BatchNorm stages, input to output (for trainers.finetune)."""
        return [[f"body.{i}", f"body.{i + 1}"] for i in range(0, len(self.body), 4)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x).mean(dim=-1))


@register("sensor", "patch_transformer")
class SensorPatchTransformer(nn.Module):
    """Patches of `patch` samples -> tokens -> transformer -> mean."""

    def __init__(self, channels: int, dim: int, length: int, width: int = 64, patch: int = 16, layers: int = 2, **_):
        super().__init__()
        heads = patch_transformer_heads(width)  # config validation checks that they divide the width
        self.embed = nn.Conv1d(channels, width, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, length // patch, width))
        self.blocks = nn.ModuleList(Block(width, heads, 0.0) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).transpose(1, 2) + self.pos
        for blk in self.blocks:
            h = blk(h)
        return self.out(self.norm(h).mean(dim=1))


@register("text", "byte_transformer")
class ByteTextEncoder(nn.Module):
    """UTF-8 byte embeddings -> transformer -> masked mean. Pretrained text encoders from the
    weight mirror plug in here under their own registered names."""

    def __init__(self, dim: int, max_len: int = 128, width: int = 64, layers: int = 2, heads: int = 4, **_):
        super().__init__()
        self.embed = nn.Embedding(TEXT_VOCAB, width, padding_idx=0)
        self.pos = nn.Parameter(torch.zeros(1, max_len, width))
        self.blocks = nn.ModuleList(Block(width, heads, 0.0) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        keep = tokens != 0
        keep = keep | (~keep.any(dim=1, keepdim=True))  # an empty text attends to its padding
        h = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
        for blk in self.blocks:
            h = blk(h, keep)
        w = keep.unsqueeze(-1).to(h.dtype)
        return self.out((self.norm(h) * w).sum(1) / w.sum(1))


class ImageEncoder(nn.Module):
    """Any timm model by name, pooled features -> one token."""

    def __init__(self, timm_name: str, dim: int, pretrained: str | None = None, store=None, load_weights: bool = True):
        super().__init__()
        import timm

        if pretrained and load_weights:  # weights from the mirror (never a hub); its card names the architecture
            from indai.trainers.pretrained import timm_backbone

            self.backbone = timm_backbone(timm_name, pretrained, store, num_classes=0)
        else:
            self.backbone = timm.create_model(timm_name, pretrained=False, num_classes=0)
        # a pretrained backbone expects the normalisation it was trained with (e.g. 0.5/0.5 for tf_ ports)
        data_cfg = (getattr(self.backbone, "pretrained_cfg", None) or {}) if pretrained else {}
        self.register_buffer("mean", torch.tensor(data_cfg.get("mean", IMAGE_MEAN)).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(data_cfg.get("std", IMAGE_STD)).view(1, 3, 1, 1))
        self.out = nn.Linear(self.backbone.num_features, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.backbone((x - self.mean) / self.std))


class MultimodalModel(nn.Module):
    """forward(sensor=[B,C,L], image=[B,3,H,W] in 0..1, text=[B,T] byte tokens, mask=[B,3]) -> the
    task's output (`task_output`: logits, a value, or an anomaly score with its training extras).

    `mask[:, i]` is 1 where modality i (sensor, image, text) is present; absent inputs may be
    zeros. Modalities the model was not built with are ignored.
    """

    ORDER = ("sensor", "image", "text")

    def __init__(self, cfg: ModelConfig, store=None, load_pretrained: bool = True):
        """`store`: where the weight mirror lives; `load_pretrained=False` builds pretrained
        encoders with random weights (export loads the trained weights over them anyway)."""
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.encoders = nn.ModuleDict()
        if "sensor" in cfg.modalities:
            s = cfg.sensor
            self.sensor_norm = SensorNorm(s.channels, cfg.sensor_mean, cfg.sensor_std)
            self.encoders["sensor"] = build("sensor", s.kind, channels=s.channels, dim=d, length=s.length,
                                            width=s.width, patch=s.patch, layers=s.layers)
        if "image" in cfg.modalities:
            self.encoders["image"] = ImageEncoder(cfg.image.timm_name, d, cfg.image.pretrained, store, load_pretrained)
        if "text" in cfg.modalities:
            t = cfg.text
            if t.kind == "hf":
                self.encoders["text"] = build("text", "hf", dim=d, folder=mirror_folder(t.pretrained or t.config_from, store),
                                              load_weights=load_pretrained and t.pretrained is not None,
                                              pooling=t.pooling, max_len=t.max_len)
            else:
                self.encoders["text"] = build("text", "byte_transformer", dim=d, max_len=t.max_len, width=t.width,
                                              layers=t.layers, heads=t.heads)
        self.modality_embed = nn.Parameter(torch.zeros(1, 1 + len(self.ORDER), d))
        self.fusion_token = nn.Parameter(torch.zeros(1, 1, d))
        nn.init.trunc_normal_(self.modality_embed, std=0.02)
        nn.init.trunc_normal_(self.fusion_token, std=0.02)
        self.fusion = nn.ModuleList(Block(d, cfg.fusion_heads, cfg.dropout) for _ in range(cfg.fusion_layers))
        self.norm = nn.LayerNorm(d)
        outputs = {"classification": cfg.num_classes, "regression": 1, "anomaly": ANOMALY_PRETEXT}[cfg.task]
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(d, outputs))
        if cfg.task == "regression":  # the head learns the standardised target; forward answers in real units
            self.register_buffer("target_mean", torch.tensor(float(cfg.target_mean or 0.0)))
            self.register_buffer("target_std", torch.tensor(float(cfg.target_std or 1.0)))
        if cfg.task == "anomaly":  # Gaussian of the normal embeddings, fitted after training (trainers.tasks)
            self.register_buffer("anomaly_mean", torch.zeros(d))
            self.register_buffer("anomaly_precision", torch.eye(d))

    def forward(self, sensor: torch.Tensor | None = None, image: torch.Tensor | None = None,
                text: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        inputs = {"sensor": sensor, "image": image, "text": text}
        batch = next(v.shape[0] for v in inputs.values() if v is not None)
        tokens = [(self.fusion_token + self.modality_embed[:, :1]).expand(batch, -1, -1)]
        keep = [torch.ones(batch, 1, dtype=torch.bool, device=self.fusion_token.device)]
        for i, name in enumerate(self.ORDER):
            if name not in self.encoders:
                continue
            x = inputs[name]
            if x is None:
                raise ValueError(f"model has a {name} encoder: pass {name}= (zeros and mask 0 when absent)")
            if name == "sensor":
                x = self.sensor_norm(x)
            tokens.append(self.encoders[name](x).unsqueeze(1) + self.modality_embed[:, 1 + i: 2 + i])
            present = mask[:, i: i + 1] > 0 if mask is not None else torch.ones(batch, 1, dtype=torch.bool, device=x.device)
            keep.append(present)
        h = torch.cat(tokens, dim=1)
        keep_mask = torch.cat(keep, dim=1)
        for blk in self.fusion:
            h = blk(h, keep_mask)
        return self.task_output(self.norm(h[:, 0]))

    def task_output(self, z: torch.Tensor) -> torch.Tensor:
        """classification: logits [B, classes]; regression: the value in the target's units [B];
        anomaly: [B, 1 + pretext + dim] = the Mahalanobis score, the pretext logits (training
        only) and the fused embedding z (to fit the normal Gaussian) in one tensor, so DDP,
        DeepSpeed and torch.export all see a single plain forward."""
        out = self.head(z)
        if self.cfg.task == "regression":
            return out[:, 0] * self.target_std + self.target_mean
        if self.cfg.task == "anomaly":
            diff = z - self.anomaly_mean
            score = ((diff @ self.anomaly_precision) * diff).sum(-1).clamp_min(0).sqrt()
            return torch.cat([score[:, None], out, z], dim=-1)
        return out


@register("model", "multimodal")
def multimodal(cfg: ModelConfig, store=None, load_pretrained: bool = True) -> MultimodalModel:
    return MultimodalModel(cfg, store, load_pretrained)
