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

import hashlib
import json
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from trainer import corpus
from trainer.errors import RunFolderError
from trainer.files import read_arrays, write_arrays
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
DROP_TOLERANCE = 1e-7  # nats: a Newton step promising less counts as converged (fit_logistic_1d)
DIM_CANDIDATES = 32  # residual dimensions fitted per task (screened_dims)
LABELS_CACHE = "probe_labels.npz"  # in the store: its held-out contexts' labels (heldout_labels)
LABELLER = 1  # raise when probe_tasks' labelling changes: stores' cached labels are then redone
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

    def by_column(self) -> "Columns":
        """The same columns, a sparse one's entries sorted by column (what `summer` needs)."""
        if not self.sparse:
            return self
        order = torch.argsort(self.col, stable=True)
        return Columns(self.x[order], self.row[order], self.col[order], self.n_cols)

    def summer(self) -> torch.Tensor | None:
        """For sorted sparse columns (by_column), the (n_cols, E) 0/1 matrix whose product with
        per-entry values sums them per column: a CSR product is ~10x faster than index_add_ on a
        CPU, and sums every task's values in one pass."""
        if not self.sparse:
            return None
        counts = torch.bincount(self.col, minlength=self.n_cols)
        crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return torch.sparse_csr_tensor(crow, torch.arange(len(self.col)), torch.ones(len(self.col)),
                                       (self.n_cols, len(self.col)))

    def column_sum(self, values: torch.Tensor, summer: torch.Tensor | None = None) -> torch.Tensor:
        """Per column (and task), the sum over rows of `values`: (E,) or (E, T) sparse, through
        `summer` (these sorted columns' summer()), (N, D) or (N, D, T) dense, to (n_cols,) or
        (n_cols, T)."""
        if not self.sparse:
            return values.sum(0)
        flat = values[:, None] if values.dim() == 1 else values.flatten(1)
        return (summer @ flat).reshape(self.n_cols, *values.shape[1:])

    def logits(self, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """w x + b for every probe, w and b (n_cols, T): (E, T) sparse, (N, D, T) dense."""
        if self.sparse:
            return torch.addcmul(b.index_select(0, self.col), self.x[:, None], w.index_select(0, self.col))
        return self.x[..., None] * w + b

    def features(self) -> torch.Tensor:
        """x shaped to broadcast against logits."""
        return self.x[:, None] if self.sparse else self.x[..., None]


class LogisticColumns:
    """The loss of sigmoid(w x + b) on every column and task, and its Newton step, for
    fit_logistic_1d: x scaled to unit RMS per column; a sparse column's rows where x is 0 counted
    once (`zeros`, `zero_positives`: they all share the logit b)."""

    def __init__(self, columns: Columns, y: torch.Tensor, l2: float):
        columns = columns.by_column()
        self.summer = columns.summer()
        self.n, self.l2 = len(y), l2
        x = columns.x.float()
        if columns.sparse:
            self.y = y[columns.row]  # (E, T)
            self.n_cols = n_cols = columns.n_cols
            self.zeros = (self.n - torch.bincount(columns.col, minlength=n_cols).float())[:, None]
            self.zero_positives = y.sum(0) - columns.column_sum(self.y, self.summer)
        else:
            self.y = y[:, None, :]
            self.n_cols = n_cols = x.shape[1]
            self.zeros = self.zero_positives = x.new_zeros(n_cols, 1)
        scale = (columns.column_sum(x * x, self.summer) / self.n).sqrt()
        self.scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        self.columns = Columns(x / (self.scale[columns.col] if columns.sparse else self.scale), columns.row,
                               columns.col, n_cols)
        self.feature = self.columns.features()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        return self.columns.column_sum(values, self.summer)

    def logits(self, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.columns.logits(w, b)

    def loss(self, z: torch.Tensor, w: torch.Tensor, b: torch.Tensor, penalty: bool = True) -> torch.Tensor:
        """(n_cols, T) mean cross-entropy at logits z = logits(w, b) (+ l2/2 w²)."""
        total = self.sum(softplus(z) - self.y * z) + self.zeros * softplus(b) - self.zero_positives * b
        return total / self.n + (self.l2 / 2 * w * w if penalty else 0)

    def newton_step(self, z: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The Newton step (d_w, d_b) of each column's (w, b), and the loss drop it promises
        (half the Newton decrement)."""
        p = torch.sigmoid(z)
        r, h = p - self.y, p * (1 - p)
        hx = h * self.feature
        p0 = torch.sigmoid(b)
        g_w = self.sum(r * self.feature) / self.n + self.l2 * w
        g_b = (self.sum(r) + self.zeros * p0 - self.zero_positives) / self.n
        h_ww = self.sum(hx * self.feature) / self.n + self.l2
        h_wb = self.sum(hx) / self.n
        h_bb = (self.sum(h) + self.zeros * p0 * (1 - p0)) / self.n + 1e-12
        det = (h_ww * h_bb - h_wb * h_wb).clamp_min(1e-30)
        d_w, d_b = (h_bb * g_w - h_wb * g_b) / det, (h_ww * g_b - h_wb * g_w) / det
        return d_w, d_b, (g_w * d_w + g_b * d_b) / 2


def fit_logistic_1d(columns: Columns, y: torch.Tensor, l2: float = L2, steps: int = NEWTON_STEPS
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit sigmoid(w x + b) to the 0/1 labels y on every column at once, minimising the mean
    cross-entropy + l2/2 w² with x scaled to unit RMS per column: Newton's method on each
    column's (w, b), halving a column's step until its loss falls. `y` is (N,) for one task or
    (N, T) for T tasks on the same rows, fitted together (one pass over the columns' entries
    serves them all). Returns (w, b, loss), each (n_cols,) or (n_cols, T) as `y`, w in the
    column's own units and loss without the penalty."""
    one_task = y.dim() == 1
    # float32 throughout: twice as fast as float64, and sums of tens of thousands of terms keep ~1e-6
    y = y.float()[:, None] if one_task else y.float()  # (N, T)
    fit = LogisticColumns(columns, y, l2)
    share = y.mean(0).clamp(1e-6, 1 - 1e-6)
    w = y.new_zeros(fit.n_cols, y.shape[1])
    b = (share / (1 - share)).log().expand_as(w).clone()
    z = fit.logits(w, b)
    current = fit.loss(z, w, b)
    for _ in range(steps):
        d_w, d_b, promised = fit.newton_step(z, w, b)
        # Below DROP_TOLERANCE a column is at its optimum (float32 losses cannot show less), and
        # halving its step would only chase rounding.
        done = promised < DROP_TOLERANCE
        if bool(done.all()):
            break
        step, moved = torch.ones_like(w), done.clone()
        for _ in range(6):  # halve the step where the loss did not fall
            w_trial, b_trial = w - step * d_w, b - step * d_b
            z_trial = fit.logits(w_trial, b_trial)
            trial = fit.loss(z_trial, w_trial, b_trial)
            better = (trial <= current) & ~moved  # equal: a column already at its optimum
            if bool((better | done).all()):  # every column took the whole step: its logits serve the next one
                w, b, z, current, moved = w_trial, b_trial, z_trial, trial, moved | better
                break
            w, b = torch.where(better, w_trial, w), torch.where(better, b_trial, b)
            current, moved = torch.where(better, trial, current), moved | better
            z = None
            if bool(moved.all()):
                break
            step = torch.where(moved, step, step / 2)
        z = fit.logits(w, b) if z is None else z
        if not bool((moved & ~done).any()):
            break  # no step lowered any loss
    final = fit.loss(z, w, b, penalty=False).float()
    w, b = (w / fit.scale[:, None]).float(), b.float()
    return (w[:, 0], b[:, 0], final[:, 0]) if one_task else (w, b, final)


def softplus(z: torch.Tensor) -> torch.Tensor:
    """log(1 + e^z), as F.softplus, by logaddexp: 2x faster on a CPU."""
    return torch.logaddexp(z, z.new_zeros(()))


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
    # Products as wide as a multiple of 8 tasks, the extra columns zero: BLAS takes a slow path
    # at odd widths (11 columns cost 1.5-2x what 16 do here).
    width = -(-n_tasks // 8) * 8
    share = y.mean(0).clamp(1e-6, 1 - 1e-6).numpy()

    def loss_and_gradient(params: np.ndarray) -> tuple[float, np.ndarray]:
        w = torch.from_numpy(params[:-n_tasks].reshape(d, n_tasks))
        w_wide = w.new_zeros(d, width, dtype=torch.float32)
        w_wide[:, :n_tasks] = w
        z = (x @ w_wide)[:, :n_tasks].double() + torch.from_numpy(params[-n_tasks:])
        loss = (softplus(z).sum() - (y * z).sum()) / len(y) + l2 / 2 * (w * w).sum()
        r_wide = z.new_zeros(len(y), width, dtype=torch.float32)
        r_wide[:, :n_tasks] = (torch.sigmoid(z) - y) / len(y)
        r = r_wide[:, :n_tasks]
        return float(loss), torch.cat([(x_t @ r_wide)[:, :n_tasks].double().add_(w, alpha=l2).reshape(-1),
                                       r.sum(0).double()]).numpy()

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


def probe_task(data: ProbeData, rows: torch.Tensor, y: torch.Tensor, train: torch.Tensor, latent_fit: tuple,
               dense_logits: torch.Tensor) -> dict:
    """One task's row of the table (see probe_losses); `latent_fit`: its 1-D probes on every
    latent (w, b, train loss; latent_fits), `dense_logits`: the dense probe's on its test
    positions (dense_test_logits)."""
    y = y.float()
    tr, te = rows[train], rows[~train]
    y_tr, y_te = y[train], y[~train]
    w, b, train_loss = latent_fit
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


def same_positions(tasks: dict) -> list[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """The tasks grouped by their positions and split, (rows, train, names) each: the corpus's
    tasks are all on the same positions, and their probes are fitted together."""
    groups: list[tuple[torch.Tensor, torch.Tensor, list[str]]] = []
    for name, (rows, _, train) in tasks.items():
        group = next((g for g in groups if torch.equal(g[0], rows) and torch.equal(g[1], train)), None)
        if group is None:
            groups.append((rows, train, [name]))
        else:
            group[2].append(name)
    return groups


def latent_fits(data: ProbeData, tasks: dict, n_latents: int) -> dict[str, tuple]:
    """Each task's 1-D probes on every latent over its train positions: (w, b, train loss),
    (n_latents,) each; tasks on the same positions fitted together (fit_logistic_1d)."""
    fits = {}
    for rows, train, names in same_positions(tasks):
        tr = rows[train]
        y = torch.stack([tasks[name][1][train].float() for name in names], 1)
        w, b, loss = fit_logistic_1d(latent_columns(data.indices[tr], data.values[tr], n_latents), y)
        fits |= {name: (w[:, i], b[:, i], loss[:, i]) for i, name in enumerate(names)}
    return fits


def dense_test_logits(data: ProbeData, tasks: dict) -> dict[str, torch.Tensor]:
    """Each task's dense-probe logits on its test positions; tasks on the same positions and split
    fitted together, in one L-BFGS run (fit_dense_probe)."""
    logits = {}
    for rows, train, names in same_positions(tasks):
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
    fits = latent_fits(data, scored_tasks, n_latents)
    for name, (rows, y, train) in progress(scored_tasks.items(), desc="probe", unit="task"):
        rows_of[name] |= probe_task(data, rows, y, train, fits[name], dense[name])
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


def labels_key(store: ActivationStore) -> str:
    """What the held-out labels depend on: the labeller and its tasks, the corpus, and the
    held-out tokens themselves (a store rebuilt in place gets a new key)."""
    held = np.ascontiguousarray(store.tokens[store.n_train_contexts :])
    digest = hashlib.sha256(held.tobytes()).hexdigest()[:16]
    return json.dumps({"labeller": LABELLER, "tasks": list(TASKS), "corpus": str(store.meta["corpus"]),
                       "tokens": f"{held.shape}|{digest}"})


def heldout_labels(store: ActivationStore, tokenizer) -> tuple[np.ndarray, np.ndarray, dict]:
    """heldout_python_labels, computed by the first eval on a store and kept beside it
    (LABELS_CACHE), as the ablated CE is: they depend on the held-out contexts alone, and every
    later eval on the store (a sweep's rungs, an SAE evaluated again) reads them instead of the
    corpus."""
    path, key = store.path / LABELS_CACHE, labels_key(store)
    try:
        found = read_arrays(path, ("key", "labels", "valid", "dropped"))
        if str(found["key"]) == key:
            return found["labels"], found["valid"], json.loads(str(found["dropped"]))
    except (RunFolderError, json.JSONDecodeError):  # none yet, or damaged: computed again
        pass
    labels, valid, dropped = heldout_python_labels(store, tokenizer)
    try:
        write_arrays(path, {"key": np.array(key), "labels": labels, "valid": valid, "dropped": np.array(json.dumps(dropped))})
    except OSError:  # a read-only store: the next eval labels again
        pass
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
        labels, valid, dropped = heldout_labels(store, tokenizer)
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
