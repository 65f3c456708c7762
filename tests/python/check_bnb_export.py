"""Cross-check peftpipe's merged export in bitsandbytes 4-bit (`export: {merged: DIR, quantize: ...}`)
against transformers + bitsandbytes (not part of CI).

For each case folder (`CASE/4bit`: the re-quantized export, `CASE/plain`: the plain merged export
of the same adapter, as tests/export.rs keeps them): loads `4bit` with
`AutoModelForCausalLM.from_pretrained` (its config.json's `quantization_config` makes every decoder
linear a `bitsandbytes.nn.Linear4bit`, everything else dense), then quantizes each plain merged
weight with bitsandbytes' own `quantize_4bit` (the block size, type and double quantization of the
loaded state) on the CPU and compares: the packed codes and the absmax codes must be equal; the
absmax (or, with double quantization, its f32 offset and nested scales) may differ in the last bits,
because torch sums the absmax mean in its own vectorized order (see README, QLoRA). peftpipe's
quantizer is bit-exact with bitsandbytes' CPU backend; its CUDA kernel rounds some values to the
other level (the count is printed as `cuda_quantizer_bytes_differ`). With blocks of 64 the plain
folder is also loaded quantized by transformers (`BitsAndBytesConfig` with the same settings) and
the two models' logits compared (strictly on the CPU). Exits 1 on a mismatch, 0 (with a line) when
torch, transformers or bitsandbytes is missing.

Setup: the host needs torch and transformers; bitsandbytes from ../shared/gpu/fetch-bitsandbytes.sh.
    PEFTPIPE_SHARED=../shared PEFTPIPE_KEEP_EXPORT=/tmp/keep cargo test --test export requant
    PYTHONPATH=/tmp/bnb python3 tests/python/check_bnb_export.py /tmp/keep/requant --device cpu
"""

import argparse
import glob
import json
import os
import sys

try:
    import torch
    import bitsandbytes
    import bitsandbytes.functional as bnb_functional
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
except ImportError as error:  # pragma: no cover - the skip path
    print(f"skipped: {error}")
    sys.exit(0)

IDS = [[1, 403, 76, 300, 12, 99, 250, 7]]


def plain_weights(folder):
    weights = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        weights.update(load_file(path))
    return weights


def ulps(a, b):
    """Largest distance in units of the last place between two float32 tensors."""
    a = a.float().contiguous().view(torch.int32).long()
    b = b.float().contiguous().view(torch.int32).long()
    return int((a - b).abs().max().item()) if a.numel() else 0


def logits(model, device):
    with torch.no_grad():
        return model(torch.tensor(IDS, device=device)).logits.float().cpu()


def check_case(case, device):
    four_bit = os.path.join(case, "4bit")
    plain = os.path.join(case, "plain")
    with open(os.path.join(four_bit, "config.json")) as file:
        settings = json.load(file)["quantization_config"]
    model = AutoModelForCausalLM.from_pretrained(four_bit, device_map=device, dtype="auto")
    problems = []
    linears = {}
    for name, module in model.named_modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            linears[name] = module
        elif isinstance(module, torch.nn.Linear) and ".layers." in name:
            problems.append(f"{name} loaded dense")
    if not linears:
        problems.append("no Linear4bit")
    if any(".layers." not in name for name in linears):
        problems.append(f"4-bit outside the decoder: {[n for n in linears if '.layers.' not in n]}")
    weights = plain_weights(plain)
    worst_ulps = 0
    worst_dequantized = 0.0
    cuda_differ = 0
    for name, module in linears.items():
        state = module.weight.quant_state
        plain_weight = weights[f"{name}.weight"]
        quantize = lambda weight: bnb_functional.quantize_4bit(  # noqa: E731
            weight,
            blocksize=state.blocksize,
            compress_statistics=state.nested,
            quant_type=state.quant_type,
        )
        packed, theirs = quantize(plain_weight)
        ours_packed = module.weight.data.contiguous().view(torch.uint8).flatten().cpu()
        if not torch.equal(ours_packed, packed.flatten()):
            differ = int((ours_packed != packed.flatten()).sum())
            problems.append(f"{name}: {differ} packed bytes differ from bitsandbytes' quantize_4bit")
        if device != "cpu":
            on_device, _ = quantize(plain_weight.to(device))
            cuda_differ += int((ours_packed != on_device.flatten().cpu()).sum())
        plain_weight = plain_weight.to(device)
        packed = packed.to(device)
        theirs.to(device)
        if state.dtype != plain_weight.dtype or tuple(state.shape) != tuple(plain_weight.shape):
            problems.append(f"{name}: state {state.dtype} {tuple(state.shape)}")
        if state.nested:
            if not torch.equal(state.absmax.cpu(), theirs.absmax.cpu()):
                problems.append(f"{name}: absmax codes differ")
            worst_ulps = max(
                worst_ulps,
                ulps(state.offset.cpu(), theirs.offset.cpu()),
                ulps(state.state2.absmax.cpu(), theirs.state2.absmax.cpu()),
            )
        else:
            worst_ulps = max(worst_ulps, ulps(state.absmax.cpu(), theirs.absmax.cpu()))
        ours = bnb_functional.dequantize_4bit(module.weight.data, state).float()
        reference = bnb_functional.dequantize_4bit(packed, theirs).float()
        worst_dequantized = max(worst_dequantized, float((ours - reference).abs().max()))
    if worst_ulps > 8:
        problems.append(f"absmax state {worst_ulps} ulps from bitsandbytes'")
    figures = {
        "linear4bit": len(linears),
        "state_ulps": worst_ulps,
        "max_abs_dequantized": worst_dequantized,
    }
    if device != "cpu":
        figures["cuda_quantizer_bytes_differ"] = cuda_differ
    ours_logits = logits(model, device)
    dense = AutoModelForCausalLM.from_pretrained(plain, device_map=device, dtype="auto")
    figures["max_abs_logit_vs_16bit"] = float((ours_logits - logits(dense, device)).abs().max())
    if all(module.weight.quant_state.blocksize == 64 for module in linears.values()):
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=settings["bnb_4bit_quant_type"],
            bnb_4bit_use_double_quant=settings["bnb_4bit_use_double_quant"],
            bnb_4bit_compute_dtype=getattr(torch, settings["bnb_4bit_compute_dtype"]),
        )
        quantized_by_transformers = AutoModelForCausalLM.from_pretrained(
            plain, quantization_config=config, device_map=device, dtype="auto"
        )
        difference = float((ours_logits - logits(quantized_by_transformers, device)).abs().max())
        figures["max_abs_logit_vs_transformers_quantizing"] = difference
        scale = float(ours_logits.abs().max())
        if device == "cpu" and difference > 1e-4 * max(scale, 1.0):
            problems.append(f"logits {difference:e} from the plain export quantized by transformers")
    return figures, problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cases", help="a folder of case folders, each with 4bit/ and plain/")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, device {args.device}")
    failed = False
    for case in sorted(glob.glob(os.path.join(args.cases, "*", ""))):
        figures, problems = check_case(case, args.device)
        name = os.path.basename(os.path.normpath(case))
        print(f"{name}: {json.dumps(figures)}")
        for problem in problems:
            print(f"  FAIL {problem}")
        failed |= bool(problems)
    print("FAILED" if failed else "ok: transformers + bitsandbytes load every case as its quantization")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
