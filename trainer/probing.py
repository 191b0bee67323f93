"""Probe loss (Gao et al. 2024, Section 4.4): how well single latents classify binary token tasks.

For each task, a 1-D logistic probe p(y | a) = sigmoid(w a + b) is fitted on every latent's
activation a over the train split (all latents at once, by Newton's method), the latent with the
lowest train loss is chosen, and its cross-entropy on the test split is the task's loss;
`probe_loss` is the mean over the tasks. An SAE whose latents line up with features a reader
would name scores low.

Reference points, on the same splits:
- the residual stream's own dimensions, as 1-D probes fitted the same way on the DIM_CANDIDATES
  dimensions whose class means differ most (what the SAE's basis adds over the model's);
- a dense L2-regularised logistic probe on the whole residual stream, by L-BFGS (what a linear
  probe can read at all: a floor for one latent);
- the base entropy: the cross-entropy on the test split of always predicting the train split's
  share of positives (a ceiling: a useless latent's probe converges there).

The tasks (trainer/probe_tasks.py): the held-out contexts of a Python corpus (the default stdlib
one) labelled by Python's own `tokenize` over each whole document, or a JSONL file of labelled
texts for any corpus. Held-out contexts are split by context: the first TRAIN_SHARE of them
(already in a seeded random order) train, the rest test. The positions counted are the run's own
(trainer.store.Positions: not the first of each context, not special tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from trainer import corpus
from trainer.model import load_tokenizer
from trainer.probe_tasks import TASKS, LabelledText, python_char_labels, split_of, token_chars, token_labels
from trainer.progress import progress
from trainer.runconfig import RunConfig
from trainer.sae import InputNorm, TopKSAE, fast_matmul_dtype
from trainer.store import ActivationStore
from trainer.tokens import token_pieces

TRAIN_SHARE = 2 / 3  # of the held-out contexts (or of a task's texts: probe_tasks.split_of)
L2 = 1e-4  # on the 1-D probes' weight, the activation scaled to unit RMS: keeps a separable task finite
DENSE_L2 = 1e-3  # on the dense probe's weights, each dimension standardised
NEWTON_STEPS = 12
DIM_CANDIDATES = 32  # residual dimensions fitted per task (screened_dims)
MIN_EXAMPLES = 8  # positives and negatives each task needs in each split to be scored


# ---------------------------------------------------------------- 1-D logistic probes


class Columns(NamedTuple):
    """Features for many 1-D probes at once. Dense: `x` is (N, D), one column per probe. Sparse
    (SAE latents): `x` holds only the non-zero entries (E,), entry e at row `row[e]` of column
    `col[e]`; every other (row, column) is 0."""

    x: torch.Tensor
    row: torch.Tensor | None = None
    col: torch.Tensor | None = None
    n_cols: int = 0

    @property
    def sparse(self) -> bool:
        return self.col is not None

    def column_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.sparse:
            return values.new_zeros(self.n_cols).index_add_(0, self.col, values)
        return values.sum(0)

    def logits(self, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.x * w[self.col] + b[self.col] if self.sparse else self.x * w + b


def fit_logistic_1d(columns: Columns, y: torch.Tensor, l2: float = L2, steps: int = NEWTON_STEPS
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit sigmoid(w x + b) to the 0/1 labels y (N,) on every column at once, minimising the mean
    cross-entropy + l2/2 w² with x scaled to unit RMS per column: Newton's method on each
    column's (w, b), halving a column's step until its loss falls. Returns (w, b, loss) per
    column, w in the column's own units and loss without the penalty."""
    y = y.float()  # float32 throughout: twice as fast as float64, and sums of tens of thousands of terms keep ~1e-6
    n = len(y)
    x = columns.x.float()
    if columns.sparse:
        y_e = y[columns.row]
        n_cols = columns.n_cols
        zeros = n - torch.bincount(columns.col, minlength=n_cols).float()  # rows where the column is 0
        zero_positives = y.sum() - y_e.new_zeros(n_cols).index_add_(0, columns.col, y_e)
    else:
        y_e = y[:, None]
        n_cols = x.shape[1]
        zeros = zero_positives = x.new_zeros(n_cols)
    scale = (columns.column_sum(x * x) / n).sqrt()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scaled = Columns(x / (scale[columns.col] if columns.sparse else scale), columns.row, columns.col, n_cols)
    share = float(y.mean().clamp(1e-6, 1 - 1e-6))
    w, b = x.new_zeros(n_cols), x.new_full((n_cols,), math.log(share / (1 - share)))

    def loss(w, b, penalty=True):
        z = scaled.logits(w, b)
        total = scaled.column_sum(F.softplus(z) - y_e * z) + zeros * F.softplus(b) - zero_positives * b
        return total / n + (l2 / 2 * w * w if penalty else 0)

    current = loss(w, b)
    for _ in range(steps):
        z = scaled.logits(w, b)
        p = torch.sigmoid(z)
        r, h = p - y_e, p * (1 - p)
        p0 = torch.sigmoid(b)
        g_w = scaled.column_sum(r * scaled.x) / n + l2 * w
        g_b = (scaled.column_sum(r) + zeros * p0 - zero_positives) / n
        h_ww = scaled.column_sum(h * scaled.x * scaled.x) / n + l2
        h_wb = scaled.column_sum(h * scaled.x) / n
        h_bb = (scaled.column_sum(h) + zeros * p0 * (1 - p0)) / n + 1e-12
        det = (h_ww * h_bb - h_wb * h_wb).clamp_min(1e-30)
        d_w, d_b = (h_bb * g_w - h_wb * g_b) / det, (h_ww * g_b - h_wb * g_w) / det
        step = torch.ones_like(w)
        moved = torch.zeros_like(w, dtype=torch.bool)
        for _ in range(6):  # halve the step where the loss did not fall
            trial = loss(w - step * d_w, b - step * d_b)
            better = (trial <= current) & ~moved  # equal: a column already at its optimum
            w, b = torch.where(better, w - step * d_w, w), torch.where(better, b - step * d_b, b)
            current = torch.where(better, trial, current)
            moved |= better
            if bool(moved.all()):
                break
            step = torch.where(moved, step, step / 2)
        if not bool(moved.any()) or float((step * d_w).abs().max()) < 1e-5 and float((step * d_b).abs().max()) < 1e-5:
            break  # converged: Newton's last step moved nothing that matters
    return (w / scale).float(), b.float(), loss(w, b, penalty=False).float()


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Mean binary cross-entropy (nats) of sigmoid(logits) against 0/1 labels."""
    return float(F.binary_cross_entropy_with_logits(logits.double(), y.double()))


def base_entropy(y_train: torch.Tensor, y_test: torch.Tensor) -> float:
    """Test cross-entropy of always predicting the train split's share of positives."""
    share = float(y_train.double().mean().clamp(1e-6, 1 - 1e-6))
    return cross_entropy(torch.full_like(y_test, math.log(share / (1 - share)), dtype=torch.float64), y_test)


def fit_dense_probe(x_train: torch.Tensor, y_train: torch.Tensor, l2: float = DENSE_L2, max_iter: int = 100):
    """Logistic probes on every dimension at once (standardised; mean CE + l2/2 |w|² each), by
    SciPy's L-BFGS (torch.optim's import alone costs seconds). `y_train` is (N,) for one task or
    (N, T) for T tasks on the same positions, fitted together: their losses are independent, so
    the sum's minimum is each one's, and one (N, d) x (d, T) product per step serves them all.
    Returns a function from features to logits, (M,) or (M, T) as `y_train`."""
    from scipy.optimize import minimize

    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x = ((x_train - mean) / std).float()  # float32 products (3x numpy's float64 here), float64 sums
    x_t = x.T.contiguous()
    y = y_train.double().reshape(len(y_train), -1)  # (N, T)
    d, n_tasks = x.shape[1], y.shape[1]
    share = y.mean(0).clamp(1e-6, 1 - 1e-6).numpy()

    def loss_and_gradient(params: np.ndarray) -> tuple[float, np.ndarray]:
        w = torch.from_numpy(params[:-n_tasks].reshape(d, n_tasks))
        z = (x @ w.float()).double() + torch.from_numpy(params[-n_tasks:])
        loss = (F.softplus(z).mean(0) - (y * z).mean(0)).sum() + l2 / 2 * (w * w).sum()
        r = (torch.sigmoid(z) - y) / len(y)
        return float(loss), torch.cat([(x_t @ r.float()).double().add_(w, alpha=l2).reshape(-1), r.sum(0)]).numpy()

    start = np.concatenate([np.zeros(d * n_tasks), np.log(share / (1 - share))])
    found = minimize(loss_and_gradient, start, jac=True, method="L-BFGS-B", options={"maxiter": max_iter}).x
    w, b = torch.from_numpy(found[:-n_tasks].reshape(d, n_tasks)), torch.from_numpy(found[-n_tasks:])
    if y_train.dim() == 1:
        w, b = w[:, 0], b[0]
    return lambda features: ((features - mean) / std).double() @ w + b


# ---------------------------------------------------------------- the data


@dataclass
class ProbeData:
    """What the probes are fitted on: per position its SAE code (the k chosen latents and their
    activations) and its residual stream, and per task which positions it uses, their labels and
    which are in the train split."""

    indices: torch.Tensor  # (N, k) the latents chosen at each position
    values: torch.Tensor  # (N, k) their activations
    resid: torch.Tensor  # (N, d) the residual stream
    tasks: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # name -> (rows, labels, train)
    source: str  # for pages: where the labels came from
    dropped: dict  # what could not be labelled, counted


def latent_columns(indices: torch.Tensor, values: torch.Tensor, n_latents: int) -> Columns:
    fired = values > 0
    row = torch.arange(len(indices))[:, None].expand_as(indices)[fired]
    return Columns(values[fired], row, indices[fired], n_latents)


def latent_activation(indices: torch.Tensor, values: torch.Tensor, latent: int) -> torch.Tensor:
    """(N,) one latent's activation at each position (0 where it is not among the chosen)."""
    return (values * (indices == latent)).sum(1)


def screened_dims(x: torch.Tensor, y: torch.Tensor, n: int = DIM_CANDIDATES) -> torch.Tensor:
    """The n dimensions whose means differ most between positives and negatives, in standard
    deviations: the residual dimensions worth a 1-D probe (a probe on one dimension is monotone in
    it, and the best one is among the most separated in all but contrived cases; 18x less work
    than fitting all 576 of SmolLM2's)."""
    positive = y > 0.5
    gap = (x[positive].mean(0) - x[~positive].mean(0)).abs() / x.std(0).clamp_min(1e-6)
    return gap.topk(min(n, x.shape[1])).indices


def probe_task(data: ProbeData, rows: torch.Tensor, y: torch.Tensor, train: torch.Tensor, n_latents: int,
               dense_logits: torch.Tensor) -> dict:
    """One task's row of the table (see probe_losses); `dense_logits`: the dense probe's on its
    test positions (dense_test_logits)."""
    y = y.float()
    tr, te = rows[train], rows[~train]
    y_tr, y_te = y[train], y[~train]
    w, b, train_loss = fit_logistic_1d(latent_columns(data.indices[tr], data.values[tr], n_latents), y_tr)
    latent = int(train_loss.argmin())
    a_te = latent_activation(data.indices[te], data.values[te], latent)
    dims = screened_dims(data.resid[tr], y_tr)
    w_r, b_r, train_loss_r = fit_logistic_1d(Columns(data.resid[tr][:, dims]), y_tr)
    best = int(train_loss_r.argmin())
    dim, w_r, b_r = int(dims[best]), w_r[best], b_r[best]
    return {
        "positives": float(y.mean()),
        "train_positions": int(len(tr)),
        "test_positions": int(len(te)),
        "best_latent": latent,
        "latent_loss": cross_entropy(w[latent] * a_te + b[latent], y_te),
        "best_dim": dim,
        "residual_loss": cross_entropy(w_r * data.resid[te, dim] + b_r, y_te),
        "dense_loss": cross_entropy(dense_logits, y_te),
        "base_entropy": base_entropy(y_tr, y_te),
    }


def dense_test_logits(data: ProbeData, tasks: dict) -> dict[str, torch.Tensor]:
    """Each task's dense-probe logits on its test positions; tasks on the same positions and split
    (all of the corpus's) are fitted together, in one L-BFGS run (fit_dense_probe)."""
    groups: list[tuple[torch.Tensor, torch.Tensor, list[str]]] = []
    for name, (rows, _, train) in tasks.items():
        group = next((g for g in groups if torch.equal(g[0], rows) and torch.equal(g[1], train)), None)
        if group is None:
            groups.append((rows, train, [name]))
        else:
            group[2].append(name)
    logits = {}
    for rows, train, names in groups:
        y = torch.stack([tasks[name][1][train].float() for name in names], 1)
        found = fit_dense_probe(data.resid[rows[train]], y)(data.resid[rows[~train]])
        logits |= {name: found[:, i] for i, name in enumerate(names)}
    return logits


def probe_losses(data: ProbeData, n_latents: int) -> dict:
    """metrics.json's probe keys: probe_loss (the mean over scored tasks of the best latent's test
    cross-entropy), probe_residual_loss, probe_dense_loss and probe_base_entropy (the same means
    for the references), probe_tasks (a row per task: task, description, positives (share),
    train/test positions, best_latent, latent_loss, best_dim, residual_loss, dense_loss,
    base_entropy; or task and skipped: why), probe_source and probe_dropped."""
    rows_of, scored_tasks = {}, {}  # the table's rows by task, in the tasks' order
    for name, (rows, y, train) in data.tasks.items():
        rows_of[name] = {"task": name, **({"description": TASKS[name]} if name in TASKS else {})}
        counts = [int(part.sum()) for part in (y[train], ~y[train], y[~train], ~y[~train])]
        if min(counts) < MIN_EXAMPLES:
            rows_of[name] |= {"positives": float(y.float().mean()) if len(y) else 0.0,
                              "skipped": f"fewer than {MIN_EXAMPLES} positives or negatives in a split "
                                         f"(train {counts[0]}/{counts[1]}, test {counts[2]}/{counts[3]})"}
        else:
            scored_tasks[name] = (rows, y, train)
    dense = dense_test_logits(data, scored_tasks)
    for name, (rows, y, train) in progress(scored_tasks.items(), desc="probe", unit="task"):
        rows_of[name] |= probe_task(data, rows, y, train, n_latents, dense[name])
    table = list(rows_of.values())
    scored = [row for row in table if "skipped" not in row]

    def mean(key):
        return sum(row[key] for row in scored) / len(scored) if scored else None

    return {"probe_loss": mean("latent_loss"), "probe_residual_loss": mean("residual_loss"),
            "probe_dense_loss": mean("dense_loss"), "probe_base_entropy": mean("base_entropy"),
            "probe_tasks": table, "probe_source": data.source, "probe_dropped": data.dropped}


# ---------------------------------------------------------------- held-out contexts of a Python corpus


class CorpusMismatch(ValueError):
    """The corpus read now does not give the store's held-out contexts."""


def heldout_python_labels(store: ActivationStore, tokenizer) -> tuple[np.ndarray, np.ndarray, dict]:
    """Labels of TASKS for the store's held-out contexts: (C_h, T, tasks) bool, and (C_h, T) bool
    which positions have them. Reads the store's corpus again as `prepare_store` did (the same
    documents, tokenizer and cut into contexts, the same seeded order), and labels every document
    that overlaps a held-out context whole with Python's tokenize before it is cut; documents
    that are not Python get no labels (counted in the returned dict)."""
    meta = store.meta
    T, C, held = meta["context_length"], meta["n_contexts"], meta["n_heldout"]
    order = torch.randperm(C, generator=torch.Generator().manual_seed(meta["seed"])).numpy()  # corpus.split_contexts
    row_of = np.full(C, -1, dtype=np.int64)
    row_of[order[:held]] = np.arange(held)
    labels = np.zeros((held, T, len(TASKS)), dtype=bool)
    valid = np.zeros((held, T), dtype=bool)
    found = np.full((held, T), -1, dtype=np.int64)  # token ids as read now, to check against the store
    separator = tokenizer.eos_token_id
    needed, start = C * T, 0
    dropped = {"documents": 0, "positions": 0}
    documents = corpus.iter_documents(meta["corpus"], meta.get("text_column", corpus.TEXT_COLUMN))
    for text in documents:
        if start >= needed:
            break
        if not text.strip():
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        position = start + np.arange(len(ids) + (separator is not None))
        start += len(position)
        position = position[position < needed]
        rows = row_of[position // T]
        if not (rows >= 0).any():
            continue
        keep = rows >= 0
        where = (rows[keep], position[keep] % T)
        stream_ids = np.asarray(list(ids) + ([separator] if separator is not None else []))[: len(position)]
        found[where] = stream_ids[keep]
        pieces = [piece.text for piece in token_pieces(tokenizer, ids)]
        char_labels = python_char_labels(text) if "".join(pieces) == text else None
        if char_labels is None:
            dropped["documents"] += 1
            dropped["positions"] += int(keep[: len(ids)].sum())
            continue
        token_label, token_valid = token_labels(char_labels, token_chars(pieces), list(TASKS))
        in_doc = keep & (np.arange(len(position)) < len(ids))
        where = (rows[in_doc], position[in_doc] % T)
        labels[where] = token_label[: len(position)][in_doc[: len(ids)]]
        valid[where] = token_valid[: len(position)][in_doc[: len(ids)]]
    stored = store.tokens[store.n_train_contexts :]
    if (found < 0).any() or (found != stored).any():
        raise CorpusMismatch(f"the corpus {meta['corpus']!r} read now does not give the store's held-out contexts "
                             f"(changed since {store.path} was made?)")
    return labels, valid, dropped


def heldout_codes(sae: TopKSAE, store: ActivationStore, norm: InputNorm, rows: torch.Tensor,
                  batch: int = 8192) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SAE's code (indices, values: (N, k)) and the residual (N, d) at held-out token rows."""
    device = sae.W_dec.device
    dtype = fast_matmul_dtype(device)
    indices, values, resid = [], [], []
    for start in range(0, len(rows), batch):
        x = store.token_rows(rows[start : start + batch]).float()
        x_n, _ = norm.normalize(x.to(device))
        code = sae.encode_selected(x_n, dtype)
        indices.append(code.indices.cpu())
        values.append(code.values.cpu())
        resid.append(x)
    return torch.cat(indices), torch.cat(values), torch.cat(resid)


def corpus_probe_data(sae: TopKSAE, run_cfg: RunConfig, store: ActivationStore, tokenizer) -> ProbeData | str:
    """ProbeData for TASKS on the store's held-out contexts, or why there is none."""
    try:
        labels, valid, dropped = heldout_python_labels(store, tokenizer)
    except (CorpusMismatch, corpus.CorpusError) as e:
        return str(e)
    first = store.n_train_contexts
    counted = store.counted(run_cfg.positions, first, store.n_contexts)
    use = valid & counted  # (C_h, T)
    dropped["positions"] = int((counted & ~valid).sum())
    if not use.any():
        return (f"no held-out position could be labelled: none of the {dropped['documents']} documents of the "
                f"held-out contexts tokenizes as Python (give labelled texts with --probe-tasks)")
    held, T = use.shape
    context, t = np.nonzero(use)
    token_rows = torch.from_numpy((first + context) * T + t)
    train = torch.from_numpy(context < round(TRAIN_SHARE * held))
    indices, values, resid = heldout_codes(sae, store, run_cfg.norm, token_rows)
    y = torch.from_numpy(labels[context, t])  # (N, tasks)
    every = torch.arange(len(token_rows))
    tasks = {name: (every, y[:, i], train) for i, name in enumerate(TASKS)}
    return ProbeData(indices, values, resid, tasks, "Python's tokenize on the held-out contexts", dropped)


# ---------------------------------------------------------------- labelled texts (--probe-tasks)


def text_probe_data(sae: TopKSAE, run_cfg: RunConfig, texts: list[LabelledText], source: str) -> ProbeData:
    """ProbeData for the tasks of a --probe-tasks file: each text run through the model in windows
    of the run's context length, its positions counted as the run counts them."""
    lm = run_cfg.language_model(sae.W_dec.device)
    tokenizer = lm.tokenizer
    T = run_cfg.train.context_length if run_cfg.train else 128
    special = set(lm.special_token_ids) if run_cfg.positions.exclude_special_tokens else set()
    test_text = split_of(texts)
    dtype = fast_matmul_dtype(sae.W_dec.device)
    parts = {"indices": [], "values": [], "resid": []}
    per_task: dict[str, list] = {}
    n_rows, dropped = 0, {"positions": 0}
    for i, text in enumerate(progress(texts, desc="probe texts", unit="text")):
        ids = tokenizer(text.text, add_special_tokens=False)["input_ids"]
        pieces = [piece.text for piece in token_pieces(tokenizer, ids)]
        labels, valid = token_labels({"task": text.char_labels()}, token_chars(pieces), ["task"])
        if "".join(pieces) != text.text:  # a tokenizer that changes the text: no offsets to trust
            dropped["positions"] += len(ids)
            continue
        for start in range(0, len(ids), T):
            window = ids[start : start + T]
            keep = np.array([t >= run_cfg.positions.exclude_first and window[t] not in special for t in range(len(window))])
            keep &= valid[start : start + T]
            if not keep.any():
                continue
            resid = lm.residual(torch.tensor([window]))[0].cpu()[torch.from_numpy(keep)]
            x_n, _ = run_cfg.norm.normalize(resid.to(sae.W_dec.device))
            code = sae.encode_selected(x_n, dtype)
            parts["indices"].append(code.indices.cpu())
            parts["values"].append(code.values.cpu())
            parts["resid"].append(resid)
            rows = torch.arange(n_rows, n_rows + int(keep.sum()))
            n_rows += len(rows)
            y = torch.from_numpy(labels[start : start + T, 0][keep])
            per_task.setdefault(text.task, []).append((rows, y, torch.full((len(rows),), not test_text[i])))
    tasks = {name: tuple(torch.cat(column) for column in zip(*chunks)) for name, chunks in per_task.items()}
    empty = lambda *shape: torch.zeros(shape)  # noqa: E731
    return ProbeData(torch.cat(parts["indices"]) if parts["indices"] else empty(0, sae.k).long(),
                     torch.cat(parts["values"]) if parts["values"] else empty(0, sae.k),
                     torch.cat(parts["resid"]) if parts["resid"] else empty(0, sae.d_in), tasks, source, dropped)


def probe_loss_of(sae: TopKSAE, run_cfg: RunConfig, store: ActivationStore, texts: list[LabelledText] | None = None,
                  texts_source: str = "") -> dict:
    """The probe keys of metrics.json (probe_losses) for the held-out contexts of a Python corpus,
    or for labelled texts; {"probe_loss": None, "probe_note": why} when there is nothing to probe."""
    if texts is not None:
        data = text_probe_data(sae, run_cfg, texts, texts_source)
    else:
        data = corpus_probe_data(sae, run_cfg, store, load_tokenizer(run_cfg.model))
        if isinstance(data, str):
            return {"probe_loss": None, "probe_note": data}
    with torch.no_grad():
        return probe_losses(data, sae.n_latents)
