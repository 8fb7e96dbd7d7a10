"""Published phone measurements the runtime parameters are fitted to (runtimes.py), as data,
each with its source. Shapes come from each model's public config (bench/configs/<model>/);
storage from the flow's quant passes. One figure per (model, device, runtime, metric): where a
source lists several configurations of the same model (ExecuTorch's SpinQuant and QAT+LoRA
Llama 3.2), the first is taken, so that no figure has a near-twin to predict it.
"""

from __future__ import annotations

from dataclasses import dataclass

XNN = "scale_dtype=bfloat16,act_bits=8,symmetric=true"
# flow: (target, backend, passes, what it stands for)
FLOWS: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "et-8da4w": ("executorch", "xnnpack", (f"quant.rtn:bits=4,group_size=32,{XNN},head_bits=4,embed_bits=8",),
                 "optimum-executorch `--qlinear 8da4w --qembedding 8w` (every linear, the head too, int4 g32 bf16 "
                 "scales, int8 dynamic activations; embedding int8)"),
    "et-spinquant": ("executorch", "xnnpack", (f"quant.rtn:bits=4,group_size=32,{XNN},head_bits=8,embed_bits=8",),
                     "Llama 3.2 SpinQuant (ExecuTorch's Llama README: linears int4 g32 + int8 dynamic activations, "
                     "head int8 per channel + int8 activations, embedding int8 per channel; head and embedding "
                     "modelled in groups of 32, the linears' group size)"),
    "et-8da4w-g128": ("executorch", "xnnpack",
                      ("quant.rtn:bits=4,group_size=128,scale_dtype=float32,act_bits=8,symmetric=true,head_bits=4,"
                       "embed_bits=4",),
                      "ExecuTorch `-qmode 8da4w --group_size 128 --embedding-quantize 4,32 -d fp32` (every linear and "
                      "the head int4 g128 fp32 scales + int8 activations; embedding int4 g32, modelled in g128: one "
                      "row per token, a negligible share)"),
    "litert-int8": ("tflite", "cpu", ("quant.rtn:bits=8,group_size=0,act_bits=8,head_bits=8,embed_bits=8",),
                    "ai-edge-torch `dynamic_int8` (int8 per-channel weights everywhere, int8 dynamic activations)"),
}

OPT_ET = "optimum-executorch README, phone benchmark table (as quoted in issue 15)"
ET_LLAMA = ("ExecuTorch examples/models/llama/README.md, Llama 3.2 performance table (OnePlus 12, adb binary, prompt "
            "64 tokens, KleidiAI)")
ET_LLAMA3 = "ExecuTorch examples/models/llama/README.md, Llama 3 8B performance table (adb binary, group size 128)"
LITERT_05 = ("huggingface.co/litert-community/Qwen2.5-0.5B-Instruct model card (Samsung S24 Ultra, CPU XNNPACK 4 "
             "threads, 1280 KV cache)")
LITERT_15 = ("huggingface.co/litert-community/Qwen2.5-1.5B-Instruct model card, revision 5ad1ede (Samsung S24 Ultra, "
             "CPU XNNPACK 4 threads, 1280 KV cache)")
LITERT_PROMPT = ("prompt length not stated on the card; 512, as on the sibling litert-community card "
                 "DeepSeek-R1-Distill-Qwen-1.5B ('512 tokens prefill, 128 tokens decode')")


@dataclass(frozen=True)
class Figure:
    model: str  # bench/configs/<model>
    flow: str  # a key of FLOWS
    device: str  # a key of devices.DEVICES
    metric: str  # decode or prefill
    tok_s: float
    prompt: int  # prompt tokens (decode is costed at prompt + 64, mid-way through 128 new tokens)
    source: str
    note: str = ""

    @property
    def key(self) -> str:
        return f"{self.model}/{self.flow}/{self.device}/{self.metric}"

    @property
    def runtime(self) -> str:
        target, backend = FLOWS[self.flow][:2]
        return f"{target}:{backend}"


PUBLISHED: tuple[Figure, ...] = (
    Figure("smollm2-135m", "et-8da4w", "galaxy-s22", "decode", 202.0, 64, OPT_ET),
    Figure("qwen3-0.6b", "et-8da4w", "galaxy-s22", "decode", 59.0, 64, OPT_ET),
    Figure("llama-3.2-1b", "et-8da4w", "galaxy-s22", "decode", 45.0, 64, OPT_ET),
    Figure("smollm2-135m", "et-8da4w", "iphone-15-pro", "decode", 29.6, 64, OPT_ET),
    Figure("qwen3-0.6b", "et-8da4w", "iphone-15-pro", "decode", 18.0, 64, OPT_ET),
    Figure("llama-3.2-1b", "et-8da4w", "iphone-15-pro", "decode", 25.8, 64, OPT_ET),
    Figure("llama-3.2-1b", "et-spinquant", "oneplus-12", "decode", 50.2, 64, ET_LLAMA),
    Figure("llama-3.2-3b", "et-spinquant", "oneplus-12", "decode", 19.7, 64, ET_LLAMA),
    Figure("llama-3-8b", "et-8da4w-g128", "galaxy-s22", "decode", 7.85, 64, ET_LLAMA3,
           "ExecuTorch of 2024; prompt length not stated (64 assumed, as the Llama 3.2 table)"),
    Figure("llama-3-8b", "et-8da4w-g128", "oneplus-12", "decode", 10.85, 64, ET_LLAMA3,
           "ExecuTorch of 2024; prompt length not stated (64 assumed, as the Llama 3.2 table)"),
    Figure("llama-3.2-1b", "et-spinquant", "oneplus-12", "prefill", 260.5, 64, ET_LLAMA),
    Figure("llama-3.2-3b", "et-spinquant", "oneplus-12", "prefill", 89.7, 64, ET_LLAMA),
    Figure("qwen2.5-0.5b", "litert-int8", "galaxy-s24-ultra", "decode", 29.97, 512, LITERT_05, LITERT_PROMPT),
    Figure("qwen2.5-0.5b", "litert-int8", "galaxy-s24-ultra", "prefill", 250.73, 512, LITERT_05, LITERT_PROMPT),
    Figure("qwen2.5-1.5b", "litert-int8", "galaxy-s24-ultra", "decode", 16.41, 512, LITERT_15, LITERT_PROMPT),
    Figure("qwen2.5-1.5b", "litert-int8", "galaxy-s24-ultra", "prefill", 113.68, 512, LITERT_15, LITERT_PROMPT),
)
