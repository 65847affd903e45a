"""export_gguf: write an hf-oto export of a Llama-family model as one GGUF file for llama.cpp.

Layers of one size become llama.cpp's ``llama`` architecture; layers of different sizes become its
``deci`` architecture, which reads the FFN width, query heads and kv heads of each layer from
arrays. Every tensor's shape is checked against the export's config and pruning manifest before a
byte is written, and the file is written beside its final name and renamed into place.

The tokenizer goes in as llama.cpp's byte-level BPE (``gpt2``) with the pre-tokenizer it matches;
tokenizers of other kinds are refused (llama.cpp's own ``convert_hf_to_gguf.py`` handles them for
exports whose layers are all one size).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from hf_oto.errors import ExportError
from hf_oto.io import JSONObject
from hf_oto.manifest import MANIFEST_FILE, Manifest

LLAMA_TYPES = ("llama", "mistral", "nemotron-nas")
DTYPES = ("f32", "f16", "bf16", "q8_0")
Q8_BLOCK = 32  # Q8_0 quantizes rows in blocks of 32 values
# Pre-tokenizer split patterns of byte-level BPE tokenizers -> llama.cpp's name for them.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_BY_SPLIT = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


@dataclass(frozen=True)
class Layer:
    """One layer as llama.cpp's graph sees it: 0 heads is a removed attention block (the ``deci`` graph
    skips it), an FFN width of 0 a removed MLP block."""

    heads: int
    kv_heads: int
    ffn: int


# llama.cpp's deci graph skips a layer whose FFN width is 0 whole, the attention's output with it, so a
# removed MLP block is written as this many FFN channels of zero weights, which add exactly nothing.
STUB_FFN = 1


def written_layers(shape: Shape) -> list[Layer]:
    """The layer sizes the file declares: :attr:`Shape.layers` with the stub FFNs in place."""
    return [Layer(x.heads, x.kv_heads, x.ffn or STUB_FFN) for x in shape.layers]


@dataclass(frozen=True)
class Shape:
    """What llama.cpp will build, read from config.json (and block_configs / hf_oto_layers)."""

    hidden: int
    vocab: int
    head_dim: int
    layers: tuple[Layer, ...]
    tied: bool

    @property
    def uniform(self) -> bool:
        return len(set(self.layers)) == 1


def export_gguf(export_dir: str | os.PathLike, out_file: str | os.PathLike | None = None, *,
                dtype: str = "f32", overwrite: bool = False) -> Path:
    """Write ``export_dir`` (an hf-oto export of a Llama-family model) as a GGUF file; returns its path.

    ``out_file`` defaults to ``<export_dir>-<dtype>.gguf`` beside the folder; an existing file is
    replaced only with ``overwrite=True``. ``dtype`` is ``f32``, ``f16``, ``bf16`` or ``q8_0`` for the
    matrices (norms stay f32; bf16 and q8_0 through the gguf package's own quantizers; a matrix whose
    rows do not split into Q8_0's blocks of 32 is written f16, as llama.cpp's converter does). The
    file carries the chat template, license and base model of the export. Everything is checked
    before the file is opened.
    """
    src = Path(export_dir)
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if not (src / "config.json").is_file():
        raise ExportError(f"{src} has no config.json: not a model folder")
    out = Path(out_file) if out_file else src.parent / f"{src.name}-{dtype}.gguf"
    if out.is_dir():
        raise ExportError(f"{out} is a folder; give a file name ending in .gguf")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    config = json.loads((src / "config.json").read_text())
    shape = read_shape(config)
    tensors = _tensor_index(src)
    check_shapes(shape, {n: t.shape for n, t in tensors.items()}, _manifest(src))
    vocab = read_vocab(src, shape.vocab)
    try:
        import gguf
    except ImportError:
        raise ExportError("the gguf package is missing: pip install gguf") from None

    arch = "llama" if shape.uniform else "deci"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        _write_params(writer, gguf, config, shape, dtype)
        _write_provenance(writer, src, _manifest(src))
        _write_vocab(writer, gguf, vocab)
        # Streamed: every tensor's name, shape and type go into the header first, then the tensors
        # are read from safetensors, converted and written one at a time (peak: one tensor, not the model).
        plan = list(_gguf_plan(gguf, arch, config, shape, dtype))
        for t in plan:
            writer.add_tensor_info(t.name, t.stored_shape(gguf), t.np_dtype, t.nbytes(gguf), raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tqdm(plan, desc="GGUF: writing", unit="tensor", disable=len(plan) < 64):
            writer.write_tensor_data(np.ascontiguousarray(t.convert(gguf, t.load(tensors))))
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# Reading and checking ---------------------------------------------------------------------------
def read_shape(config: JSONObject) -> Shape:
    """Per-layer sizes from config.json; refuses what llama.cpp's llama/deci graphs cannot run."""
    model_type = config.get("model_type")
    if model_type not in LLAMA_TYPES:
        raise ExportError(
            f"export-gguf writes Llama-family models ({', '.join(LLAMA_TYPES)}); this is {model_type!r}. "
            "For a uniform export, llama.cpp's own convert_hf_to_gguf.py reads it as a stock model")
    if config.get("sliding_window") is not None:
        raise ExportError("a sliding attention window is not expressible in llama.cpp's llama/deci architecture")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise ExportError(f"{key} is set; llama.cpp's llama/deci architecture has no such biases")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    n = config["num_hidden_layers"]
    if config.get("block_configs"):
        layers = []
        for b in config["block_configs"]:
            att, ffn = b["attention"], b["ffn"]
            if att.get("replace_with_linear") or ffn.get("replace_with_linear") or (
                    "intermediate_size" not in ffn and not ffn.get("no_op")):
                raise ExportError("block_configs with linear blocks or ffn_mult are not hf-oto exports")
            layers.append(Layer(0 if att.get("no_op") else heads,
                                0 if att.get("no_op") else heads // att["n_heads_in_group"],
                                0 if ffn.get("no_op") else ffn["intermediate_size"]))
    elif config.get("hf_oto_layers"):
        kv = config.get("num_key_value_heads", heads)
        layers = []
        for o in config["hf_oto_layers"]["layers"]:
            gone = o.get("no_op") or {}
            if set(gone) - {"self_attn", "mlp"}:
                raise ExportError(f"a removed block ({', '.join(sorted(gone))}) that llama.cpp's deci graph "
                                  "cannot skip")
            attn = "self_attn" not in gone
            layers.append(Layer(o.get("num_attention_heads", heads) if attn else 0,
                                o.get("num_key_value_heads", kv) if attn else 0,
                                o.get("intermediate_size", config["intermediate_size"]) if "mlp" not in gone else 0))
    else:
        layers = [Layer(heads, config.get("num_key_value_heads") or heads, config["intermediate_size"])] * n
    if len(layers) != n:
        raise ExportError(f"config lists {len(layers)} layers but num_hidden_layers is {n}")
    return Shape(hidden, config["vocab_size"], head_dim, tuple(layers), bool(config.get("tie_word_embeddings")))


class _Lazy:
    """One tensor of a safetensors file: its shape now, its values when asked."""

    def __init__(self, file: Path, name: str, shape: tuple[int, ...]):
        self.file, self.name, self.shape = file, name, shape

    def load(self):
        from safetensors import safe_open

        with safe_open(self.file, framework="pt") as f:
            return f.get_tensor(self.name)


def _tensor_index(folder: Path) -> dict[str, _Lazy]:
    """Every tensor of the folder's safetensors files, by name, read lazily (headers only here)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{folder} has no safetensors weights")
    out: dict[str, _Lazy] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                out[name] = _Lazy(file, name, tuple(f.get_slice(name).get_shape()))
    return out


def _manifest(folder: Path) -> Manifest | None:
    """The export's manifest, or None for a model folder hf-oto did not write."""
    return Manifest.read(folder) if (folder / MANIFEST_FILE).is_file() else None


def expected_shapes(shape: Shape) -> dict[str, tuple[int, ...]]:
    """Every weight the llama/deci graph reads, by Hugging Face name, with its [out, in] shape."""
    h, d = shape.hidden, shape.head_dim
    out = {"model.embed_tokens.weight": (shape.vocab, h), "model.norm.weight": (h,)}
    if not shape.tied:
        out["lm_head.weight"] = (shape.vocab, h)
    for i, layer in enumerate(shape.layers):
        p = f"model.layers.{i}."
        if layer.heads:
            out.update({
                p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (layer.heads * d, h),
                p + "self_attn.k_proj.weight": (layer.kv_heads * d, h),
                p + "self_attn.v_proj.weight": (layer.kv_heads * d, h),
                p + "self_attn.o_proj.weight": (h, layer.heads * d),
            })
        if layer.ffn:
            out.update({
                p + "post_attention_layernorm.weight": (h,), p + "mlp.gate_proj.weight": (layer.ffn, h),
                p + "mlp.up_proj.weight": (layer.ffn, h), p + "mlp.down_proj.weight": (h, layer.ffn),
            })
    return out


def _stubs(shape: Shape) -> dict[str, np.ndarray]:
    """The zero FFN written for each removed MLP block (see :data:`STUB_FFN`), by Hugging Face name."""
    h, out = shape.hidden, {}
    for i, layer in enumerate(shape.layers):
        if not layer.ffn:
            p = f"model.layers.{i}."
            out.update({p + "post_attention_layernorm.weight": np.ones(h, np.float32),
                        p + "mlp.gate_proj.weight": np.zeros((STUB_FFN, h), np.float32),
                        p + "mlp.up_proj.weight": np.zeros((STUB_FFN, h), np.float32),
                        p + "mlp.down_proj.weight": np.zeros((h, STUB_FFN), np.float32)})
    return out


def check_shapes(shape: Shape, tensors: dict[str, tuple[int, ...]], manifest: Manifest | None) -> None:
    """Refuse (one line) unless the weights (``{name: shape}``) are exactly what the config and the
    manifest describe."""
    if shape.layers and not shape.layers[0].heads:
        raise ExportError("layer 0 has no attention; llama.cpp sizes attention heads from layer 0")
    for i, layer in enumerate(shape.layers):
        if layer.heads and (layer.kv_heads < 1 or layer.heads % layer.kv_heads):
            raise ExportError(f"layer {i}: {layer.heads} query heads do not split over {layer.kv_heads} kv heads")
    want = expected_shapes(shape)
    missing = sorted(set(want) - set(tensors))
    if missing:
        raise ExportError(f"weights missing for the GGUF graph: {', '.join(missing[:3])}")
    extra = sorted(k for k in set(tensors) - set(want) if not (shape.tied and k == "lm_head.weight"))
    if extra:
        raise ExportError(f"weights the llama/deci graph has no place for: {', '.join(extra[:3])}")
    for name, dims in want.items():
        if tuple(tensors[name]) != dims:
            raise ExportError(f"{name} is {tuple(tensors[name])}, the config says {dims}")
    for s in manifest.sets if manifest is not None else ():
        i = manifest.export_layer(s.layer)
        layer = shape.layers[i] if i is not None and 0 <= i < len(shape.layers) else None
        if layer is None:
            continue
        has = {"ffn_channel": layer.ffn, "kv_group": layer.kv_heads, "attention_head": layer.kv_heads}.get(s.kind)
        if has is not None and len(s.kept) != has:
            raise ExportError(f"layer {s.layer}: the manifest keeps {len(s.kept)} {s.kind} groups, the weights {has}")


# Tokenizer --------------------------------------------------------------------------------------
@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special: dict[str, int]
    add_bos: bool
    add_eos: bool


def read_vocab(folder: Path, vocab_size: int) -> Vocab:
    """The export's byte-level BPE tokenizer in llama.cpp's terms (refused in one line otherwise)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{folder} has no tokenizer.json; llama.cpp needs the tokenizer inside the GGUF file")
    tok = json.loads(path.read_text())
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExportError("export-gguf writes byte-level BPE tokenizers; this one is "
                          f"{model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''}")
    pre = _pre_name(tok.get("pre_tokenizer"))
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in tok.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    size = max(vocab_size, max(vocab.values()) + 1)
    if size > vocab_size:
        raise ExportError(f"the tokenizer has {size} tokens, more than the model's vocab_size {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size  # UNUSED until filled
    for text, i in vocab.items():
        tokens[i] = text
        t = added.get(text)
        types[i] = 1 if t is None else (3 if t.get("special") else 4)  # NORMAL, CONTROL, USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special, add_bos, add_eos = _special_tokens(folder)
    return Vocab(tokens, types, merges, pre, special, add_bos, add_eos)


def _pre_name(pre: dict | None) -> str:
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        splits = [p for p in parts if p.get("type") == "Split"]
        levels = [p for p in parts if p.get("type") == "ByteLevel" and not p.get("use_regex", True)]
        if len(splits) == 1 and len(levels) == 1 and len(parts) == 2:
            name = _PRE_BY_SPLIT.get(splits[0].get("pattern", {}).get("Regex"))
            if name:
                return name
    raise ExportError("the tokenizer's pre-tokenizer matches none llama.cpp knows (GPT-2, Llama-3, Qwen2 patterns); "
                      "GGUF tokenization would differ from transformers")


def _special_tokens(folder: Path) -> tuple[dict[str, int], bool, bool]:
    from transformers import PreTrainedTokenizerFast

    # Not AutoTokenizer: it reads config.json, which in a DeciLM export names remote code.
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    special = {name: getattr(tok, f"{name}_token_id") for name in ("bos", "eos", "unk", "pad")}
    special = {k: v for k, v in special.items() if isinstance(v, int)}
    full, plain = tok("a")["input_ids"], tok("a", add_special_tokens=False)["input_ids"]
    add_bos = "bos" in special and len(full) > len(plain) and full[0] == special["bos"]
    add_eos = "eos" in special and len(full) > len(plain) and full[-1] == special["eos"]
    return special, add_bos, add_eos


# Writing ----------------------------------------------------------------------------------------
def _write_params(writer, gguf, config: JSONObject, shape: Shape, dtype: str) -> None:
    layers = written_layers(shape)
    writer.add_name(config.get("_name_or_path") or "hf-oto pruned model")
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(len(layers))
    if shape.uniform:
        writer.add_feed_forward_length(layers[0].ffn)
        writer.add_head_count(layers[0].heads)
        writer.add_head_count_kv(layers[0].kv_heads)
    else:
        writer.add_feed_forward_length([x.ffn for x in layers])
        writer.add_head_count([x.heads for x in layers])
        writer.add_head_count_kv([x.kv_heads for x in layers])
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(shape.vocab)
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])


def _write_provenance(writer, folder: Path, manifest: Manifest | None) -> None:
    """The chat template (tokenizer_config.json or chat_template.jinja), license and base model."""
    template = None
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif (folder / "tokenizer_config.json").is_file():
        template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
    if manifest is None:
        return
    if manifest.license:
        writer.add_license(str(manifest.license))
    base = manifest.base_model
    if base:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, str(base).rsplit("/", 1)[-1])
        if "/" in str(base):
            writer.add_base_model_organization(0, str(base).split("/", 1)[0])
        writer.add_base_model_repo_url(0, f"https://huggingface.co/{base}")


def _rope(config: JSONObject) -> JSONObject:
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    rope["rope_type"] = kind
    if kind not in ("default", "linear", "llama3"):
        raise ExportError(f"rope_type {kind!r} is not written to GGUF by export-gguf (default, linear, llama3 are)")
    return rope


def _llama3_factors(rope: JSONObject, head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama-3's long-context RoPE, as llama.cpp's rope_freqs tensor."""
    base, factor = rope["rope_theta"], rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _write_vocab(writer, gguf, vocab: Vocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for name, idx in vocab.special.items():
        getattr(writer, f"add_{name}_token_id")(idx)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)


def _unrotate(w: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face stores each head's rotary pairs as two halves; GGML's rope wants them interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the file: its GGUF name, numpy shape, how it is stored, and how to read it."""

    name: str
    dims: tuple[int, ...]
    np_dtype: Any  # float32 / float16, or uint8 for bytes quantized by the gguf package
    qtype: Any  # the GGMLQuantizationType for quantized bytes (bf16, q8_0), else None
    load: Any  # tensors index -> float32 numpy array

    def stored_shape(self, gguf) -> tuple[int, ...]:
        return self.dims if self.qtype is None else gguf.quant_shape_to_byte_shape(self.dims, self.qtype)

    def nbytes(self, gguf) -> int:
        return int(np.prod(self.stored_shape(gguf))) * np.dtype(self.np_dtype).itemsize

    def convert(self, gguf, data: np.ndarray) -> np.ndarray:
        return data.astype(self.np_dtype) if self.qtype is None else gguf.quants.quantize(data, self.qtype)


def _storage(gguf, dtype: str, dims: tuple[int, ...]):
    """(numpy dtype, quantization type) of one tensor: vectors stay f32; matrices follow ``dtype``."""
    if len(dims) != 2 or dtype == "f32":
        return np.float32, None
    if dtype == "f16" or (dtype == "q8_0" and dims[-1] % Q8_BLOCK):
        return np.float16, None
    qtype = gguf.GGMLQuantizationType.BF16 if dtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
    return np.uint8, qtype


def _gguf_plan(gguf, arch: str, config, shape: Shape, dtype: str):
    """Every tensor of the file (:class:`PlannedTensor`), in file order; a loader reads and converts its
    tensor from the lazy index when called."""
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.DECI, len(shape.layers))
    rope = _rope(config)
    if rope["rope_type"] == "llama3":
        factors = _llama3_factors(rope, shape.head_dim)
        yield PlannedTensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.shape, np.float32,
                            None, lambda _tensors, f=factors: f)
    stubs = _stubs(shape)
    for hf_name, value in stubs.items():
        np_dtype, qtype = _storage(gguf, dtype, value.shape)
        yield PlannedTensor(names.get_name(hf_name, try_suffixes=(".weight",)), value.shape, np_dtype, qtype,
                            lambda _tensors, v=value: v)
    for hf_name, dims in expected_shapes(shape).items():
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:
            raise ExportError(f"no GGUF name for {hf_name}")
        heads = None
        if ".self_attn.q_proj." in hf_name or ".self_attn.k_proj." in hf_name:
            layer = shape.layers[int(hf_name.split(".")[2])]
            heads = layer.heads if ".q_proj." in hf_name else layer.kv_heads
        np_dtype, qtype = _storage(gguf, dtype, tuple(dims))
        yield PlannedTensor(name, tuple(dims), np_dtype, qtype,
                            lambda tensors, n=hf_name, h=heads: _hf_to_gguf(tensors[n].load(), h))


def _hf_to_gguf(t, heads: int | None) -> np.ndarray:
    w = t.float().numpy()
    return w if heads is None else _unrotate(w, heads)
