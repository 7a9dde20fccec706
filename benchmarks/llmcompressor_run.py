"""One llm-compressor 0.14 compression of a model, run in llm-compressor's own environment.

`methods.py --library llm-compressor` runs this with that environment's Python (llm-compressor pins its
own transformers and compressed-tensors): it compresses the model with the library's defaults on the
exact calibration windows given, then writes the weights the compressed model computes with (quantized
matrices fake-quantized by compressed-tensors, pruned ones with their zeros) as float32 safetensors of
the decoder's Linear layers, and prints one JSON line with the library's own compression seconds.

    python benchmarks/llmcompressor_run.py --model DIR --calib calib.safetensors --method gptq \
        --bits 3 --group-size 128 --out weights.safetensors
    ... --method sparsegpt --sparsity 0.5 --mask 2:4

Group quantization in llm-compressor refuses an input width that its group size does not divide
(576 = 4.5 x 128 on SmolLM2-135M). Those layers are given zero input columns up to the next multiple:
the padded columns see zero inputs (so they change no Hessian statistic the real columns use) and lie
in the ragged last group, whose range always includes 0 (the library's observers clamp it), so the
real columns are quantized as with a ragged last group of their own; the padding is cut off after.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from datasets import Dataset
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM


class PaddedInputs(nn.Module):
    """`linear` with its inputs padded by zeros to `width` columns."""

    def __init__(self, linear: nn.Linear, width: int):
        super().__init__()
        self.width = width
        self.linear = nn.Linear(width, linear.out_features, bias=linear.bias is not None)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.weight[:, :linear.in_features] = linear.weight
            if linear.bias is not None:
                self.linear.bias.copy_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(F.pad(x, (0, self.width - x.shape[-1])))


def pad_inputs_(model: nn.Module, group_size: int) -> dict[str, int]:
    """Wrap every decoder Linear whose input width `group_size` does not divide; {name: real width}."""
    widths = {}
    for name, module in list(model.model.layers.named_modules(prefix="model.layers")):
        if isinstance(module, nn.Linear) and module.in_features % group_size:
            parent, child = name.rsplit(".", 1)
            width = math.ceil(module.in_features / group_size) * group_size
            setattr(model.get_submodule(parent), child, PaddedInputs(module, width))
            widths[name] = module.in_features
    return widths


def recipe(args: argparse.Namespace):
    if args.method == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        weights = {"num_bits": args.bits, "type": "int", "symmetric": False, "strategy": "group",
                   "group_size": args.group_size}
        return GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"])
    mask = "0:0" if args.mask == "unstructured" else args.mask
    if args.method == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        return SparseGPTModifier(sparsity=args.sparsity, mask_structure=mask, targets=["Linear"], ignore=["lm_head"])
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    return WandaPruningModifier(sparsity=args.sparsity, mask_structure=mask, targets=["Linear"], ignore=["lm_head"])


def computed_weights(model: nn.Module, widths: dict[str, int]) -> dict[str, torch.Tensor]:
    """The weight every decoder Linear computes with, by the base model's state-dict key."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    weights = {}
    for name, module in model.model.layers.named_modules(prefix="model.layers"):
        if not isinstance(module, nn.Linear):
            continue
        key = name.removesuffix(".linear") if name.removesuffix(".linear") in widths else name
        weight = module.weight.detach().float()
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None and scheme.weights is not None:
            weight = fake_quantize(weight, module.weight_scale, module.weight_zero_point, scheme.weights).float()
        weights[f"{key}.weight"] = (weight[:, :widths[key]] if key in widths else weight).contiguous()
    return weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True, help="safetensors file with `input_ids` (windows x tokens)")
    parser.add_argument("--method", choices=("gptq", "sparsegpt", "wanda"), required=True)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--mask", default="unstructured", help="unstructured or N:M")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from llmcompressor import oneshot

    ids = load_file(args.calib)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    widths = pad_inputs_(model, args.group_size) if args.method == "gptq" else {}
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    started = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe(args), num_calibration_samples=len(ids),
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    compress_s = time.perf_counter() - started
    save_file(computed_weights(model, widths), args.out)
    print(json.dumps({"compress_s": round(compress_s, 1)}))


if __name__ == "__main__":
    main()
