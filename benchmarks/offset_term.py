"""What int4's offset term costs, and the ways around it that were tried (SmolLM2-135M-Instruct, int4-fp32).

    python benchmarks/offset_term.py run     # results/offset-term-smollm2.{json,md} (~6 min on 2 cores)
    python benchmarks/offset_term.py table

int4 and int4-fp32 store each 4-bit block as ``d*q + m``: MatMulNBits computes ``d*(q - z)`` with an integer zero
point and the graph adds the rest, ``(block sums of x) @ offsets``, as four small nodes per matrix (Reshape,
ReduceSum, MatMul, Add; export/quantize.py ``_offset_nodes``). Exact for a Q4_1 source, and what keeps
int4-fp32's greedy answers fp32's. Variants of int4-fp32 built from the fp32 export by ``quantize_model``:

* as shipped;
* the block sums as ONE MatMul with a 0/1 indicator matrix instead of Reshape + ReduceSum (one node fewer per
  matrix, the same values);
* no offset term: integer zero points only (``offsets=False``), what MatMulNBits runs fast -- the Q4_1 source's
  weights rounded a second time.

And MatMulNBits' own float zero points (the exact form inside the kernel), timed on one 576 x 1536 matrix.
Per variant: the 22 greedy chat answers against fp32's (benchmarks/chat_agreement.py's metric) and decode
tokens/s at 1 and 2 threads (``edgelm bench`` in a fresh process, 128 + 128 tokens, interleaved rounds, medians).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chat_agreement as ca  # noqa: E402
from rescored_head import speed_rounds, write_results  # noqa: E402

WORK = ca.MODELS / "offset-term"
NAME = "offset-term-smollm2"


def _indicator_sums(path: Path) -> None:
    """Replace each Reshape + ReduceSum of block sums by MatMul(x, E), E[k, b] = 1 where feature k is in block b."""
    import onnx
    from onnx import helper, numpy_helper

    from edgelm_export.quantize import save_onnx

    model = onnx.load(str(path))
    made = {o: n for n in model.graph.node for o in n.output}
    width = {n.input[0]: next(a.i for a in n.attribute if a.name == "K")
             for n in model.graph.node if n.op_type == "MatMulNBits"}
    nodes, tables = [], set()
    for n in model.graph.node:
        if n.op_type == "Reshape" and "/block_sums" in n.output[0]:
            continue
        if n.op_type == "ReduceSum" and "/block_sums" in n.output[0]:
            x = made[n.input[0]].input[0]
            k = width[x]
            e = f"block_indicator.{k}"
            if e not in tables:
                ind = np.zeros((k, k // 32), np.float32)
                ind[np.arange(k), np.arange(k) // 32] = 1.0
                model.graph.initializer.append(numpy_helper.from_array(ind, e))
                tables.add(e)
            nodes.append(helper.make_node("MatMul", [x, e], [n.output[0]], name=n.name))
            continue
        nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    save_onnx(model, path)


def build(name: str, *, offsets: bool = True, indicator: bool = False) -> Path:
    from edgelm_export import quantize as q

    dst = WORK / name
    if (dst / "edgelm.json").is_file():
        return dst
    src = ca.fp32_dir()
    ca._copy_side_files(src, dst)
    info = q.quantize_model(src / "model.onnx", dst / "model.onnx", method="int4-fp32", offsets=offsets)
    if indicator:
        _indicator_sums(dst / "model.onnx")
    ca._finish(dst, json.loads((src / "config.json").read_text()), info["dtype"], info)
    return dst


VARIANTS = [("int4-fp32 as shipped (Reshape + ReduceSum + MatMul + Add per matrix)", {}),
            ("block sums by an indicator MatMul (3 nodes per matrix)", {"indicator": True}),
            ("no offset term: integer zero points only", {"offsets": False})]

ZERO_POINTS = """
import sys, time, numpy as np, onnxruntime as ort
from onnx import helper, numpy_helper, TensorProto
K, N, B = 576, 1536, 32
rng = np.random.default_rng(0)
q = rng.integers(0, 16, (N, K // B, B)).astype(np.uint8)
packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
scales = (rng.random(N * K // B, dtype=np.float32) * 0.01).astype(np.float32)
zu = rng.integers(0, 16, N * K // B).astype(np.uint8)
zeros = {"none": None, "uint8": (zu[0::2] | (zu[1::2] << 4)).astype(np.uint8),
         "float": (rng.random(N * K // B, dtype=np.float32) * 15).astype(np.float32)}
x = rng.standard_normal((1, K)).astype(np.float32)
out = {}
for kind, z in zeros.items():
    for level in (0, 4):
        inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S")]
        ins = ["x", "B", "S"] + (["Z"] if z is not None else [])
        if z is not None:
            inits.append(numpy_helper.from_array(z, "Z"))
        node = helper.make_node("MatMulNBits", ins, ["y"], domain="com.microsoft", K=K, N=N, bits=4, block_size=B,
                                accuracy_level=level)
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        so = ort.SessionOptions(); so.intra_op_num_threads = 1
        s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        for _ in range(20):
            s.run(None, {"x": x})
        t = time.perf_counter()
        for _ in range(300):
            s.run(None, {"x": x})
        out[f"{kind} zero points, level {level}"] = (time.perf_counter() - t) / 300 * 1e6
import json; print(json.dumps(out))
"""


def run(threads: int, rounds: int = 3) -> None:
    import edgelm

    paths = [build(f"v{i}", **kw) for i, (_, kw) in enumerate(VARIANTS)]
    fp32 = edgelm.load(str(ca.fp32_dir()), threads=threads)
    refs = ca.references(fp32)
    fp32_rows = [ca.forced_choices(fp32, r["prompt_ids"], r["answer_ids"])[1] for r in refs]
    del fp32
    rows = []
    for (label, _), path in zip(VARIANTS, paths):
        lm = edgelm.load(str(path), threads=threads, verify=False)
        got = [list(lm.generate(r["prompt_ids"], max_new_tokens=ca.TOKENS, temperature=0).token_ids) for r in refs]
        del lm
        rows.append(ca._row(label, refs, got, None, fp32_rows, 0.0))
        print(ca._line(rows[-1]), flush=True)
    kernel = json.loads(subprocess.run([sys.executable, "-c", ZERO_POINTS], check=True, capture_output=True,
                                       text=True).stdout.strip().splitlines()[-1])
    loads = speed_rounds(rows, paths, rounds)
    write_results(NAME, {"prompts": len(refs), "tokens": ca.TOKENS, "threads": threads,
                         "command": "python benchmarks/offset_term.py run", "loadavg_1min_during_speed": loads,
                         "rows": rows, "kernel_us": kernel})
    table()


def table() -> None:
    data = json.loads((ca.RESULTS / f"{NAME}.json").read_text(encoding="utf-8"))
    loads = data["loadavg_1min_during_speed"]
    lines = [f"int4-fp32's offset term on SmolLM2-135M-Instruct: {data['prompts']} chat prompts x up to "
             f"{data['tokens']} tokens against fp32's answers, decode at 1 and 2 threads; commit {data['commit']}, "
             f"{data['date']} (load during the speed rounds {min(loads):.2f}-{max(loads):.2f}); "
             f"`{data['command']}`.", "",
             "| variant | chat prefix agreement | answers identical | decode tok/s 1 thr | decode tok/s 2 thr |",
             "|---|---:|---:|---:|---:|"]
    for r in data["rows"]:
        lines.append(f"| {r['candidate']} | {100 * r['prefix_agreement']:.1f} % | {r['identical_answers']} / "
                     f"{len(r['per_prompt'])} | {r['decode_tps_1']['median']:.1f} | {r['decode_tps_2']['median']:.1f} |")
    lines += ["", "One MatMulNBits, 576 x 1536, one row, 1 thread (microseconds per call):", "",
              "| zero points | accuracy level 0 (fp32 activations) | level 4 (int8 activations) |", "|---|---:|---:|"]
    k = data["kernel_us"]
    for kind in ("none", "uint8", "float"):
        lines.append(f"| {kind} | {k[f'{kind} zero points, level 0']:.1f} | {k[f'{kind} zero points, level 4']:.1f} |")
    ca.write_table(NAME, lines)


def main() -> None:
    ca.cli(__doc__, run, table)


if __name__ == "__main__":
    main()
