"""Cross-check a peftpipe export against Hugging Face PEFT and transformers (not part of CI).

Loads the exported adapter folder with `PeftModel.from_pretrained` (failing on any missing or
unexpected adapter key), the exported merged folder with `AutoModelForCausalLM`, runs both on the
same three prompts as ../shared/models/stories260k/reference, and prints the max abs logit
differences: PEFT(adapter) vs transformers(merged), and each vs a reference logits file if given.

Setup (CPU wheels from PyPI, once):
    python3 -m venv /tmp/pyref && /tmp/pyref/bin/pip install torch transformers peft safetensors
Make an export from stories260k + PEFT's reference LoRA (kept in DIR by the Rust test):
    PEFTPIPE_SHARED=../shared PEFTPIPE_KEEP_EXPORT=/tmp/export cargo test --test export merged_export_of_peft
Run:
    /tmp/pyref/bin/python tests/python/check_peft_export.py --base ../shared/models/stories260k \
        --adapter /tmp/export/out/adapter --merged /tmp/export/out/merged \
        --inputs ../shared/models/stories260k/reference/base_logits.safetensors \
        --reference ../shared/models/stories260k/reference/peft_lora/expected_logits.safetensors
"""

import argparse
import logging
import sys
import warnings

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def masked_max_abs(a, b, mask):
    per_position = (a - b).abs().amax(dim=-1)
    return float((per_position * mask).max())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="base model folder (HF layout)")
    parser.add_argument("--adapter", required=True, help="exported PEFT adapter folder")
    parser.add_argument("--merged", required=True, help="exported merged model folder")
    parser.add_argument("--inputs", required=True, help="safetensors with input_ids, attention_mask")
    parser.add_argument("--reference", help="safetensors with `logits` to compare with")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()

    inputs = load_file(args.inputs)
    input_ids = inputs["input_ids"].long()
    mask = inputs["attention_mask"].long()

    captured = []
    handler = logging.Handler()
    handler.emit = lambda record: captured.append(record.getMessage())
    logging.getLogger("peft").addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(base, args.adapter, is_trainable=False)
    messages = [str(w.message) for w in caught] + captured
    key_problems = [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()]
    if key_problems:
        print("PEFT reported key problems:", *key_problems, sep="\n  ")
        return 1
    merged = AutoModelForCausalLM.from_pretrained(args.merged, dtype=torch.float32)
    peft_model.eval()
    merged.eval()
    with torch.no_grad():
        adapter_logits = peft_model(input_ids=input_ids, attention_mask=mask).logits
        merged_logits = merged(input_ids=input_ids, attention_mask=mask).logits
    maskf = mask.float()
    results = {"PEFT(adapter) vs transformers(merged)": masked_max_abs(adapter_logits, merged_logits, maskf)}
    if args.reference:
        reference = load_file(args.reference)["logits"]
        results["PEFT(adapter) vs reference"] = masked_max_abs(adapter_logits, reference, maskf)
        results["transformers(merged) vs reference"] = masked_max_abs(merged_logits, reference, maskf)
    failed = False
    for name, error in results.items():
        print(f"{name}: max abs logit error = {error:.3e}")
        failed |= error > args.tolerance
    print("adapter loaded with no missing/unexpected key warnings")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
