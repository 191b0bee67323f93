"""A run folder as a Python object: its config, SAE, metrics, and text encoded to latents.

    run = saescope.open_run("demo/runs/smollm2-135m-instruct-l6-4096-k32")
    run.cfg          # RunConfig (cfg.json): model, layer, n_latents, k, normalisation, ...
    run.sae          # the TopKSAE module: encode / decode, on normalised activations
    run.metrics      # metrics.json
    run.encode(["def f(x):", ...])                # DataFrame: text, position, token_id, token, latent, activation
                                                  # (all_positions=True: the attention sink too)
    run.encode(texts, sparse=True)                # a sparse (tokens, n_latents) tensor per text
    run.encode_activations(x), run.reconstruct(x) # activations in the model's units, normalised as in training

Text goes through the probe's own path (trainer/inference.py's LatentEncoder: the model through
the SAE's block, the run's input normalisation, the harvest's top-k selection), so a text encodes
here to the latents the probe and the harvest see. The language model loads on the first
encode; the SAE's weights alone need no model (an imported SAE without one: run.sae,
encode_activations, reconstruct).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from trainer import runfolder
from trainer.inference import LatentEncoder
from trainer.runconfig import RunConfig
from trainer.sae import TopKLatents, TopKSAE

ENCODE_COLUMNS = ["text", "position", "token_id", "token", "latent", "activation"]


class Run:
    """A run folder (trained here or imported), read-only."""

    def __init__(self, path, device: str | torch.device = "cpu"):
        self.path = Path(path)
        self.device = torch.device(device)
        self.cfg: RunConfig = RunConfig.load(self.path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}: {self.cfg.model} layer {self.cfg.layer}, {self.cfg.n_latents} latents, k={self.cfg.k})"

    @cached_property
    def sae(self) -> TopKSAE:
        """The SAE module (W_enc [d, n], b_enc, W_dec [n, d], b_dec), in eval mode without
        gradients. It reads *normalised* activations: encode_activations applies the run's
        normalisation first."""
        return runfolder.load_sae(self.path, self.device)[1]

    @property
    def metrics(self) -> dict:
        """metrics.json: fvu, l0, dead_fraction, delta_ce, ... (empty before `saescope eval`)."""
        return runfolder.load_metrics(self.path)

    @cached_property
    def encoder(self) -> LatentEncoder:
        """The probe's encoder: the language model through the SAE's block, and the SAE. Loads the
        model (once per process)."""
        return LatentEncoder(self.cfg, self.sae, self.cfg.language_model(self.device))

    # ------------------------------------------------------------ activations

    @torch.no_grad()
    def encode_activations(self, x: torch.Tensor) -> TopKLatents:
        """Residual-stream activations (N, d) at the run's hookpoint -> each row's k latents
        (values, indices: (N, k)), normalised as in training (the input scale, or per token)."""
        x_n, _ = self.cfg.norm.normalize(x.to(self.device, torch.float32))
        return self.sae.encode(x_n)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The SAE's reconstruction of activations (N, d), in the model's units."""
        x_n, stats = self.cfg.norm.normalize(x.to(self.device, torch.float32))
        return self.cfg.norm.restore(self.sae.decode(self.sae.encode(x_n)), stats)

    # ------------------------------------------------------------ text

    def encode(self, texts: list[str] | str, *, sparse: bool = False, all_positions: bool = False,
               batch_size: int = 16) -> pd.DataFrame | list[torch.Tensor]:
        """Each text through the model and the SAE, as the probe encodes it. By default a
        DataFrame with one row per firing (long form), in text, position and strongest-first
        order: text (the text's number in `texts`), position, token_id, token (the token's piece
        of the text), latent, activation (> 0). With `sparse=True`, per text a sparse COO tensor
        (tokens, n_latents) of the same activations.

        Like the harvest and the probe's page, it leaves out the positions the run does not count
        (run.cfg.positions: the first position, an attention sink whose huge activations would top
        every ranking, and the tokenizer's special tokens); `all_positions=True` keeps them.
        `batch_size` texts run through the model at once."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        encoder = self.encoder
        limit = encoder.lm.max_positions
        token_ids = [encoder.tokenize(text) for text in texts]
        for number, ids in enumerate(token_ids):
            if limit and len(ids) > limit:
                raise ValueError(f"text {number} is {len(ids)} tokens; {self.cfg.model} takes at most {limit}")
        encoded: list[TopKLatents | None] = [None] * len(texts)
        todo = [number for number, ids in enumerate(token_ids) if ids]
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            for number, latents in zip(batch, encoder.encode_topk_batch([token_ids[i] for i in batch])):
                encoded[number] = latents
        if not all_positions:
            encoded = [None if latents is None else self._counted(latents, ids) for latents, ids in zip(encoded, token_ids)]
        if sparse:
            return [self._sparse(latents, len(ids)) for latents, ids in zip(encoded, token_ids)]
        return self._frame(texts, token_ids, encoded)

    def _counted(self, latents: TopKLatents, ids: list[int]) -> TopKLatents:
        """The latents with the positions the run leaves out set to zero (so they drop out)."""
        positions = self.cfg.positions
        special = self.encoder.lm.special_token_ids if positions.exclude_special_tokens else []
        counted = torch.from_numpy(positions.mask(np.asarray([ids]), special)[0])  # (T,)
        return TopKLatents(latents.values * counted[:, None], latents.indices)

    def _sparse(self, latents: TopKLatents | None, n_tokens: int) -> torch.Tensor:
        n = self.cfg.n_latents
        if latents is None:
            return torch.sparse_coo_tensor(torch.zeros(2, 0, dtype=torch.long), torch.zeros(0), (0, n))
        fired = latents.values > 0
        rows = torch.arange(n_tokens)[:, None].expand_as(latents.indices)[fired]
        return torch.sparse_coo_tensor(torch.stack([rows, latents.indices[fired]]), latents.values[fired],
                                       (n_tokens, n)).coalesce()

    def _frame(self, texts: list[str], token_ids: list[list[int]], encoded: list[TopKLatents | None]) -> pd.DataFrame:
        parts = []
        for number, (ids, latents) in enumerate(zip(token_ids, encoded)):
            if latents is None:
                continue
            values, indices = latents.values.numpy(), latents.indices.numpy()  # (T, k), strongest first
            fired = values > 0
            positions = np.nonzero(fired)[0]
            pieces = np.array([piece.text for piece in self.encoder.lm.token_pieces(ids)], dtype=object)
            parts.append(pd.DataFrame({
                "text": np.full(len(positions), number, dtype=np.int32),
                "position": positions.astype(np.int32),
                "token_id": np.asarray(ids, dtype=np.int32)[positions],
                "token": pieces[positions],
                "latent": indices[fired].astype(np.int32),
                "activation": values[fired].astype(np.float32),
            }))
        if not parts:
            return pd.DataFrame({column: pd.Series(dtype=dtype) for column, dtype in zip(
                ENCODE_COLUMNS, ["int32", "int32", "int32", "object", "int32", "float32"])})
        return pd.concat(parts, ignore_index=True)


def open_run(path, device: str | torch.device = "cpu") -> Run:
    """A run folder (`saescope train` or `saescope import` made it) as a Run; cfg.json is read and
    checked now, the weights and the model when first used."""
    return Run(path, device)
