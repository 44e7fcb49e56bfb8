"""merged-int4's kernel computes the right function on every projection shape of the shipped bases (CUDA only).

  python .ci/int4_check.py

For each shape: a random bf16 weight, ``harness.engines.int4.quantize_linear``, then gemlite's output against the float64
product of the input with torchao's dequantized weight, scales and zeros in bf16 as gemlite stores them (the
function the kernel should compute: bf16 rounding, ~1e-2) and with the original weight (what 4 bits cost, ~1e-1 on random weights). Fresh inputs per check.
"""

import sys
import time

import torch

sys.path.insert(0, ".")
from harness.engines.int4 import dequantize, pin_one_row_configs, quantize_linear  # noqa: E402

SHAPES = {  # (out, in): Mistral-7B's fused qkv, o, gate_up, down; then SmolLM2-135M's
    "mistral-7b": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)],
    "smollm2-135m": [(960, 576), (576, 576), (3072, 576), (576, 1536)],
}
GROUPS = {"mistral-7b": 128, "smollm2-135m": 64}


def main() -> int:
    from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_affine_hqq

    worst = 0.0
    for model, shapes in SHAPES.items():
        for out_f, in_f in shapes:
            lin = torch.nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=torch.bfloat16)
            torch.nn.init.normal_(lin.weight, std=0.02)
            q = quantize_linear(lin, GROUPS[model])
            w_q, scale, zero, _ = _choose_qparams_and_quantize_affine_hqq(
                lin.weight.detach(), nbits=4, group_size=GROUPS[model], raw_output=True)
            g = GROUPS[model]
            w_deq = dequantize(w_q, scale, zero, (out_f, in_f), g, lin.weight.dtype).double()  # exact in float32
            for rows in (1, 8, 31, 85):  # decode (1) and prompt prefills, all through the one kernel (int4.KERNEL)
                x = torch.randn(rows, 1, in_f, device="cuda", dtype=torch.bfloat16)
                start = time.perf_counter()
                y = q(x).double()
                seconds = time.perf_counter() - start  # first call of a row count: Triton autotunes unless pinned
                if rows == 1:
                    pin_one_row_configs()  # as the engine does after its one-row call
                ref = x.double() @ w_deq.T
                kernel_err = ((y - ref).norm() / ref.norm()).item()
                quant_err = ((y - x.double() @ lin.weight.double().T).norm() / ref.norm()).item()
                finite = bool(torch.isfinite(y).all())
                print(f"{model} {out_f}x{in_f} g{g} rows {rows}: kernel rel err {kernel_err:.2e}, "
                      f"4-bit rel err {quant_err:.3f}, finite {finite}, first call {seconds:.2f} s", flush=True)
                worst = max(worst, kernel_err if finite else float("inf"))
    print(f"worst kernel error {worst:.2e}: {'PASS' if worst < 5e-2 else 'FAIL'}")
    return 0 if worst < 5e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
