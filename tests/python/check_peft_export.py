"""Cross-check a peftpipe export against Hugging Face PEFT and transformers (not part of CI).

Loads the exported adapter folder with `PeftModel.from_pretrained` onto the base model and fails
on any missing or unexpected adapter key: PEFT's warnings are captured, and the PEFT model's own
adapter state dict (`get_peft_model_state_dict`, what PEFT would save) must have exactly the
file's tensor names, shapes and values. Then runs it on the inputs (`input_ids`,
`attention_mask` of --inputs) and prints the max abs logit differences over the attended
positions against peftpipe's logits (--expected) and a reference logits file (--reference); with
--merged also loads the exported merged folder with `AutoModelForCausalLM` and compares it the
same way. Prompt tuning's logits lead with one position per virtual token: those are compared too
(they are attended). --json FILE writes the figures for the Rust test (tests/peft_python.rs).

Setup (wheels from PyPI, once):
    python3 -m venv /tmp/pyref && /tmp/pyref/bin/pip install torch transformers peft safetensors
Every method at once, from Rust (trains, exports, runs this script per method):
    PEFTPIPE_SHARED=../shared PEFTPIPE_PEFT_PYTHON=/tmp/pyref/bin/python \
        cargo test --test peft_python -- --nocapture
By hand, on an export of stories260k + PEFT's reference LoRA (kept in DIR by the Rust test):
    PEFTPIPE_SHARED=../shared PEFTPIPE_KEEP_EXPORT=/tmp/export cargo test --test export merged_export_of_peft
    /tmp/pyref/bin/python tests/python/check_peft_export.py --base ../shared/models/stories260k \
        --adapter /tmp/export/out/adapter --merged /tmp/export/out/merged \
        --inputs ../shared/models/stories260k/reference/base_logits.safetensors \
        --reference ../shared/models/stories260k/reference/peft_lora/expected_logits.safetensors
"""

import argparse
import json
import logging
import sys
import warnings

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def masked_max_abs(a, b, mask):
    """max |a - b| over the positions where mask is 1; `a` and `b` may lead with virtual-token
    positions the mask lacks (attended: counted)."""
    if a.shape != b.shape:
        raise ValueError(f"logits of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    extra = a.shape[1] - mask.shape[1]
    if extra > 0:
        mask = torch.cat([torch.ones(mask.shape[0], extra), mask], dim=1)
    per_position = (a - b).abs().amax(dim=-1)
    return float((per_position * mask).max())


def key_problems(peft_model, adapter_dir):
    """Names PEFT would save but the file lacks, names the file has but PEFT does not use, and
    tensors PEFT holds with other shapes or values than the file's."""
    stored = load_file(f"{adapter_dir}/adapter_model.safetensors")
    held = get_peft_model_state_dict(peft_model)
    problems = [f"missing (PEFT expects, file lacks): {name}" for name in sorted(set(held) - set(stored))]
    problems += [f"unexpected (file has, PEFT ignores): {name}" for name in sorted(set(stored) - set(held))]
    for name in sorted(set(held) & set(stored)):
        ours, theirs = stored[name].float(), held[name].detach().float().cpu()
        if ours.shape != theirs.shape:
            problems.append(f"{name}: file {tuple(ours.shape)}, PEFT {tuple(theirs.shape)}")
        elif not torch.equal(ours, theirs):
            problems.append(f"{name}: PEFT holds other values (max |diff| {float((ours - theirs).abs().max()):.3e})")
    return problems, len(stored)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="base model folder (HF layout)")
    parser.add_argument("--adapter", required=True, help="exported PEFT adapter folder")
    parser.add_argument("--merged", help="exported merged model folder")
    parser.add_argument("--inputs", required=True, help="safetensors with input_ids, attention_mask")
    parser.add_argument("--expected", help="safetensors with peftpipe's `logits` for the adapter")
    parser.add_argument("--reference", help="safetensors with `logits` to compare with")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--json", help="write the measured differences to this file")
    args = parser.parse_args()
    torch.manual_seed(0)

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
    problems = [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()]
    state_problems, tensors = key_problems(peft_model, args.adapter)
    problems += state_problems
    if problems:
        print("PEFT reported key problems:", *problems, sep="\n  ")
        return 1
    peft_model.eval()
    maskf = mask.float()
    with torch.no_grad():
        adapter_logits = peft_model(input_ids=input_ids, attention_mask=mask).logits
        merged_logits = None
        if args.merged:
            merged = AutoModelForCausalLM.from_pretrained(args.merged, dtype=torch.float32)
            merged.eval()
            merged_logits = merged(input_ids=input_ids, attention_mask=mask).logits
        with peft_model.disable_adapter():
            base_logits = peft_model(input_ids=input_ids, attention_mask=mask).logits
    results = {}
    if args.expected:
        expected = load_file(args.expected)["logits"]
        results["PEFT(adapter) vs peftpipe"] = masked_max_abs(adapter_logits, expected, maskf)
        if merged_logits is not None:
            results["transformers(merged) vs peftpipe"] = masked_max_abs(merged_logits, expected, maskf)
    if merged_logits is not None:
        results["PEFT(adapter) vs transformers(merged)"] = masked_max_abs(adapter_logits, merged_logits, maskf)
    if args.reference:
        reference = load_file(args.reference)["logits"]
        results["PEFT(adapter) vs reference"] = masked_max_abs(adapter_logits, reference, maskf)
        if merged_logits is not None:
            results["transformers(merged) vs reference"] = masked_max_abs(merged_logits, reference, maskf)
    failed = False
    for name, error in results.items():
        print(f"{name}: max abs logit error = {error:.3e}")
        failed |= error > args.tolerance
    # How far the adapter moves the base model (a no-op adapter would make the check vacuous);
    # prompt tuning's extra leading positions have no base counterpart.
    real = adapter_logits[:, adapter_logits.shape[1] - base_logits.shape[1]:]
    moved = masked_max_abs(real, base_logits, maskf)
    print(f"PEFT(adapter) vs base model: max abs logit difference = {moved:.3e}")
    print(f"adapter loaded with no missing/unexpected key warnings; PEFT holds the file's {tensors} tensors")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"differences": results, "moved": moved, "tensors": tensors}, out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
