"""Read a peftpipe GGUF export with llama.cpp's own `gguf` Python package and check it.

Checks the metadata llama.cpp needs (architecture, hyperparameters against the base model's
config.json, the vocabulary against its tokenizer.json), the tensor names, shapes and types llama.cpp
expects for a Llama, and dequantizes every tensor with gguf's own dequantizer: each un-adapted
tensor must match the base checkpoint within its type's error, and the attention query/key rows
must be permuted as llama.cpp's converter permutes them. Prints `ok: ...` on success.

Run by `cargo test --test gguf the_gguf_python_package_reads_the_export` when the Python it uses
(`PEFTPIPE_GGUF_PYTHON`, default python3) can `import gguf`; by hand:
    python3 -m venv /tmp/gguf-venv && /tmp/gguf-venv/bin/pip install gguf
    /tmp/gguf-venv/bin/python tests/python/check_gguf.py out/model.gguf --base ../shared/models/stories260k
"""

import argparse
import json
import struct
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGMLQuantizationType
from gguf.quants import dequantize


def read_safetensors(path):
    """Every tensor of a safetensors file as float32 numpy arrays (F32/F16/BF16 only)."""
    data = Path(path).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    body = data[8 + length :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = body[start:end]
        if info["dtype"] == "F32":
            values = np.frombuffer(raw, dtype="<f4")
        elif info["dtype"] == "F16":
            values = np.frombuffer(raw, dtype="<f2").astype(np.float32)
        elif info["dtype"] == "BF16":
            values = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            continue
        tensors[name] = values.reshape(info["shape"])
    return tensors


def field_value(reader, key):
    field = reader.get_field(key)
    if field is None:
        return None
    return field.contents()


def permute(weights, heads):
    """llama.cpp's converter: Hugging Face rotate-half rows to interleaved RoPE pairs."""
    rows = weights.shape[0]
    return (
        weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


# Worst |error| per element of a type, relative to the tensor's largest magnitude.
RELATIVE_TOLERANCE = {
    GGMLQuantizationType.F32: 0.0,
    GGMLQuantizationType.F16: 1e-3,
    GGMLQuantizationType.Q8_0: 1e-2,
    GGMLQuantizationType.Q5_0: 7e-2,
    GGMLQuantizationType.Q6_K: 3e-2,
    GGMLQuantizationType.Q4_K: 1.5e-1,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", help="the exported .gguf file")
    parser.add_argument("--base", required=True, help="base model folder (HF layout)")
    args = parser.parse_args()

    base = Path(args.base)
    config = json.loads((base / "config.json").read_text())
    tokenizer = json.loads((base / "tokenizer.json").read_text())
    reader = GGUFReader(args.gguf)
    problems = []

    def expect(key, wanted):
        value = field_value(reader, key)
        if isinstance(wanted, float):
            same = value is not None and abs(value - wanted) <= 1e-6 * max(1.0, abs(wanted))
        else:
            same = value == wanted
        if not same:
            problems.append(f"{key} = {value!r}, expected {wanted!r}")

    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim", config["hidden_size"] // heads)
    expect("general.architecture", "llama")
    expect("llama.context_length", config["max_position_embeddings"])
    expect("llama.embedding_length", config["hidden_size"])
    expect("llama.block_count", config["num_hidden_layers"])
    expect("llama.feed_forward_length", config["intermediate_size"])
    expect("llama.attention.head_count", heads)
    expect("llama.attention.head_count_kv", kv_heads)
    expect("llama.rope.dimension_count", head_dim)
    expect("llama.attention.layer_norm_rms_epsilon", float(config["rms_norm_eps"]))
    expect("llama.rope.freq_base", float(config.get("rope_theta", 10000.0)))
    expect("tokenizer.ggml.model", "llama")
    expect("tokenizer.ggml.bos_token_id", config["bos_token_id"])
    expect("tokenizer.ggml.eos_token_id", config["eos_token_id"])

    tokens = field_value(reader, "tokenizer.ggml.tokens")
    vocab = {token: id for token, id in tokenizer["model"]["vocab"].items()}
    for added in tokenizer.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    if tokens is None or len(tokens) != config["vocab_size"]:
        problems.append(f"tokenizer.ggml.tokens has {tokens and len(tokens)} tokens")
    else:
        for token, id in vocab.items():
            if tokens[id] != token:
                problems.append(f"token {id} is {tokens[id]!r}, tokenizer.json has {token!r}")
                break

    base_tensors = read_safetensors(base / "model.safetensors")
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    modules = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for layer in range(config["num_hidden_layers"]):
        for hf, ours in modules.items():
            names[f"model.layers.{layer}.{hf}.weight"] = f"blk.{layer}.{ours}.weight"
    expected_names = {gguf for hf, gguf in names.items() if hf in base_tensors}
    found = {tensor.name: tensor for tensor in reader.tensors}
    if set(found) - {"output.weight"} != expected_names - {"output.weight"}:
        problems.append(
            f"tensor names differ: missing {sorted(expected_names - set(found))}, "
            f"unexpected {sorted(set(found) - expected_names - {'output.weight'})}"
        )

    compared = 0
    moved = []
    for hf, gguf_name in names.items():
        if hf not in base_tensors or gguf_name not in found:
            continue
        tensor = found[gguf_name]
        values = dequantize(tensor.data, tensor.tensor_type).reshape(base_tensors[hf].shape)
        expected = base_tensors[hf]
        if gguf_name.endswith("attn_q.weight"):
            expected = permute(expected, heads)
        elif gguf_name.endswith("attn_k.weight"):
            expected = permute(expected, kv_heads)
        if expected.ndim == 1 and tensor.tensor_type != GGMLQuantizationType.F32:
            problems.append(f"{gguf_name}: 1-D tensor stored as {tensor.tensor_type.name}")
        scale = float(np.abs(expected).max()) or 1.0
        error = float(np.abs(values - expected).max()) / scale
        tolerance = RELATIVE_TOLERANCE.get(tensor.tensor_type)
        if tolerance is None:
            problems.append(f"{gguf_name}: unexpected type {tensor.tensor_type.name}")
        elif error > tolerance:
            # An adapted weight differs from the base by the merged update, by design.
            moved.append((gguf_name, error))
        compared += 1

    # Only linear layers (an adapter's targets) may differ from the base: never the embedding
    # or a norm (stories260k's reference LoRA adapts every projection).
    unexpected = [
        name for name, _ in moved if name.endswith("norm.weight") or name == "token_embd.weight"
    ]
    if unexpected:
        problems.append(f"tensors that differ from the base beyond their type's error: {unexpected}")
    if not moved:
        problems.append("no tensor differs from the base: the adapter was not merged")

    if problems:
        for problem in problems:
            print(f"problem: {problem}", file=sys.stderr)
        sys.exit(1)
    types = sorted({tensor.tensor_type.name for tensor in reader.tensors})
    print(
        f"ok: {len(reader.tensors)} tensors ({', '.join(types)}), {compared} compared with the "
        f"base checkpoint by gguf's dequantizer, {len(moved)} adapted, "
        f"{len(tokens)} tokens, {len(reader.fields)} metadata keys"
    )


if __name__ == "__main__":
    main()
