"""Configs as dataclasses: each field's `help` is its --help text; validation happens in
__post_init__, before any work starts; the config is saved next to what it made (cfg.json)."""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, asdict, dataclass, field, fields, replace

import torch

from trainer.errors import ConfigError
from trainer.model import BUNDLED_MODEL
from trainer.sae import NORMALIZATIONS, check_size
from trainer.store import Positions, StoreConfig

# lr = LR_CONSTANT / sqrt(n_latents / 2^14). EleutherAI's 2e-4 suits long GPU runs; at the default
# budget (300k tokens, ~1,170 steps of 256 tokens, per-token normalisation, the attention sink left
# out) a grid on SmolLM2 layer 6 at n = 4,096 put the optimum near 1.8e-3, i.e. 9e-4 at n = 2^14:
# counted FVU 0.0648 at 1.2e-3, 0.0600 at 1.8e-3 (BENCHMARKS.md, "Defaults").
LR_CONSTANT = 9e-4


def check_device(name: str) -> None:
    """The training device (--device; "" = the best there is) exists here, checked before any
    work: torch would otherwise fail deep inside the first copy to it."""
    if not name:
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name}: not a torch device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ConfigError(f"--device {name}: this machine has {count} CUDA device{'s' * (count != 1)} "
                              f"(torch {torch.__version__}); leave --device out to use the best there is")
    elif device.type != "cpu":
        raise ConfigError(f"--device {name}: saescope trains on cpu or cuda")


def option(default, help: str, flag: str | None = None):
    return field(default=default, metadata={"help": help, "flag": flag})


# What a boolean option takes after its flag, for scripts written when the options were 0/1 numbers.
BOOLEAN_WORDS = {"1": True, "0": False, "true": True, "false": False}


def check_booleans(cfg) -> None:
    """A boolean option is True or False; a config built in code with 0/1 still works."""
    for f in fields(cfg):
        if isinstance(f.default, bool):
            value = getattr(cfg, f.name)
            if value not in (0, 1):  # also True/False
                raise ConfigError(f"{flag_of(f)} is on or off (1 or 0), got {value!r}")
            object.__setattr__(cfg, f.name, bool(value))


def as_booleans(cls, saved: dict) -> dict:
    """Saved options with the boolean ones as bools: cfg.json and checkpoints written before they
    were booleans hold 0 and 1."""
    booleans = {f.name for f in fields(cls) if isinstance(f.default, bool)}
    return {key: bool(value) if key in booleans and value in (0, 1) else value for key, value in saved.items()}


def model_name(model: str) -> str:
    """A model's last path part, as pages show it (HuggingFaceTB/SmolLM2-135M -> SmolLM2-135M)."""
    return model.rstrip("/").split("/")[-1]


def run_slug(model: str, layer: int, n_latents: int, k: int) -> str:
    """A readable id for a run folder and its URLs: model, layer, size, k (e.g.
    smollm2-135m-instruct-l6-4096-k32)."""
    name = "".join(c if c.isalnum() or c in ".-" else "-" for c in model_name(model).lower()).strip("-.") or "model"
    return f"{name}-l{layer}-{n_latents}-k{k}"


@dataclass
class TrainConfig:
    model: str = option(BUNDLED_MODEL, "language model: the bundled alias, a Hugging Face name or a local folder")
    layer: int = option(6, "hookpoint: the residual stream after this block (the output of model.layers[L])")
    n_latents: int = option(4096, "number of SAE latents n", flag="--latents")
    k: int = option(32, "active latents per token (TopK)")
    tokens: int = option(300_032, "training tokens (rounded down to whole contexts)")
    epochs: int = option(1, "passes over the training tokens, each in a new shuffled order; more passes reuse the stored activations (on a CPU the SAE step costs ~5x less per token than the model's forward that makes new ones)")
    heldout_tokens: int = option(32_768, "held-out tokens for evaluation and harvest (whole contexts; the model runs over them at the first eval or harvest on the store, not in train)")
    context_length: int = option(128, "tokens per context")
    exclude_first: int = option(1, "leading positions of each context that training, evaluation, the harvest and the probe leave out (the first token is an attention sink: about 7x the others' norm; the store keeps every position)")
    exclude_special_tokens: bool = option(True, "leave the tokenizer's special tokens (the end-of-text separators between documents) out of training, evaluation, the harvest and the probe")
    corpus: str = option("stdlib", "'stdlib' (the Python standard library's source), a .txt/.jsonl/.parquet file or a folder of them, or a folder written by Hugging Face datasets' save_to_disk (Parquet and datasets folders are streamed)")
    text_column: str = option("text", "the column of a Parquet or datasets corpus that holds the text")
    batch_size: int = option(256, "tokens per optimiser step (256: at the default budget 4x the steps of 1,024, which lowers the held-out FVU more than it costs in throughput; BENCHMARKS.md)")
    normalization: str = option("token", "how inputs are normalised before the SAE: 'scale', one number for the run making E||x||^2 = d_in (Gao et al. 2024, Section 2.1); 'token', each token's mean over d subtracted and its standard deviation divided out, undone after decoding (OpenAI's released code)")
    lr: float = option(0.0, "Adam learning rate; 0 means 9e-4 / sqrt(n_latents / 2^14): the 1/sqrt(n) rule of Gao et al. 2024, with a constant 4.5x EleutherAI's 2e-4, measured best for runs of about a thousand steps (BENCHMARKS.md)")
    warmup_fraction: float = option(0.05, "share of steps with a linear learning-rate warm-up")
    decay_fraction: float = option(0.3, "share of final steps with a linear decay to zero")
    multi_topk: bool = option(False, "add the Multi-TopK loss L(4k)/8 so that the SAE also works at higher k (Gao et al. 2024, Section 5.3)")
    auxk_alpha: float = option(1.0, "weight of the AuxK loss on dead latents (0 turns it off)")
    auxk_rescale: bool = option(True, "scale each token's AuxK reconstruction of the residual by its least-squares factor, so AuxK turns dead latents towards the residual instead of pushing them all down (at n = 32,768: 4x fewer dead latents, same FVU; BENCHMARKS.md); --no-auxk-rescale: the paper's unscaled form")
    dead_tokens: int = option(0, "tokens without firing after which a latent counts as dead (and AuxK trains it); 0 means min(10M, a 300th of the tokens trained on: tokens * epochs / 300, 1,000 at the default budget, where longer windows left latents that never fire)")
    fast_matmul: bool = option(True, "bf16 matmuls where the hardware has them (CUDA, CPUs with AVX512-BF16 or AMX): the language model's forward under autocast, and choosing the top k (gradients stay fp32); --no-fast-matmul: fp32 throughout")
    checkpoint_every: int = option(100, "steps between checkpoints for --resume (0: none)")
    memory_budget_mb: int = option(144, "MiB of activations held in RAM at once: the store stays on disk and is read in chunks of this size (shuffled token by token within a chunk); 144 holds 256 contexts of 128 tokens at d=576")
    seed: int = option(0, "seed for the data split, shuffling and initialisation")
    deterministic: bool = option(False, "on CUDA, deterministic kernels (index_add_ without atomic adds, cuBLAS with a fixed workspace), so that a run resumed after a kill ends with exactly the weights of an uninterrupted one; without it, CUDA's atomic kernels, whose sums differ in the last bits from run to run. A CPU run is deterministic either way")
    device: str = option("", "torch device; empty means cuda when available, else cpu")

    def __post_init__(self):
        check_size(self.n_latents, self.k, "--latents", "--k")
        if self.multi_topk and 4 * self.k >= self.n_latents:
            raise ConfigError(f"--multi-topk needs 4k < --latents, got k={self.k}, latents={self.n_latents}")
        self.store_config()  # the layer, the context length, the token counts and the text column
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError(f"--normalization is one of {', '.join(NORMALIZATIONS)}, got {self.normalization!r}")
        if not 0 <= self.exclude_first < self.context_length:
            raise ConfigError(f"--exclude-first must be from 0 to --context-length - 1 ({self.context_length - 1}): "
                              f"{self.exclude_first} leaves out every position of the {self.context_length}-token contexts"
                              if self.exclude_first > 0 else f"--exclude-first must be >= 0, got {self.exclude_first}")
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be positive, got {self.batch_size}")
        if self.memory_budget_mb < 1:
            raise ConfigError(f"--memory-budget-mb must be at least 1, got {self.memory_budget_mb}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ConfigError(f"--lr must be a number >= 0 (0: the default rule), got {self.lr}")
        for name in ("warmup_fraction", "decay_fraction"):
            if not 0 <= getattr(self, name) <= 1:  # also refuses NaN
                raise ConfigError(f"--{name.replace('_', '-')} is a share of the steps, from 0 to 1, got {getattr(self, name)}")
        if self.warmup_fraction + self.decay_fraction > 1:
            raise ConfigError(f"--warmup-fraction and --decay-fraction add up to more than the whole run "
                              f"({self.warmup_fraction} + {self.decay_fraction})")
        if not (math.isfinite(self.auxk_alpha) and self.auxk_alpha >= 0):
            raise ConfigError(f"--auxk-alpha must be a number >= 0 (0 turns AuxK off), got {self.auxk_alpha}")
        if self.dead_tokens < 0:
            raise ConfigError(f"--dead-tokens must be >= 0 (0: a 300th of the run, at most 10M), got {self.dead_tokens}")
        check_booleans(self)

    @property
    def slug(self) -> str:
        return run_slug(self.model, self.layer, self.n_latents, self.k)

    @property
    def positions(self) -> Positions:
        """The positions the SAE is trained, evaluated, harvested and probed on."""
        return Positions(self.exclude_first, self.exclude_special_tokens)

    def store_config(self) -> StoreConfig:
        """The activation store this run trains and evaluates on."""
        return StoreConfig(model=self.model, layer=self.layer, corpus=self.corpus, context_length=self.context_length,
                           tokens=self.tokens, heldout_tokens=self.heldout_tokens, seed=self.seed, device=self.device,
                           fast_matmul=self.fast_matmul, text_column=self.text_column)

    @property
    def n_train_contexts(self) -> int:
        return self.tokens // self.context_length

    @property
    def n_heldout_contexts(self) -> int:
        return self.heldout_tokens // self.context_length

    @property
    def effective_lr(self) -> float:
        return self.lr or LR_CONSTANT / math.sqrt(self.n_latents / 2**14)

    @property
    def effective_dead_tokens(self) -> int:
        return self.dead_tokens or min(10_000_000, max(self.tokens * self.epochs // 300, 1))

    def to_dict(self) -> dict:
        return asdict(self)

    def resolved(self) -> "TrainConfig":
        """The same training with every rule (an option's 0) replaced by the value it gives: two
        configs train alike when these are equal."""
        return replace(self, lr=self.effective_lr, dead_tokens=self.effective_dead_tokens)

    @classmethod
    def from_saved(cls, saved: dict) -> "TrainConfig":
        """The config a saved cfg.json or checkpoint was trained with: an option it lacks (added
        later) takes the value that reproduces how that run was trained, and an option left to its
        rule (0) takes the value the rule gave then, recorded beside it: the rules change."""
        names = {f.name for f in fields(cls)}
        values = {**BEFORE_OPTION, **{key: value for key, value in saved.items() if key in names}}
        for option, recorded in RULE_VALUES.items():
            if not values.get(option) and saved.get(recorded):
                values[option] = saved[recorded]
        return cls(**as_booleans(cls, values))


# Options whose 0 means a rule, and the cfg.json key that records what the rule gave the run.
RULE_VALUES = {"lr": "lr_effective", "dead_tokens": "dead_tokens_effective"}

# Options whose default changed training when they were added: what a run saved before them did.
BEFORE_OPTION = {"auxk_rescale": False, "exclude_first": 0, "exclude_special_tokens": False, "normalization": "scale"}


@dataclass
class HarvestConfig:
    top_k: int = option(20, "top-activating contexts kept per latent")
    batch_contexts: int = option(32, "contexts encoded at once")
    tokens: int = option(131_072, "for a run without an activation store (an imported SAE): tokens to build one from")
    context_length: int = option(128, "for a run without an activation store: tokens per context")
    corpus: str = option("stdlib", "for a run without an activation store: the corpus to read (as train's --corpus)")
    text_column: str = option("text", "for a run without an activation store: the text column of a Parquet or datasets corpus")
    heldout_tokens: int = option(8_192, "for a run without an activation store: held-out tokens (whole contexts) "
                                        "that eval measures on")
    quantile_bins: int = option(10, "examples are also sampled from this many bins between exact activation quantiles")
    samples_per_bin: int = option(5, "examples sampled per quantile bin (distinct contexts)")
    seed: int = option(0, "seed of the quantile sampling")
    histogram_bins: int = option(32, "bins of the activation and logit-effect histograms")
    logit_tokens: int = option(10, "output tokens listed per latent as most raised and most lowered")
    neighbours: int = option(10, "nearest latents by decoder cosine listed per latent")
    explanation_examples: int = option(20, "top firings per latent that explanation patterns are drawn from")
    token_latents: int = option(10, "for search: latents kept per token (highest mean activation on it)")
    ablation_examples: int = option(0, "precompute each latent's ablation section (what removing it changes) over its "
                                       "first N top examples, for feature pages to show without computing it on first "
                                       "view (0: none; the page's own is 5). Resumes after a kill")

    def __post_init__(self):
        for name in ("quantile_bins", "samples_per_bin", "histogram_bins", "logit_tokens", "neighbours",
                     "explanation_examples", "token_latents", "batch_contexts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.top_k < 1:
            raise ConfigError(f"--top-k must be positive, got {self.top_k}")
        if not 0 <= self.ablation_examples <= self.top_k:
            raise ConfigError(f"--ablation-examples must be between 0 (none) and --top-k ({self.top_k}), "
                              f"got {self.ablation_examples}")
        # Per-latent tables: n latents x these, held in memory and written to the database.
        for name in ("histogram_bins", "logit_tokens", "neighbours", "token_latents", "quantile_bins"):
            if getattr(self, name) > 1000:
                raise ConfigError(f"--{name.replace('_', '-')} must be at most 1000, got {getattr(self, name)}")
        check_booleans(self)
        self.store_config(model="", layer=0)  # the context length and the token counts

    def store_config(self, model: str, layer: int) -> StoreConfig:
        """For a run without an activation store (an imported SAE): the store to build for it."""
        return StoreConfig(model=model, layer=layer, corpus=self.corpus, context_length=self.context_length,
                           tokens=self.tokens, heldout_tokens=self.heldout_tokens, text_column=self.text_column)


def int_list(text: str, flag: str) -> list[int]:
    """'1024,2048' -> [1024, 2048]; '' -> []."""
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers, got {text!r}") from None


# A sweep's training budget and settings (BENCHMARKS.md, "Scaling sweep"). Every rung sees the same
# 300k tokens: the 1/sqrt(n) learning-rate rule then leaves the large SAEs undertrained (FVU rose
# past n = 4,096), so every rung gets the rule's value at n = 4,096; that rate killed latents in the
# large ones, which AuxK at weight 1, counting a latent dead after 8,192 tokens without firing,
# revives (n = 32,768: 7,552 never fired, 7 with these settings). One pass is still far from
# converged at n = 32,768 (held-out FVU 0.0613 after one, 0.0422 after two, 0.0353 after three,
# with 7, 1 and 0 latents that never fire): three passes over the stored activations, which costs
# training time only, no new forward passes. These were measured at batches of 1,024, which the
# sweep keeps (three passes give its rungs ~880 steps, near the single run's ~1,170 of 256).
SWEEP_TRAIN_DEFAULTS = {"tokens": 300_032, "epochs": 3, "heldout_tokens": 65_536, "batch_size": 1024, "lr": 1.2e-3,
                        "auxk_alpha": 1.0, "dead_tokens": 8192}


@dataclass
class SweepConfig:
    """A ladder of SAEs on one activation store (Gao et al. 2024, Section 3): the n series at
    fixed k, and a k series at fixed n. The training options of `saescope train` apply to every rung."""

    latents: str = option("1024,2048,4096,8192,16384,32768", "the n series: latent counts trained at --k (comma-separated)")
    k: int = option(32, "k of the n series")
    ks: str = option("16,32,64", "the k series: values of k trained at each of --k-series-latents ('' for none)")
    k_series_latents: str = option("1024,4096", "the n values of the k series (comma-separated; two or more let the joint fit estimate how k bends the n exponent)")
    downstream_contexts: int = option(16, "held-out contexts for each rung's downstream loss (ΔCE, fitted like FVU; 0 skips it)")
    family_neighbours: int = option(4, "feature families: nearest latents kept in every other size of the n series (0 skips families)")
    ablation_samples: int = option(24, "latents per rung whose ablation-effect sparsity is measured (Gao et al. 2024, 4.5; 0 skips it)")

    def __post_init__(self):
        if not self.n_series:
            raise ConfigError("--latents needs at least one latent count")
        if any(n < 2 for n in self.n_series + self.k_series_n):
            raise ConfigError(f"latent counts must be at least 2, got --latents {self.latents!r} --k-series-latents {self.k_series_latents!r}")
        if self.ks and not self.k_series_n:
            raise ConfigError("--ks needs --k-series-latents")
        if any(k < 1 for k in [self.k, *self.k_series]):
            raise ConfigError(f"k must be positive, got --k {self.k} --ks {self.ks!r}")
        if self.downstream_contexts < 0 or self.family_neighbours < 0 or self.ablation_samples < 0:
            raise ConfigError("--downstream-contexts, --family-neighbours and --ablation-samples must be >= 0")

    @property
    def n_series(self) -> list[int]:
        return sorted(set(int_list(self.latents, "--latents")))

    @property
    def k_series(self) -> list[int]:
        return sorted(set(int_list(self.ks, "--ks")))

    @property
    def k_series_n(self) -> list[int]:
        return sorted(set(int_list(self.k_series_latents, "--k-series-latents")))

    def rungs(self) -> list[tuple[int, int]]:
        """(n_latents, k) of every rung, smallest first, each once."""
        grid = {(n, self.k) for n in self.n_series} | {(n, k) for n in self.k_series_n for k in self.k_series}
        return sorted(grid)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DistributedConfig:
    """How `saescope train` spreads over processes (torchrun sets RANK and WORLD_SIZE)."""

    nproc: int = option(1, "processes to start on this machine with torchrun (1: this process trains alone)")
    shard_latents: bool = option(False, "each process owns a slice of the latents (sharded top-k, all-reduced decoder output), all see the same batches; without it, data parallel: each process takes a slice of every batch")

    def __post_init__(self):
        if self.nproc < 1:
            raise ConfigError(f"--nproc must be at least 1, got {self.nproc}")
        check_booleans(self)


# ------------------------------------------------------------ argparse from dataclasses


def flag_of(f) -> str:
    """A config field's command-line flag."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def negative_flag(f) -> str:
    """--no-multi-topk for --multi-topk."""
    return "--no-" + flag_of(f).removeprefix("--")


def add_config_arguments(parser: argparse.ArgumentParser, config_cls, exclude: tuple[str, ...] = (), defaults: dict | None = None) -> None:
    """One flag per field (--flag/--no-flag for a boolean); `exclude` leaves fields out, `defaults`
    replaces some defaults."""
    for f in fields(config_cls):
        if f.name in exclude:
            continue
        default = (defaults or {}).get(f.name, f.default)
        if isinstance(default, bool):
            group = parser.add_mutually_exclusive_group()
            group.add_argument(flag_of(f), dest=f.name, action="store_true", default=default,
                               help=f"{f.metadata['help']} (default: {'on' if default else 'off'}; "
                                    f"{negative_flag(f)} turns it off)")
            group.add_argument(negative_flag(f), dest=f.name, action="store_false", help=argparse.SUPPRESS)
            continue
        parser.add_argument(
            flag_of(f),
            dest=f.name,
            type=type(default) if default is not MISSING else str,
            default=default,
            help=f"{f.metadata['help']} (default: {default!r})",
        )


def boolean_flags(*config_classes) -> dict[str, str]:
    """Each boolean option's flag -> its negative flag."""
    return {flag_of(f): negative_flag(f) for cls in config_classes for f in fields(cls) if isinstance(f.default, bool)}


def with_boolean_words(argv: list[str], flags: dict[str, str]) -> list[str]:
    """argv with `--flag 1`, `--flag=0`, `--flag true` ... written as `--flag` or `--no-flag`: the
    boolean options were 0/1 numbers once, and scripts still pass them so."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in flags and eq:
            word = value
        elif arg in flags and i + 1 < len(argv) and (argv[i + 1].lower() in BOOLEAN_WORDS or _is_number(argv[i + 1])):
            word, i = argv[i + 1], i + 1  # a number is a value meant for the flag (a path or a run is not)
        else:
            out.append(arg)
            i += 1
            continue
        if word.lower() not in BOOLEAN_WORDS:
            raise ConfigError(f"{name} is on or off: give {name} or {flags[name]} (or 1 / 0), got {word!r}")
        out.append(name if BOOLEAN_WORDS[word.lower()] else flags[name])
        i += 1
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def config_to_args(cfg, exclude: tuple[str, ...] = ()) -> list[str]:
    """The flags that give `cfg` back through add_config_arguments (its inverse)."""
    args = []
    for f in fields(cfg):
        if f.name in exclude:
            continue
        value = getattr(cfg, f.name)
        args += [flag_of(f) if value else negative_flag(f)] if isinstance(f.default, bool) else [flag_of(f), str(value)]
    return args


def config_from_args(args: argparse.Namespace, config_cls, **given):
    """The config from parsed flags; `given` supplies fields that have no flag (see `exclude`)."""
    return config_cls(**{f.name: given[f.name] if f.name in given else getattr(args, f.name) for f in fields(config_cls)})
