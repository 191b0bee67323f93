"""Latents of any text: the truncated model and the SAE together, for live probing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.model import LanguageModel, load_language_model
from trainer.sae import TopKSAE


@dataclass
class EncodedText:
    token_ids: list[int]
    tokens: list[str]  # readable text of each token
    latents: torch.Tensor  # (T, n_latents) float32, zeros outside each token's top k


class LatentEncoder:
    """Loaded once per SAE and shared: encode_text is safe to call from several threads."""

    def __init__(self, cfg: dict, sae: TopKSAE, lm: LanguageModel):
        self.cfg, self.sae, self.lm = cfg, sae, lm
        self.scale = float(cfg.get("input_scale", 1.0))

    @classmethod
    def from_run(cls, run_dir: Path, device: str = "cpu") -> "LatentEncoder":
        cfg, sae = TopKSAE.load(run_dir, device)
        lm = load_language_model(cfg["model"], cfg["layer"], device)
        return cls(cfg, sae, lm)

    def tokenize(self, text: str) -> list[int]:
        return self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()  # not inference_mode: callers may edit the result
    def encode_ids(self, token_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor([token_ids], dtype=torch.long)
        x = self.lm.residual(ids)[0] * self.scale  # (T, d), normalised as in training
        return self.sae.encode_dense(x.to(self.sae.W_dec.device)).cpu()  # (T, n)

    def encode_text(self, text: str) -> EncodedText:
        token_ids = self.tokenize(text)
        latents = self.encode_ids(token_ids) if token_ids else torch.zeros(0, self.sae.n_latents)
        return EncodedText(token_ids, self.lm.token_strings(token_ids), latents)
