"""Save a real transformers + bitsandbytes 4-bit checkpoint for tests/bnb_checkpoint.rs (not CI).

Loads a 16-bit model folder with `BitsAndBytesConfig(load_in_4bit=True, ...)` on the CPU (the
bitsandbytes CPU backend the shared NF4 fixture came from; `--device cuda` to quantize on a GPU),
`save_pretrained`s it, and writes beside it `dequantized.safetensors`: every `Linear4bit`
weight as `bitsandbytes.functional.dequantize_4bit` gives it in float32, under the weight's name.
Two variants: `nf4-dq` (NF4, double quantization, QLoRA's setting) and `fp4` (FP4, blocks of 64,
no double quantization).

Skips (exit 0, a line saying why) when torch, transformers or bitsandbytes is missing.

Setup (what it last ran with, on a CPU-only x86-64 machine: torch 2.11.0 from PyPI, bitsandbytes
0.50.2, transformers 5.25.0):
    python3 -m venv /tmp/bnbvenv && /tmp/bnbvenv/bin/pip install torch==2.11.0 bitsandbytes==0.50.2 \
        transformers accelerate safetensors
Run, then check with peftpipe:
    /tmp/bnbvenv/bin/python tests/python/save_bnb_checkpoint.py ../shared/models/stories260k /tmp/bnb-saved
    PEFTPIPE_SHARED=../shared PEFTPIPE_BNB_SAVED=/tmp/bnb-saved \
        cargo test --test bnb_checkpoint a_checkpoint_saved_by_transformers
"""

import argparse
import os
import shutil
import sys

try:
    import torch
    import bitsandbytes
    import bitsandbytes.functional as bnb_functional
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
except ImportError as error:  # pragma: no cover - the skip path
    print(f"skipped: {error}")
    sys.exit(0)


VARIANTS = {
    "nf4-dq": dict(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False),
}

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a 16-bit Hugging Face model folder")
    parser.add_argument("out", help="folder to write one subfolder per variant into")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--copy-tokenizer", action="store_true", help="copy the tokenizer files too")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}")
    for name, settings in VARIANTS.items():
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, **settings
        )
        model = AutoModelForCausalLM.from_pretrained(
            args.model, quantization_config=config, dtype=torch.float32, device_map=args.device
        )
        out = os.path.join(args.out, name)
        model.save_pretrained(out)
        dequantized = {}
        for module_name, module in model.named_modules():
            if isinstance(module, bitsandbytes.nn.Linear4bit):
                weight = module.weight
                values = bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
                dequantized[f"{module_name}.weight"] = values.float().cpu().contiguous()
        save_file(dequantized, os.path.join(out, "dequantized.safetensors"))
        if args.copy_tokenizer:
            for file in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(args.model, file)):
                    shutil.copy(os.path.join(args.model, file), out)
        print(f"{name}: {len(dequantized)} Linear4bit weights -> {out}: {sorted(os.listdir(out))}")


if __name__ == "__main__":
    main()
