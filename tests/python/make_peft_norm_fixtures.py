"""Write the PEFT-made adapters of tests/fixtures/peft_auxiliary whose `modules_to_save` name
normalization layers (see its README.md), for tests/methods.rs.

    python3 tests/python/make_peft_norm_fixtures.py OUT    # from the repository root

OUT/norms: LoRA r=2 on q/v of tests/fixtures/peft_auxiliary/base (the tiny tied Llama) with
`modules_to_save=["norm"]`. OUT/gpt2_base: a random tiny GPT2LMHeadModel (torch.manual_seed(0));
OUT/gpt2_norms: LoRA r=2 on c_attn with `modules_to_save=["ln_1", "ln_f"]`. Every parameter with
requires_grad is moved by 0.1·randn (torch.manual_seed(2)) before `save_pretrained`;
expected_logits.safetensors holds the inputs and PEFT's logits in eval mode, trainable.json PEFT's
trainable-parameter counts. Needs torch, transformers and peft (run on the GPU host).
"""

import json
import sys

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel


def make(base, out, **settings):
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=2, lora_alpha=4, **settings),
    )
    trainable = model.get_nb_trainable_parameters()[0]
    settings.pop("modules_to_save")
    lora_only = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=2, lora_alpha=4, **settings),
    ).get_nb_trainable_parameters()[0]
    torch.manual_seed(2)
    with torch.no_grad():
        for _, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn_like(parameter))
    model.eval()
    model.save_pretrained(out)
    ids = torch.tensor([[1, 5, 9, 13, 2, 7], [1, 30, 31, 4, 2, 0]])
    mask = torch.tensor([[1] * 6, [1] * 5 + [0]])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float().contiguous()
    save_file(
        {"input_ids": ids, "attention_mask": mask, "logits": logits},
        out + "/expected_logits.safetensors",
    )
    counts = {"trainable": trainable, "lora_only": lora_only, "modules_to_save": trainable - lora_only}
    with open(out + "/trainable.json", "w") as file:
        json.dump(counts, file, indent=2)
    print(out, counts)


def main():
    out = sys.argv[1]
    make(
        "tests/fixtures/peft_auxiliary/base",
        out + "/norms",
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["norm"],
    )
    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=16, n_layer=2, n_head=4, vocab_size=40, n_positions=64, bos_token_id=1, eos_token_id=2
    )
    GPT2LMHeadModel(config).save_pretrained(out + "/gpt2_base")
    make(
        out + "/gpt2_base",
        out + "/gpt2_norms",
        target_modules=["c_attn"],
        modules_to_save=["ln_1", "ln_f"],
        fan_in_fan_out=True,
    )


if __name__ == "__main__":
    main()
